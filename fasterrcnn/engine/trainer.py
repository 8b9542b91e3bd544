"""The training loop: approximate joint training of the RPN and the detector (the four losses
summed with configured weights), SGD or AdamW with warmup and step or cosine decay, optional
mixed precision, gradient clipping and accumulation, periodic evaluation, crash-safe checkpoints,
and DistributedDataParallel when launched by torchrun.

Outputs (rank 0) under runs/<name>/: config.yaml, last.pt, best.pt, metrics.csv, predictions.json
(the validation detections in COCO format), eval.json, and PNG plots.
"""
import csv
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..data import make_data_loader
from ..viz.precision_recall import plot_precision_recall
from ..viz.training import plot_ap_history, plot_losses
from . import distributed as dist
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, ConfigError, config_from_dict, save_config
from .evaluator import Evaluation, autocast, evaluate_model
from .progress import Progress
from .schedule import lr_factor
from .setup import build_data, build_model, resolve_device

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
    def __init__(self, path: Path, resume: bool):
        self.path = path
        if not resume or not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(CSV_COLUMNS)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in CSV_COLUMNS])
            f.flush()

    def rows(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def check_finite(losses: dict[str, torch.Tensor], total: torch.Tensor, iteration: int) -> None:
    if torch.isfinite(total):
        return
    values = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in losses.items())
    raise NonFiniteLossError(
        f"iteration {iteration}: the loss is not finite ({values}); stopping without writing a checkpoint. "
        "Lower solver.lr, set solver.clip_grad_norm, or check the data (check-data).")


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    if dist.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to the run folder {run_dir}: {e}; set train.out_dir or train.name") from None
        if not resume and (run_dir / "last.pt").exists():
            raise ConfigError(f"{run_dir} already holds a run (last.pt); continue it with --resume {run_dir / 'last.pt'}, "
                              "or choose another train.name")
    return run_dir


def train(cfg: Config, *, resume: str | None = None, show_progress: bool = True) -> TrainResult:
    state = None
    if resume:
        state = load_checkpoint(resume)
        cfg = config_from_dict(state["config"])  # the run continues as it was configured
    device = resolve_device(cfg.train.device)
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device; on the CPU use train.amp=bf16")
    distributed = dist.init_from_env(device.type)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = prepare_run_dir(cfg, resume is not None)
    seed_everything(cfg.train.seed)

    data = build_data(cfg.data)
    model = build_model(cfg.model, num_classes=len(data.class_names)).to(device)
    if cfg.train.channels_last:
        model.to_channels_last()
    params = [p for p in model.parameters() if p.requires_grad]
    s = cfg.solver
    if s.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)

    batches = EpochBatches(data.train, batch_size=cfg.train.batch_size, num_workers=cfg.data.workers,
                           seed=cfg.train.seed, aspect_grouping=cfg.data.aspect_grouping, distributed=distributed)
    per_epoch = max(batches.batches_per_epoch(), 1)
    total = cfg.train.iterations or math.ceil(cfg.train.epochs * per_epoch / s.accumulate)
    if total <= 0:
        raise ConfigError("set train.iterations or train.epochs to a positive number")
    schedule = dict(total=total, warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor,
                    schedule=s.schedule, milestones=s.milestones, gamma=s.gamma)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, **schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")

    iteration, epoch, batch_in_epoch, best_ap = 0, 0, 0, -1.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        iteration, epoch, batch_in_epoch = state["iteration"], state["epoch"], state["batch_in_epoch"]
        best_ap = state["best_ap"]
        set_rng_state(state["rng"])
        log.info("resuming %s at iteration %d of %d", resume, iteration, total)

    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
        log.info("run folder %s: %s on %s, %d training / %d validation images, %d classes, %d iterations "
                 "of batch %d x %d process(es)", run_dir, cfg.model.arch, device, len(data.train), len(data.val),
                 len(data.class_names) - 1, total, cfg.train.batch_size, dist.world_size())
    metrics = MetricsLog(run_dir / "metrics.csv", resume is not None) if dist.is_main() else None
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else model
    weights = {k: float(s.loss_weights.get(k, 1.0)) for k in LOSS_NAMES}

    def checkpoint_state() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "iteration": iteration, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "best_ap": best_ap, "rng": rng_state(), "config": cfg.to_dict(), "arch": cfg.model.arch,
                "class_names": data.class_names, "label_to_cat_id": data.label_to_cat_id}

    def run_evaluation() -> Evaluation:
        result = evaluate_model(model, data.val, class_names=data.class_names, label_to_cat_id=data.label_to_cat_id,
                                ann_file=data.val_ann_file, batch_size=cfg.train.batch_size, device=device,
                                amp=cfg.train.amp, show_progress=show_progress,
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

    loader_iter = iter(batches.loader(epoch, skip=batch_in_epoch))
    progress = Progress(total=total, desc="train", unit="it", enabled=show_progress and dist.is_main(),
                        every=cfg.train.log_every)
    progress.update(iteration)
    start, window_start, window_images = time.perf_counter(), time.perf_counter(), 0
    sums = dict.fromkeys(LOSS_NAMES, 0.0)
    window = 0
    evaluation = None
    train_model.train()
    while iteration < total:
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
                        "sample_seed": sample_seed(cfg.train.seed, iteration, int(t["image_id"]))} for t in targets]
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
            sums, window, window_images, window_start = dict.fromkeys(LOSS_NAMES, 0.0), 0, 0, time.perf_counter()

        evaluate_now = iteration == total or (cfg.train.eval_every and iteration % cfg.train.eval_every == 0)
        save_now = evaluate_now or (cfg.train.checkpoint_every and iteration % cfg.train.checkpoint_every == 0)
        if dist.is_main() and save_now:
            is_best = False
            if evaluate_now:
                evaluation = run_evaluation()
                is_best = evaluation.coco.AP > best_ap
                best_ap = max(best_ap, evaluation.coco.AP)
            state = checkpoint_state()
            if is_best:
                save_checkpoint(run_dir / "best.pt", state)
            save_checkpoint(run_dir / "last.pt", state)
            rows = metrics.rows()
            plot_losses(rows, run_dir / "losses.png")
            plot_ap_history(rows, run_dir / "ap.png")
        if evaluate_now or save_now:
            dist.barrier()
            train_model.train()
    progress.close()
    return TrainResult(run_dir, iteration, evaluation, best_ap, time.perf_counter() - start)
