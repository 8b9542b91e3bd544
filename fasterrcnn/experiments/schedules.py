"""Which training runs a config asks for: ``train.schedule=joint`` is one run of the trainer,
``train.schedule=alternating`` the four runs of ``alternating.train_alternating``. The command
line's ``train`` and ``ablate`` come through here, so that the engine never imports the experiments.
"""

from __future__ import annotations

from ..engine import trainer
from ..engine.config import Config, ConfigError
from ..engine.trainer import TrainResult
from .alternating import schedule_of_checkpoint, train_alternating


def train_schedule(
    cfg: Config | None,
    *,
    resume: str | None = None,
    resume_overrides: list[str] | tuple = (),
    show_progress: bool = True,
) -> TrainResult:
    """Train as ``cfg`` says, or with ``resume`` (``cfg`` unused), continue the run (or the schedule)
    that checkpoint belongs to; ``resume_overrides`` may change only ``config.RESUME_OVERRIDABLE``."""
    if resume:
        schedule = schedule_of_checkpoint(resume)
    elif cfg is None:
        raise ConfigError("nothing to train: give a config, or a checkpoint to resume")
    else:
        schedule = cfg if cfg.train.schedule == "alternating" else None
    if schedule is not None:
        return train_alternating(
            schedule, resume=resume, resume_overrides=resume_overrides, show_progress=show_progress
        )
    return trainer.train(cfg, resume=resume, resume_overrides=resume_overrides, show_progress=show_progress)
