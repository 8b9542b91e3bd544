"""What a run writes to continue exactly: its position, and last.pt / best.pt in its folder
(``trainer.restore_training_state`` reads a checkpoint back).

A checkpoint holds the model, optimizer, scheduler and scaler states, the position (iteration,
epoch, batch in the epoch, best AP), the RNG states, the logging window, whether an evaluation of
these weights is pending, the resolved config and the class names; a stage (one step of a
multi-step schedule) may add entries of its own. Every rank calls ``save`` (the logging window is
averaged over ranks); rank 0 writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..files import remove_stale_temps
from ..viz.training import plot_ap_history, plot_losses
from . import checkpoint, preflight
from . import distributed as dist
from .config import Config, ConfigError
from .metrics import LossWindow, MetricsLog

log = logging.getLogger("fasterrcnn")


@dataclass
class Position:
    """Where a run is: the optimizer steps done, the epoch and the batches of it consumed, the best AP."""

    iteration: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_ap: float = -1.0

    @classmethod
    def from_checkpoint(cls, state: dict) -> Position:
        return cls(state["iteration"], state["epoch"], state["batch_in_epoch"], state["best_ap"])


def checked_on_main(check) -> None:
    """Run ``check`` on rank 0 (the rank that writes) and raise its ConfigError on every rank."""
    message = None
    if dist.is_main():
        try:
            check()
        except ConfigError as e:
            message = str(e)
    message = dist.broadcast_object(message)
    if message:
        raise ConfigError(message)


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """train.out_dir/train.name, made and writable; a new run may not take over another's folder.
    On resume, temporary files left by a kill are removed."""
    run_dir = Path(cfg.train.out_dir) / cfg.train.name

    def check():
        preflight.check_writable(run_dir)
        if not resume and (run_dir / "last.pt").exists():
            raise ConfigError(
                f"{run_dir} already holds a run (last.pt); continue it with --resume "
                f"{run_dir / 'last.pt'}, or choose another train.name"
            )

    checked_on_main(check)
    if resume and dist.is_main():
        for p in remove_stale_temps(run_dir):
            log.info("removed %s, a file left half-written when the run was killed", p)
    return run_dir


class RunCheckpoints:
    """last.pt and best.pt of one run, and the loss and AP plots redrawn with each save."""

    def __init__(
        self,
        run_dir: Path,
        *,
        model,
        optimizer,
        scheduler,
        scaler,
        cfg: Config,
        data,
        metrics: MetricsLog | None,
        extra: dict | None = None,
    ):
        self.last, self.best = run_dir / "last.pt", run_dir / "best.pt"
        self.run_dir, self.metrics, self.extra = run_dir, metrics, extra or {}
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.cfg, self.data = cfg, data

    def state(self, position: Position, log_window: dict, *, eval_pending: bool) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": position.iteration,
            "epoch": position.epoch,
            "batch_in_epoch": position.batch_in_epoch,
            "best_ap": position.best_ap,
            "rng": checkpoint.rng_state(),
            "config": self.cfg.to_dict(),
            "arch": self.cfg.model.arch,
            "class_names": self.data.class_names,
            "label_to_cat_id": self.data.label_to_cat_id,
            "eval_pending": eval_pending,
            "log_window": log_window,
            **self.extra,
        }

    def save(
        self, position: Position, window: LossWindow, *, eval_pending: bool = False, is_best: bool = False
    ) -> None:
        log_window = window.to_checkpoint()  # on every rank
        if not dist.is_main():
            return
        state = self.state(position, log_window, eval_pending=eval_pending)
        if is_best:
            checkpoint.save_checkpoint(self.best, state)
        checkpoint.save_checkpoint(self.last, state)
        assert self.metrics is not None  # rank 0 keeps the metrics log
        rows = self.metrics.rows()
        plot_losses(rows, self.run_dir / "losses.png")
        plot_ap_history(rows, self.run_dir / "ap.png")
