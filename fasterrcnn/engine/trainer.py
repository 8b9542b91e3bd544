"""The training loop: approximate joint training of the RPN and the detector (the four losses
summed with configured weights), SGD or AdamW with warmup and step or cosine decay, optional
mixed precision, gradient clipping and accumulation, periodic evaluation, crash-safe checkpoints,
and DistributedDataParallel when launched by torchrun.

Outputs (rank 0) under runs/<name>/: config.yaml, last.pt, best.pt, metrics.csv, predictions.json
(the validation detections in COCO format), eval.json, and PNG plots, each written atomically.
A run checks what it can before it starts (``preflight``), stops cleanly on SIGINT/SIGTERM after the
current step (``signals``), and resumes from last.pt exactly: on the CPU, a resumed run ends with the
weights of one never interrupted.
"""
import csv
import io
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..data import make_data_loader
from ..data.transforms import set_augmentation_epoch
from ..files import atomic_open, disk_full_error, is_disk_full, remove_stale_temps
from ..viz.precision_recall import plot_precision_recall
from ..viz.training import plot_ap_history, plot_losses
from . import distributed as dist
from . import preflight
from .checkpoint import estimate_checkpoint_bytes, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RESUME_OVERRIDABLE, Config, ConfigError, apply_overrides, config_from_dict, save_config
from .evaluator import Evaluation, autocast, evaluate_model
from .progress import Progress
from .schedule import lr_factor
from .setup import build_data, build_model
from .signals import StopRequest, TrainingInterrupted

log = logging.getLogger("fasterrcnn")
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
EVAL_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "VOC07_mAP50", "VOC_mAP50")
CSV_COLUMNS = ("kind", "iteration", "epoch", "lr", "loss", *LOSS_NAMES, "images_per_s", *EVAL_COLUMNS)


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


class EpochBatches:
    """Batches in a fixed, seeded order per epoch, resumable in the middle of an epoch."""

    def __init__(self, dataset, *, batch_size: int, num_workers: int, seed: int, aspect_grouping: bool, distributed: bool):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.seed, self.aspect_grouping, self.distributed = seed, aspect_grouping, distributed

    def loader(self, epoch: int, skip: int = 0) -> DataLoader:
        set_augmentation_epoch(self.dataset, epoch)  # before the workers take their copy of the dataset
        base = make_data_loader(self.dataset, self.batch_size, shuffle=True, num_workers=self.num_workers,
                                distributed=self.distributed, seed=self.seed + epoch,
                                aspect_grouping=self.aspect_grouping, drop_last=True)
        if skip == 0:
            return base
        batches = list(base.batch_sampler)[skip:]  # indices only: nothing is decoded for skipped batches
        return DataLoader(base.dataset, batch_sampler=batches, num_workers=base.num_workers,
                          collate_fn=base.collate_fn, worker_init_fn=base.worker_init_fn, generator=base.generator)

    def batches_per_epoch(self) -> int:
        return len(self.loader(0))


class MetricsLog:
    """metrics.csv: a row per log window and per evaluation, appended as the run goes.

    Appending keeps every earlier row whole; a kill in the middle of a row leaves a cut last line,
    which ``read_metrics`` skips. On resume, the rows written after the checkpoint's iteration (work
    that is about to be redone) are dropped and the file is rewritten atomically, so the resumed log
    has no duplicates.
    """

    def __init__(self, path: Path, resume_iteration: int | None = None):
        self.path = path
        kept = []
        if resume_iteration is not None and path.exists():
            rows = read_metrics(path)
            kept = [r for r in rows if int(r["iteration"]) <= resume_iteration]
            if len(kept) < len(rows):
                log.info("metrics.csv: dropped %d row(s) written after iteration %d (they are redone)",
                         len(rows) - len(kept), resume_iteration)
        with atomic_open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict) -> None:
        try:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([_fmt(row.get(c, "")) for c in CSV_COLUMNS])
                f.flush()
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.path, e) from e
            raise

    def rows(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path: str | Path) -> list[dict]:
    """The complete rows of a metrics.csv (a last line cut short by a kill is left out)."""
    with open(path, newline="") as f:
        text = f.read()
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if None in row.values() or None in row:  # too few or too many fields
            continue
        try:
            int(row["iteration"])
        except (TypeError, ValueError):
            continue
        rows.append(row)
    return rows


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def check_finite(losses: dict[str, torch.Tensor], total: torch.Tensor, iteration: int) -> None:
    if torch.isfinite(total):
        return
    values = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in losses.items())
    raise NonFiniteLossError(
        f"iteration {iteration}: the loss is not finite ({values}); stopping without writing a checkpoint. "
        "Lower solver.lr, set solver.clip_grad_norm, or check the data (check-data).")


