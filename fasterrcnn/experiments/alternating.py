"""4-step alternating training (Ren et al. 2015, section 3.2), beside approximate joint training.

    step 1  RPN       backbone + rpn from the initial weights; the RPN's losses only
    step 2  detector  a fresh copy of the initial backbone (alternating_detector_init=rpn: step 1's)
                      + roi_heads, on the proposals of step 1's network (frozen, run on the fly)
    step 3  RPN       backbone and roi_heads of step 2, frozen; the rpn head from step 1, fine-tuned
    step 4  detector  backbone and rpn of step 3, frozen; roi_heads fine-tuned on that RPN's proposals
The result is one network with shared convolutions: step 4's checkpoint, a normal one.

"The initial weights" are the configured builder's, drawn under ``torch.manual_seed(train.seed)``
(from scratch: a random init; with model.weights_backbone: ImageNet's), the same in steps 1 and 2.
Each step is a run of ``trainer.train`` in <run>/step<k>/ (its own config.yaml, last.pt,
metrics.csv, solver schedule with warmup and decay), so a stopped schedule resumes inside the step
it was in: ``fasterrcnn train --resume`` with any of its last.pt files. A step's config is that of
a plain run (``train.schedule=joint``, the step's length); which step it is belongs to the schedule,
not to the user's config: the step's checkpoints record it (``alternating_step``), and the
schedule's own config is <run>/config.yaml. Frozen parts get no
gradient and no optimizer state, and stay in eval mode. <run>/metrics.csv gathers the steps' rows
with a ``step`` column and iterations counted over the whole schedule.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..engine import distributed as dist
from ..engine.checkpoint import load_checkpoint
from ..engine.config import (
    RESUME_OVERRIDABLE,
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    save_config,
)
from ..engine.metrics import CSV_COLUMNS, read_metrics
from ..engine.setup import build_model
from ..engine.trainer import TrainResult, load_resume_state, train
from ..files import atomic_open, atomic_write_bytes
from ..model.faster_rcnn import FasterRCNN
from ..model.loss_names import DETECTOR_LOSSES, RPN_LOSSES
from ..viz.training import plot_ap_history, plot_losses
from .stage_model import StageModel, freeze

log = logging.getLogger("fasterrcnn")

# step -> (the part trained, the parts frozen)
STEPS = {
    1: ("rpn", ("roi_heads",)),
    2: ("detector", ("rpn",)),
    3: ("rpn", ("backbone", "roi_heads")),
    4: ("detector", ("backbone", "rpn")),
}
DONE_MARKER = "done.json"
COPIED_OUTPUTS = ("best.pt", "predictions.json", "eval.json", "precision_recall.png")


def step_lengths(t: TrainConfig) -> list[int]:
    """The four steps' iterations: fractions of train.iterations (the last step takes the rounding
    remainder) or counts (see config.check_values)."""
    split = t.alternating_iterations
    if all(x < 1 for x in split):
        first = [round(x * t.iterations) for x in split[:3]]
        return first + [t.iterations - sum(first)]
    return [int(x) for x in split]


def step_config(cfg: Config, step: int) -> Config:
    """The config of step ``step``'s run: in <run>/step<k>, with that step's length, and the warmup
    scaled with it (each step runs the solver's schedule, warmup and decay, over its own length)."""
    values = cfg.to_dict()
    lengths = step_lengths(cfg.train)
    values["solver"]["warmup_iters"] = round(cfg.solver.warmup_iters * lengths[step - 1] / sum(lengths))
    values["train"].update(
        name=f"step{step}",
        out_dir=str(Path(cfg.train.out_dir) / cfg.train.name),
        iterations=lengths[step - 1],
        epochs=0,
        schedule="joint",
        alternating_iterations=lengths,
    )
    return config_from_dict(values)


def checkpoint_step(state: dict) -> int:
    """The alternating step whose run wrote the checkpoint ``state`` (0: none), also from a checkpoint
    written when the step was kept in the config (``train.alternating_step``)."""
    return int(state.get("alternating_step") or state["config"].get("train", {}).get("alternating_step") or 0)


def schedule_of_checkpoint(path: str | Path) -> Config | None:
    """The whole schedule's config if ``path`` is a checkpoint of an alternating schedule (one of its
    steps', or the schedule's result), read from the schedule's config.yaml; else None."""
    state = load_resume_state(path)
    step = checkpoint_step(state)
    if not step:
        return config_from_dict(state["config"]) if state["config"]["train"].get("schedule") == "alternating" else None
    schedule_yaml = Path(state["config"]["train"]["out_dir"]) / "config.yaml"
    try:
        values = yaml.safe_load(schedule_yaml.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(
            f"{schedule_yaml}: cannot read the alternating schedule's config ({e}); {path} is step "
            f"{step} of a schedule that ran in {schedule_yaml.parent}"
        ) from None
    return config_from_dict(values)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step{step}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a stopped run continues from: <run>/last.pt, else the last step's that exists."""
    candidates = [run_dir / "last.pt"] + [step_dir(run_dir, k) / "last.pt" for k in (4, 3, 2, 1)]
    return next((p for p in candidates if p.is_file()), None)


def initial_weights(model_cfg: ModelConfig, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """The builder's weights drawn under ``seed``, whatever the global RNG has done before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(model_cfg, num_classes).state_dict()


def part(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The entries of one part (backbone, rpn, roi_heads) of a model's state_dict, without its prefix."""
    prefix = name + "."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class AlternatingStep:
    """What the trainer needs for one step: ``prepare`` loads the step's starting weights and freezes
    parts, ``wrap`` gives the module whose forward trains (and evaluates) that step."""

    step: int
    run_dir: Path  # the schedule's folder, holding step1..step4
    model_cfg: ModelConfig
    seed: int
    detector_init: str = "initial"
    channels_last: bool = False

    @property
    def trains(self) -> str:
        return STEPS[self.step][0]

    @property
    def frozen(self) -> tuple[str, ...]:
        return STEPS[self.step][1]

    @property
    def evaluates(self) -> bool:
        """Step 1 trains no detector: there is nothing to evaluate."""
        return self.step != 1

    def final_weights(self, step: int) -> dict[str, torch.Tensor]:
        path = step_dir(self.run_dir, step) / "last.pt"
        if not path.is_file():
            raise ConfigError(
                f"alternating training step {self.step} starts from step {step}'s result, and "
                f"{path} does not exist: run the schedule from its start"
            )
        return load_checkpoint(path)["model"]

    def prepare(self, model: FasterRCNN, *, device: torch.device) -> None:
        if self.step in (1, 2):
            model.load_state_dict(initial_weights(self.model_cfg, model.num_classes, self.seed))
            if self.step == 2 and self.detector_init == "rpn":
                model.backbone.load_state_dict(part(self.final_weights(1), "backbone"))
        else:
            model.load_state_dict(self.final_weights(self.step - 1))
            if self.step == 3:  # the RPN's own layers continue from step 1
                model.rpn.load_state_dict(part(self.final_weights(1), "rpn"))
        for name in self.frozen:
            freeze(getattr(model, name))

    def wrap(self, model: FasterRCNN) -> StageModel:
        proposal_model = None
        if self.step == 2:  # step 1's network, frozen, proposes the RoIs
            proposal_model = build_model(self.model_cfg, model.num_classes)
            proposal_model.load_state_dict(self.final_weights(1))
            proposal_model.to(next(model.parameters()).device)
            if self.channels_last:
                proposal_model.to_channels_last()
        return StageModel(model, trains=self.trains, frozen=self.frozen, proposal_model=proposal_model)

    def checkpoint_entries(self) -> dict:
        """What the step's checkpoints record besides the trainer's state: which step they belong to."""
        return {"alternating_step": self.step}

    def describe(self) -> str:
        what = {
            1: "the RPN, from the initial weights",
            2: "the detector on step 1's proposals, its backbone from "
            + ("the initial weights" if self.detector_init == "initial" else "step 1"),
            3: "the RPN's own layers on step 2's frozen backbone",
            4: "the detector's own layers (box head and predictor) on step 3's proposals",
        }[self.step]
        losses = RPN_LOSSES if self.trains == "rpn" else DETECTOR_LOSSES
        return f"{what}; losses {', '.join(losses)} (the others are logged as 0); frozen: {', '.join(self.frozen)}"


@dataclass
class AlternatingResult(TrainResult):
    steps: list[TrainResult | None] = field(default_factory=list)  # None: finished in an earlier invocation

    @property
    def eval_seconds(self) -> float:
        return sum(r.evaluation.seconds for r in self.steps if r is not None and r.evaluation is not None)


def train_alternating(
    cfg: Config, *, resume: str | None = None, resume_overrides: list[str] | tuple = (), show_progress: bool = True
) -> AlternatingResult:
    """Run (or, with ``resume``, continue) the four steps of the alternating schedule ``cfg`` (the
    schedule's config: see ``schedule_of_checkpoint`` for the one of a checkpoint)."""
    if resume_overrides:
        cfg = apply_overrides(cfg, list(resume_overrides), allowed=RESUME_OVERRIDABLE, context=f"--resume {resume}: ")
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    if resume is None and latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with --resume {latest_checkpoint(run_dir)}, "
            "or choose another train.name"
        )
    created = not run_dir.exists()
    try:
        return _train_steps(cfg, run_dir, resume_overrides=resume_overrides, show_progress=show_progress)
    except BaseException:
        if created and dist.is_main() and latest_checkpoint(run_dir) is None:  # nothing of value written
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train_steps(cfg: Config, run_dir: Path, *, resume_overrides, show_progress: bool) -> AlternatingResult:
    lengths = step_lengths(cfg.train)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        log.info(
            "alternating training in %s: steps of %s iterations (RPN, detector, RPN, detector)",
            run_dir,
            "/".join(map(str, lengths)),
        )
    start = time.perf_counter()
    results: list[TrainResult | None] = []
    info = log.info if dist.is_main() else (lambda *args: None)  # one log, not one per process
    for step in (1, 2, 3, 4):
        sdir = step_dir(run_dir, step)
        stage = AlternatingStep(
            step, run_dir, cfg.model, cfg.train.seed, cfg.train.alternating_detector_init, cfg.train.channels_last
        )
        if (sdir / DONE_MARKER).is_file():
            info("alternating step %d/4 finished earlier (%s)", step, sdir)
            results.append(None)
            continue
        first = sum(lengths[: step - 1])
        info(
            "alternating step %d/4, iterations %d-%d of %d: %s",
            step,
            first + 1,
            first + lengths[step - 1],
            sum(lengths),
            stage.describe(),
        )
        checkpoint = sdir / "last.pt"
        result = train(
            step_config(cfg, step),
            resume=str(checkpoint) if checkpoint.is_file() else None,
            resume_overrides=resume_overrides,
            show_progress=show_progress,
            stage=stage,
        )
        results.append(result)
        if dist.is_main():
            summary = result.evaluation.summary() if result.evaluation is not None else {}
            atomic_write_bytes(
                sdir / DONE_MARKER,
                json.dumps({"step": step, "iterations": result.iterations, **summary}, indent=2).encode(),
            )
            write_schedule_metrics(run_dir, lengths)
        dist.barrier()
    final = load_checkpoint(step_dir(run_dir, 4) / "last.pt")
    if dist.is_main():
        finish(run_dir, lengths)
    last = results[-1]
    return AlternatingResult(
        run_dir,
        sum(lengths),
        last.evaluation if last is not None else None,
        float(final["best_ap"]),
        time.perf_counter() - start,
        steps=results,
    )


def finish(run_dir: Path, lengths: list[int]) -> None:
    """The schedule's outputs in its folder: step 4's checkpoint (the shared-convolution network) as
    last.pt and best.pt, its evaluation, and the whole schedule's metrics and plots."""
    src = step_dir(run_dir, 4)
    for name in COPIED_OUTPUTS:
        if (src / name).is_file():
            atomic_write_bytes(run_dir / name, (src / name).read_bytes())
    atomic_write_bytes(run_dir / "last.pt", (src / "last.pt").read_bytes())
    rows = write_schedule_metrics(run_dir, lengths)
    plot_losses(rows, run_dir / "losses.png")
    plot_ap_history(rows, run_dir / "ap.png")
    log.info("alternating training done: %s (step 4's network) is the result", run_dir / "last.pt")


def write_schedule_metrics(run_dir: Path, lengths: list[int]) -> list[dict]:
    """<run>/metrics.csv: every step's rows, with ``step`` and ``step_iteration`` columns and
    ``iteration`` counted over the whole schedule; losses a step does not train are left empty."""
    rows = []
    for step in (1, 2, 3, 4):
        path = step_dir(run_dir, step) / "metrics.csv"
        if not path.is_file():
            continue
        offset = sum(lengths[: step - 1])
        untrained = DETECTOR_LOSSES if STEPS[step][0] == "rpn" else RPN_LOSSES
        for row in read_metrics(path):
            row = {**row, "step": step, "step_iteration": row["iteration"], "iteration": int(row["iteration"]) + offset}
            if row["kind"] == "train":
                row.update(dict.fromkeys(untrained, ""))
            rows.append(row)
    columns = ("step", "step_iteration", *CSV_COLUMNS)
    with atomic_open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows
