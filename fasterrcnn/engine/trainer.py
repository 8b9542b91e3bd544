"""The training loop: approximate joint training of the RPN and the detector (the four losses
summed with configured weights), SGD or AdamW with warmup and step or cosine decay, optional
mixed precision, gradient clipping and accumulation, periodic evaluation, crash-safe checkpoints,
and DistributedDataParallel when launched by torchrun.

Outputs (rank 0) under runs/<name>/: config.yaml, last.pt, best.pt, metrics.csv, predictions.json
(the validation detections in COCO format), eval.json, and PNG plots, each written atomically.
A run checks what it can before it starts (``preflight``), stops cleanly on SIGINT/SIGTERM after the
current step (``signals``), and resumes from last.pt exactly: on the CPU, a resumed run ends with the
weights of one never interrupted.

The pieces around the loop: ``run_state`` (the position, last.pt and best.pt), ``metrics``
(metrics.csv and the logging window), ``batches`` (the seeded, resumable batch order),
``evaluate_run`` below (an evaluation of the weights at a step), ``signals`` (a stop request).
A multi-step schedule (``train.schedule=alternating``) is run by ``fasterrcnn.experiments``, which
calls ``train`` once per step with a ``stage``.
"""

import functools
import logging
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..evaluation.confusion import pr_counts
from ..model.loss_names import LOSS_NAMES
from ..viz.precision_recall import plot_precision_recall
from . import distributed as dist
from . import preflight
from .batches import BatchStream, EpochBatches
from .board import RunBoard
from .checkpoint import CheckpointError, estimate_checkpoint_bytes, load_checkpoint, set_rng_state
from .config import RESUME_OVERRIDABLE, Config, ConfigError, apply_overrides, config_from_dict, save_config
from .diagnostics import draw_result, write_diagnostics
from .evaluator import Evaluation, autocast, evaluate_model
from .metrics import EVAL_COLUMNS, LossWindow, MetricsLog
from .progress import Progress
from .run_state import Position, RunCheckpoints, checked_on_main, prepare_run_dir
from .schedule import lr_factor
from .setup import build_data, build_model
from .signals import StopRequest, TrainingInterrupted
from .val_loss import validation_loss

log = logging.getLogger("fasterrcnn")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    evaluation: Evaluation | None
    best_ap: float
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_seed(seed: int, iteration: int, image_id: int) -> int:
    """The seed of one image's anchor and RoI sampling at one iteration: independent of how the
    batch is split over processes (see fasterrcnn.model.sampler.sample_generators)."""
    return ((seed * 1_000_003 + iteration) * 1_000_003 + image_id) % (2**62)


def check_finite(losses: dict[str, torch.Tensor], total: torch.Tensor, iteration: int) -> None:
    if torch.isfinite(total):
        return
    values = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in losses.items())
    raise NonFiniteLossError(
        f"iteration {iteration}: the loss is not finite ({values}); stopping without writing a checkpoint. "
        "Lower solver.lr, set solver.clip_grad_norm, or check the data (check-data)."
    )


def optimizer_slots(cfg) -> int:
    """State tensors per parameter: AdamW 2 (moments), SGD 1 (momentum) or 0."""
    return 2 if cfg.optimizer == "adamw" else int(cfg.momentum > 0)


@dataclass
class Solver:
    """The optimizer, its learning-rate schedule and the mixed-precision loss scaler, stepped together."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]
    clip_grad_norm: float

    def step(self) -> None:
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def make_optimizer(cfg, params: list) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_solver(
    cfg: Config, optimizer: torch.optim.Optimizer, params: list, *, total: int, device: torch.device
) -> Solver:
    s = cfg.solver
    schedule: dict[str, Any] = dict(
        total=total,
        warmup_iters=s.warmup_iters,
        warmup_factor=s.warmup_factor,
        schedule=s.schedule,
        milestones=s.milestones,
        gamma=s.gamma,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, **schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    return Solver(optimizer, scheduler, scaler, params, s.clip_grad_norm)


def restore_training_state(state: dict, *, model: torch.nn.Module, solver: Solver) -> None:
    """The model, optimizer, scheduler and scaler states and the RNG states of a checkpoint."""
    model.load_state_dict(state["model"])
    solver.optimizer.load_state_dict(state["optimizer"])
    solver.scheduler.load_state_dict(state["scheduler"])
    solver.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def run_length(cfg: Config, batches: EpochBatches) -> int:
    """Optimizer steps: train.iterations, or train.epochs over the batches of an epoch."""
    per_epoch = max(batches.batches_per_epoch(), 1)
    return cfg.train.iterations or math.ceil(cfg.train.epochs * per_epoch / cfg.solver.accumulate)


def load_resume_state(resume: str | Path) -> dict:
    """The training checkpoint given as --resume; an error names the option."""
    try:
        return load_checkpoint(resume)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {resume}: {e}") from None


def resumed_config(state: dict, resume: str, overrides) -> Config:
    """The config a checkpoint's run continues with: its own, with the few changes --resume allows."""
    cfg = config_from_dict(state["config"])
    if overrides:
        cfg = apply_overrides(cfg, list(overrides), allowed=RESUME_OVERRIDABLE, context=f"--resume {resume}: ")
    return cfg


def on_device(images, targets, *, device: torch.device, seed: int, iteration: int):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {
            **{k: v.to(device, non_blocking=True) for k, v in t.items()},
            "sample_seed": sample_seed(seed, iteration, int(t["image_id"])),
        }
        for t in targets
    ]
    return images, targets


def train_step(
    train_model,
    stream: BatchStream,
    solver: Solver,
    window: LossWindow,
    *,
    cfg: Config,
    weights: dict[str, float],
    device: torch.device,
    iteration: int,
) -> None:
    """One optimizer step over ``solver.accumulate`` batches: the weighted sum of the four losses."""
    accumulate = cfg.solver.accumulate
    solver.optimizer.zero_grad(set_to_none=True)
    for _ in range(accumulate):
        images, targets = on_device(*stream.next(), device=device, seed=cfg.train.seed, iteration=iteration)
        with autocast(device, cfg.train.amp):
            losses = train_model(images, targets)
        losses = {k: v.float() for k, v in losses.items()}
        loss = sum(weights[k] * losses[k] for k in LOSS_NAMES)
        check_finite(losses, loss, iteration + 1)
        solver.scaler.scale(loss / accumulate).backward()
        window.add_batch(losses, accumulate=accumulate, images=len(images))
    solver.step()


def log_window(
    window: LossWindow,
    *,
    position: Position,
    lr: float,
    metrics: MetricsLog | None,
    progress: Progress,
    board: RunBoard | None = None,
) -> None:
    """A train row of metrics.csv, TensorBoard's train scalars and the progress line: the window's mean losses
    (every rank calls this; rank 0 has the metrics log and the board)."""
    steps = window.steps
    means, rate = window.close()
    if metrics is not None:
        metrics.write(
            {
                "kind": "train",
                "iteration": position.iteration,
                "epoch": position.epoch,
                "lr": lr,
                "loss": sum(means.values()),
                **means,
                "images_per_s": rate,
            }
        )
    if board is not None:
        board.train(position.iteration, {"loss": sum(means.values()), **means, "lr": lr, "images_per_s": rate})
    progress.update(
        steps,
        loss=f"{sum(means.values()):.3f}",
        lr=f"{lr:.4g}",
        img_s=f"{rate:.1f}",
        **{k.replace("loss_", ""): f"{v:.3f}" for k, v in means.items()},
    )


def evaluate_run(
    model,
    data,
    *,
    cfg: Config,
    device: torch.device,
    run_dir: Path,
    position: Position,
    metrics: MetricsLog,
    show_progress: bool,
    board: RunBoard | None = None,
    loss_weights: dict[str, float] | None = None,
) -> Evaluation:
    """Evaluate ``model`` on the validation set (rank 0): predictions.json, eval.json, the validation loss, an
    eval row of metrics.csv, a log line, the precision-recall plot, the error analysis (confusion matrix, F1
    curve, val_predictions.jpg: engine/diagnostics.py) and TensorBoard's evaluation events."""
    iteration = position.iteration
    result = evaluate_model(
        model,
        data.val,
        class_names=data.class_names,
        label_to_cat_id=data.label_to_cat_id,
        ann_file=data.val_ann_file,
        batch_size=cfg.train.batch_size,
        device=device,
        amp=cfg.train.amp,
        show_progress=show_progress,
        results_path=run_dir / "predictions.json",
    )
    result.coco.to_json(run_dir / "eval.json")
    summary = result.summary()
    loss_start = time.perf_counter()
    val_loss = validation_loss(
        model, data.val, batch_size=cfg.train.batch_size, device=device, amp=cfg.train.amp, weights=loss_weights
    )
    loss_seconds = time.perf_counter() - loss_start
    val_columns = {"val_loss": val_loss["loss"], **{f"val_{k}": v for k, v in val_loss.items() if k in LOSS_NAMES}}
    metrics.write(
        {
            "kind": "eval",
            "iteration": iteration,
            "epoch": position.epoch,
            **{k: summary[k] for k in EVAL_COLUMNS},
            **val_columns,
        }
    )
    log.info(
        "evaluation at iteration %d: AP %.3f AP50 %.3f AP75 %.3f (VOC07 mAP50 %.3f) on %d images in %.1f s; "
        "validation loss %.4f (%.1f s)",
        iteration,
        summary["AP"],
        summary["AP50"],
        summary["AP75"],
        summary["VOC07_mAP50"],
        result.num_images,
        result.seconds,
        val_loss["loss"],
        loss_seconds,
    )
    found = write_diagnostics(
        result,
        data.val,
        class_names=data.class_names,
        label_to_cat_id=data.label_to_cat_id,
        out_dir=run_dir,
        title=f"iteration {iteration}",
    )
    if board is not None:
        board.evaluation(
            iteration,
            summary,
            per_class_ap={c.name: c.AP for c in result.coco.per_class if c.AP >= 0},
            val_loss={k: v for k, v in val_loss.items() if k in LOSS_NAMES or k == "loss"},
            pr=pr_counts(found.matches, num_classes=len(data.class_names)),
            class_names=data.class_names,
            images=[
                draw_result(data.val, r, class_names=data.class_names, score_threshold=0.5) for r in found.results[:4]
            ],
        )
    if result.coco.curves:
        plot_precision_recall(
            result.coco.curves,
            run_dir / "precision_recall.png",
            title=f"Precision-recall at IoU 0.5, iteration {iteration}",
        )
    return result


def save_and_evaluate(
    checkpoints: RunCheckpoints, position: Position, window: LossWindow, evaluate
) -> Evaluation | None:
    """Save the step's weights (marked: evaluation pending, so that a crash or a kill during a long
    evaluation loses nothing; a resumed run evaluates them before going on), evaluate them where
    ``evaluate`` is given, and save again (best.pt too if the AP is the best yet). Every rank calls this."""
    checkpoints.save(position, window, eval_pending=True)
    evaluation = evaluate() if evaluate is not None else None
    is_best = evaluation is not None and position.best_ap < evaluation.coco.AP
    if evaluation is not None:
        position.best_ap = max(position.best_ap, evaluation.coco.AP)
    checkpoints.save(position, window, is_best=is_best)
    dist.barrier()
    return evaluation


def announce_stop(signum: int, last_pt: Path) -> None:
    log.warning(
        "%s received: finishing the current step, then saving %s (press Ctrl-C again to abort at once, "
        "losing the work since the last checkpoint)",
        signal.Signals(signum).name,
        last_pt,
    )


def abort_message(last_pt: Path) -> str:
    if last_pt.is_file():
        return (
            f"second Ctrl-C: aborted without saving the current step; {last_pt} (the last checkpoint) is whole: "
            f"continue with fasterrcnn train --resume {last_pt}"
        )
    return "second Ctrl-C: aborted before the run's first checkpoint; nothing to resume"


def stopped(signum: int, last_pt: Path, iteration: int, total: int) -> TrainingInterrupted:
    stop = TrainingInterrupted(signum, last_pt, iteration, total)
    if dist.is_main():
        log.warning("%s", stop)
    return stop


def remove_if_nothing_of_value(run_dir: Path) -> None:
    """Remove the folder of a run that failed before writing a checkpoint (it was made by this run)."""
    if (run_dir / "last.pt").exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("removed %s: the run failed before its first checkpoint", run_dir)