def _checked_on_main(check) -> None:
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
    run_dir = Path(cfg.train.out_dir) / cfg.train.name

    def check():
        preflight.check_writable(run_dir)
        if not resume and (run_dir / "last.pt").exists():
            raise ConfigError(f"{run_dir} already holds a run (last.pt); continue it with --resume "
                              f"{run_dir / 'last.pt'}, or choose another train.name")

    _checked_on_main(check)
    if resume and dist.is_main():
        for p in remove_stale_temps(run_dir):
            log.info("removed %s, a file left half-written when the run was killed", p)
    return run_dir


def optimizer_slots(cfg) -> int:
    """State tensors per parameter: AdamW 2 (moments), SGD 1 (momentum) or 0."""
    return 2 if cfg.optimizer == "adamw" else int(cfg.momentum > 0)


def train(cfg: Config, *, resume: str | None = None, resume_overrides: list[str] | tuple = (),
          show_progress: bool = True, stage=None) -> TrainResult:
    """Train as ``cfg`` says; with ``resume``, continue the run of that checkpoint exactly as it was
    configured (``resume_overrides`` may change only ``config.RESUME_OVERRIDABLE``).

    ``stage``: one step of a multi-step schedule (``alternating.AlternatingStep``): it loads the step's
    starting weights, freezes parts (``prepare``) and wraps the forward (``wrap``). A config with
    ``train.schedule=alternating`` given without one runs (or continues) the whole schedule.

    SIGINT/SIGTERM finish the current step, write last.pt and raise ``TrainingInterrupted``."""
    state = None
    if resume:
        state = load_checkpoint(resume)
        cfg = config_from_dict(state["config"])  # the run continues as it was configured
        if resume_overrides:
            cfg = apply_overrides(cfg, list(resume_overrides), allowed=RESUME_OVERRIDABLE,
                                  context=f"--resume {resume}: ")
    if stage is None and cfg.train.schedule == "alternating":
        from ..experiments.alternating import train_alternating  # which runs this function once per step
        return train_alternating(cfg, resume=resume, resume_overrides=resume_overrides, show_progress=show_progress)
    # Everything that can be checked without reading data, before reading any.
    preflight.check_run_length(cfg)
    device = preflight.check_device(cfg.train)
    preflight.check_weights_files(cfg.model)
    distributed = dist.init_from_env(device.type)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = prepare_run_dir(cfg, resume is not None)
    if resume and dist.is_main() and Path(resume).resolve().parent != run_dir.resolve():
        log.warning("%s is not in its run's folder %s (train.out_dir/train.name of its config, relative to the "
                    "current folder): the run continues there", resume, run_dir)
    seed_everything(cfg.train.seed)

    data = build_data(cfg.data, seed=cfg.train.seed)
    preflight.check_dataset_sizes(len(data.train), len(data.val), cfg.train.batch_size, dist.world_size())
    model = build_model(cfg.model, num_classes=len(data.class_names)).to(device)
    if cfg.train.channels_last:
        model.to_channels_last()
    if stage is not None:
        stage.prepare(model, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    s = cfg.solver
    if s.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    _checked_on_main(lambda: preflight.check_disk_space(
        run_dir, estimate_checkpoint_bytes(model, optimizer_slots(cfg.solver))))

    batches = EpochBatches(data.train, batch_size=cfg.train.batch_size, num_workers=cfg.data.workers,
                           seed=cfg.train.seed, aspect_grouping=cfg.data.aspect_grouping, distributed=distributed)
    per_epoch = max(batches.batches_per_epoch(), 1)
    total = cfg.train.iterations or math.ceil(cfg.train.epochs * per_epoch / s.accumulate)
    schedule = dict(total=total, warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor,
                    schedule=s.schedule, milestones=s.milestones, gamma=s.gamma)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, **schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")

    iteration, epoch, batch_in_epoch, best_ap = 0, 0, 0, -1.0
    sums, window = dict.fromkeys(LOSS_NAMES, 0.0), 0
    eval_pending = False
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        iteration, epoch, batch_in_epoch = state["iteration"], state["epoch"], state["batch_in_epoch"]
        best_ap = state["best_ap"]
        set_rng_state(state["rng"])
        if "log_window" in state:  # the partly filled logging window, so the next logged means are the same
            sums, window = {k: float(v) for k, v in state["log_window"]["sums"].items()}, state["log_window"]["window"]
        eval_pending = bool(state.get("eval_pending", False))
        log.info("resuming %s at iteration %d of %d", resume, iteration, total)

    last_pt = run_dir / "last.pt"
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
        log.info("run folder %s: %s on %s, %d training / %d validation images, %d classes, %d iterations "
                 "of batch %d x %d process(es)", run_dir, cfg.model.arch, device, len(data.train), len(data.val),
                 len(data.class_names) - 1, total, cfg.train.batch_size, dist.world_size())
        log.info("Ctrl-C stops after the current step and saves %s; continue a stopped or crashed run with: "
                 "fasterrcnn train --resume %s", last_pt, last_pt)
    metrics = MetricsLog(run_dir / "metrics.csv", iteration if state is not None else None) if dist.is_main() else None
    forward_model = stage.wrap(model) if stage is not None else model  # evaluated too
    # a stage trains part of the model, whose other parameters may get no gradient in a step
    train_model = DistributedDataParallel(forward_model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=stage is not None) if distributed else forward_model
    weights = {k: float(s.loss_weights.get(k, 1.0)) for k in LOSS_NAMES}

    def checkpoint_state(pending: bool, log_window: dict) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "iteration": iteration, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "best_ap": best_ap, "rng": rng_state(), "config": cfg.to_dict(), "arch": cfg.model.arch,
                "class_names": data.class_names, "label_to_cat_id": data.label_to_cat_id,
                "eval_pending": pending, "log_window": log_window}

    def save(*, pending: bool = False, is_best: bool = False) -> None:
        """Every rank calls this (the logging window is averaged over ranks); rank 0 writes."""
        log_window = {"sums": dist.mean_over_ranks(sums), "window": window}
        if dist.is_main():
            state = checkpoint_state(pending, log_window)
            if is_best:
                save_checkpoint(run_dir / "best.pt", state)
            save_checkpoint(last_pt, state)
            rows = metrics.rows()
            plot_losses(rows, run_dir / "losses.png")
            plot_ap_history(rows, run_dir / "ap.png")

    def run_evaluation() -> Evaluation:
        result = evaluate_model(forward_model, data.val, class_names=data.class_names,
                                label_to_cat_id=data.label_to_cat_id, ann_file=data.val_ann_file,
                                batch_size=cfg.train.batch_size, device=device, amp=cfg.train.amp,
                                show_progress=show_progress,
                                results_path=run_dir / "predictions.json")
        result.coco.to_json(run_dir / "eval.json")
        summary = result.summary()
        metrics.write({"kind": "eval", "iteration": iteration, "epoch": epoch, **{k: summary[k] for k in EVAL_COLUMNS}})
        log.info("evaluation at iteration %d: AP %.3f AP50 %.3f AP75 %.3f (VOC07 mAP50 %.3f) on %d images in %.1f s",
                 iteration, summary["AP"], summary["AP50"], summary["AP75"], summary["VOC07_mAP50"],
                 result.num_images, result.seconds)
        if result.coco.curves:
            plot_precision_recall(result.coco.curves, run_dir / "precision_recall.png",
                                  title=f"Precision-recall at IoU 0.5, iteration {iteration}")
        return result

    evaluation = None

    def evaluate_and_save() -> None:
        """The step's weights are saved first (marked: evaluation pending), so that a crash or a kill
        during a long evaluation loses nothing; a resumed run evaluates them before going on."""
        nonlocal evaluation, best_ap
        save(pending=True)
        is_best = False
        if dist.is_main() and (stage is None or stage.evaluates):
            evaluation = run_evaluation()
            is_best = evaluation.coco.AP > best_ap
            best_ap = max(best_ap, evaluation.coco.AP)
        save(is_best=is_best)
        dist.barrier()
        train_model.train()

    def stopped(signum: int) -> TrainingInterrupted:
        stop = TrainingInterrupted(signum, last_pt, iteration, total)
        if dist.is_main():
            log.warning("%s", stop)
        return stop

    def on_signal(signum: int) -> None:
        log.warning("%s received: finishing the current step, then saving %s (press Ctrl-C again to abort at once, "
                    "losing the work since the last checkpoint)", signal.Signals(signum).name, last_pt)

    progress = Progress(total=total, desc="train", unit="it", enabled=show_progress and dist.is_main(),
                        every=cfg.train.log_every)
    progress.update(iteration)
    start, window_start, window_images = time.perf_counter(), time.perf_counter(), 0
    saved_at = iteration if state is not None else None
    loader_iter = None
    try:
        with StopRequest(on_request=on_signal) as stop:
            if eval_pending:
                evaluate_and_save()
            loader_iter = iter(batches.loader(epoch, skip=batch_in_epoch))
            train_model.train()
            while iteration < total:
                if saved_at == iteration:  # a signal during the last evaluation or save: last.pt is current
                    signum = dist.max_over_ranks(stop.signum or 0)
                    if signum:
                        raise stopped(signum)
                optimizer.zero_grad(set_to_none=True)
                for _ in range(s.accumulate):
                    try:
                        images, targets = next(loader_iter)
                    except StopIteration:
                        epoch, batch_in_epoch = epoch + 1, 0
                        loader_iter = iter(batches.loader(epoch))
                        images, targets = next(loader_iter)
                    batch_in_epoch += 1
                    images = [im.to(device, non_blocking=True) for im in images]
                    targets = [{**{k: v.to(device, non_blocking=True) for k, v in t.items()},
                                "sample_seed": sample_seed(cfg.train.seed, iteration, int(t["image_id"]))}
                               for t in targets]
                    with autocast(device, cfg.train.amp):
                        losses = train_model(images, targets)
                    losses = {k: v.float() for k, v in losses.items()}
                    loss = sum(weights[k] * losses[k] for k in LOSS_NAMES)
                    check_finite(losses, loss, iteration + 1)
                    scaler.scale(loss / s.accumulate).backward()
                    for k in LOSS_NAMES:
                        sums[k] += float(losses[k].detach()) / s.accumulate
                    window_images += len(images) * dist.world_size()
                if s.clip_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, s.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                iteration += 1
                window += 1

                if iteration % cfg.train.log_every == 0 or iteration == total:
                    means = dist.mean_over_ranks({k: v / window for k, v in sums.items()})
                    rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                    lr = optimizer.param_groups[0]["lr"]
                    if metrics is not None:
                        metrics.write({"kind": "train", "iteration": iteration, "epoch": epoch, "lr": lr,
                                       "loss": sum(means.values()), **means, "images_per_s": rate})
                    progress.update(window, loss=f"{sum(means.values()):.3f}", lr=f"{lr:.4g}", img_s=f"{rate:.1f}",
                                    **{k.replace("loss_", ""): f"{v:.3f}" for k, v in means.items()})
                    sums, window = dict.fromkeys(LOSS_NAMES, 0.0), 0
                    window_images, window_start = 0, time.perf_counter()

                every = cfg.train.eval_every
                evaluate_now = iteration == total or bool(every and iteration % every == 0)
                # every rank agrees on stopping (the signal may have reached one rank only)
                signum = dist.max_over_ranks(stop.signum or 0) if iteration < total else 0
                if signum:
                    save(pending=evaluate_now)
                    dist.barrier()
                    raise stopped(signum)
                if evaluate_now:
                    evaluate_and_save()
                    saved_at = iteration
                elif cfg.train.checkpoint_every and iteration % cfg.train.checkpoint_every == 0:
                    save()
                    dist.barrier()
                    saved_at = iteration
    except Exception:  # (a stop on a signal is a KeyboardInterrupt, not caught here)
        if dist.is_main() and last_pt.exists():
            log.error("training failed at iteration %d; %s is whole: once the cause is fixed, continue with "
                      "fasterrcnn train --resume %s", iteration, last_pt, last_pt)
        raise
    finally:
        progress.close()
        loader_iter = None  # shut the loader's workers down now, even if a traceback keeps this frame
    return TrainResult(run_dir, iteration, evaluation, best_ap, time.perf_counter() - start)