def train(
    cfg: Config | None,
    *,
    resume: str | None = None,
    resume_overrides: list[str] | tuple = (),
    show_progress: bool = True,
    stage=None,
) -> TrainResult:
    """Train as ``cfg`` says; with ``resume``, continue the run of that checkpoint exactly as it was
    configured (``resume_overrides`` may change only ``config.RESUME_OVERRIDABLE``).

    ``stage``: one step of a multi-step schedule (``experiments.alternating.AlternatingStep``): it
    loads the step's starting weights, freezes parts (``prepare``), wraps the forward (``wrap``) and
    adds entries to the checkpoints (``checkpoint_entries``).

    SIGINT/SIGTERM finish the current step, write last.pt and raise ``TrainingInterrupted``."""
    state = None
    if resume:
        state = load_resume_state(resume)
        cfg = resumed_config(state, resume, resume_overrides)  # the run continues as it was configured
    elif cfg is None:
        raise ConfigError("nothing to train: give a config, or a checkpoint to resume")
    if stage is None and cfg.train.schedule != "joint":
        raise ConfigError(
            f"train.schedule={cfg.train.schedule} is a schedule of several runs: run it with "
            "fasterrcnn train (fasterrcnn.experiments.schedules.train_schedule), not trainer.train"
        )

    # Everything that can be checked without reading data, before reading any.
    preflight.check_run_length(cfg)
    device = preflight.check_device(cfg.train)
    preflight.check_weights_files(cfg.model)
    distributed = dist.init_from_env(device.type)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    created = not (Path(cfg.train.out_dir) / cfg.train.name).exists()
    run_dir = prepare_run_dir(cfg, resume is not None)
    if resume and dist.is_main() and Path(resume).resolve().parent != run_dir.resolve():
        log.warning(
            "%s is not in its run's folder %s (train.out_dir/train.name of its config, relative to the "
            "current folder): the run continues there",
            resume,
            run_dir,
        )
    try:
        return run_training(
            cfg,
            run_dir,
            state,
            resume=resume,
            device=device,
            distributed=distributed,
            show_progress=show_progress,
            stage=stage,
        )
    except BaseException:
        if created and dist.is_main():
            remove_if_nothing_of_value(run_dir)
        raise


def run_training(
    cfg: Config,
    run_dir: Path,
    state: dict | None,
    *,
    resume: str | None,
    device: torch.device,
    distributed: bool,
    show_progress: bool,
    stage,
) -> TrainResult:
    """The run itself, in its prepared folder: the data, the model and the solver, then the loop."""
    seed_everything(cfg.train.seed)

    # The data, the model, the solver, and where the run is (from the checkpoint when resuming).
    data = build_data(cfg.data, seed=cfg.train.seed)
    assert data.train is not None  # build_data opens the training set (train=True)
    preflight.check_image_files(data.train, which="training", option="data.train_images")
    preflight.check_image_files(data.val, which="validation", option="data.val_images (default: data.train_images)")
    preflight.check_training_objects(data.train, voc_classes_option=bool(cfg.data.voc_classes))
    preflight.check_dataset_sizes(len(data.train), len(data.val), cfg.train.batch_size, dist.world_size())
    model = build_model(cfg.model, num_classes=len(data.class_names)).to(device)
    if cfg.train.channels_last:
        model.to_channels_last()
    if stage is not None:
        stage.prepare(model, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.solver, params)
    checked_on_main(
        lambda: preflight.check_disk_space(run_dir, estimate_checkpoint_bytes(model, optimizer_slots(cfg.solver)))
    )
    batches = EpochBatches(
        data.train,
        batch_size=cfg.train.batch_size,
        num_workers=cfg.data.workers,
        seed=cfg.train.seed,
        aspect_grouping=cfg.data.aspect_grouping,
        distributed=distributed,
    )
    total = run_length(cfg, batches)
    solver = make_solver(cfg, optimizer, params, total=total, device=device)
    position, window, eval_pending = Position(), LossWindow(), False
    if state is not None:
        restore_training_state(state, model=model, solver=solver)
        position, window = Position.from_checkpoint(state), LossWindow.from_checkpoint(state)
        eval_pending = bool(state.get("eval_pending", False))
        log.info("resuming %s at iteration %d of %d", resume, position.iteration, total)

    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
        log.info(
            "run folder %s: %s on %s, %d training / %d validation images, %d classes, %d iterations "
            "of batch %d x %d process(es)",
            run_dir,
            cfg.model.arch,
            device,
            len(data.train),
            len(data.val),
            len(data.class_names) - 1,
            total,
            cfg.train.batch_size,
            dist.world_size(),
        )
        log.info(
            "Ctrl-C stops after the current step and saves %s; continue a stopped or crashed run with: "
            "fasterrcnn train --resume %s",
            run_dir / "last.pt",
            run_dir / "last.pt",
        )
    metrics = (
        MetricsLog(run_dir / "metrics.csv", position.iteration if state is not None else None)
        if dist.is_main()
        else None
    )
    checkpoints = RunCheckpoints(
        run_dir,
        model=model,
        optimizer=optimizer,
        scheduler=solver.scheduler,
        scaler=solver.scaler,
        cfg=cfg,
        data=data,
        metrics=metrics,
        extra=stage.checkpoint_entries() if stage is not None else None,
    )
    board = RunBoard(run_dir, resume_iteration=position.iteration if state is not None else None) if metrics else None
    if board is not None:
        log.info("TensorBoard: tensorboard --logdir %s (the events are in the run folder)", cfg.train.out_dir)
    forward_model = stage.wrap(model) if stage is not None else model  # evaluated too
    # a stage trains part of the model, whose other parameters may get no gradient in a step
    train_model = (
        DistributedDataParallel(
            forward_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=stage is not None,
        )
        if distributed
        else forward_model
    )
    weights = {k: float(cfg.solver.loss_weights.get(k, 1.0)) for k in LOSS_NAMES}
    # rank 0 evaluates (a stage may have nothing to evaluate)
    evaluate = (
        functools.partial(
            evaluate_run,
            forward_model,
            data,
            cfg=cfg,
            device=device,
            run_dir=run_dir,
            position=position,
            metrics=metrics,
            show_progress=show_progress,
            board=board,
            loss_weights=weights,
        )
        if metrics is not None and (stage is None or stage.evaluates)  # rank 0, the one with the metrics log
        else None
    )
    evaluation = None

    # The loop: a step, a log row every train.log_every steps, an evaluation or a checkpoint when due,
    # and a stop (after saving) when a signal came.
    progress = Progress(
        total=total, desc="train", unit="it", enabled=show_progress and dist.is_main(), every=cfg.train.log_every
    )
    progress.update(position.iteration)
    start = window.start = time.perf_counter()
    saved_at = position.iteration if state is not None else None  # last.pt holds this iteration's weights
    stream = None
    try:
        with StopRequest(
            on_request=lambda signum: announce_stop(signum, checkpoints.last),
            abort_message=lambda: abort_message(checkpoints.last),
        ) as stop:
            if eval_pending:
                evaluation = save_and_evaluate(checkpoints, position, window, evaluate)
            stream = BatchStream(batches, position)
            train_model.train()
            while position.iteration < total:
                if saved_at == position.iteration:  # a signal during the last evaluation or save: last.pt is current
                    signum = dist.max_over_ranks(stop.signum or 0)
                    if signum:
                        raise stopped(signum, checkpoints.last, position.iteration, total)
                train_step(
                    train_model,
                    stream,
                    solver,
                    window,
                    cfg=cfg,
                    weights=weights,
                    device=device,
                    iteration=position.iteration,
                )
                position.iteration += 1
                window.steps += 1
                if position.iteration % cfg.train.log_every == 0 or position.iteration == total:
                    log_window(window, position=position, lr=solver.lr, metrics=metrics, progress=progress, board=board)

                every = cfg.train.eval_every
                evaluate_now = position.iteration == total or bool(every and position.iteration % every == 0)
                # every rank agrees on stopping (the signal may have reached one rank only)
                signum = dist.max_over_ranks(stop.signum or 0) if position.iteration < total else 0
                if signum:
                    checkpoints.save(position, window, eval_pending=evaluate_now)
                    dist.barrier()
                    raise stopped(signum, checkpoints.last, position.iteration, total)
                if evaluate_now:
                    evaluation = save_and_evaluate(checkpoints, position, window, evaluate) or evaluation
                    train_model.train()
                    saved_at = position.iteration
                elif cfg.train.checkpoint_every and position.iteration % cfg.train.checkpoint_every == 0:
                    checkpoints.save(position, window)
                    dist.barrier()
                    saved_at = position.iteration
    except Exception:  # (a stop on a signal is a KeyboardInterrupt, not caught here)
        if dist.is_main() and checkpoints.last.exists():
            log.error(
                "training failed at iteration %d; %s is whole: once the cause is fixed, continue with "
                "fasterrcnn train --resume %s",
                position.iteration,
                checkpoints.last,
                checkpoints.last,
            )
        raise
    finally:
        progress.close()
        if stream is not None:
            stream.close()
        if board is not None:
            board.close()
    return TrainResult(run_dir, position.iteration, evaluation, position.best_ap, time.perf_counter() - start)
