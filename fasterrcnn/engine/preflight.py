"""Checks that run before a training run spends any time: each failure says what to change.

Order in ``train``: the config (``config.validate``, when it is read), the run length, the device,
the weights files, and the run folder -- all before any data is read; then, once the data and the
model exist, the dataset sizes and the free disk space for checkpoints -- before the first step.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..files import format_bytes, free_bytes
from ..model.weights import is_url
from .config import Config, ConfigError, ModelConfig, TrainConfig
from .setup import resolve_device

# A run keeps last.pt and best.pt, and writes each through a temporary copy next to it.
CHECKPOINT_COPIES = 3


def check_run_length(cfg: Config) -> None:
    if cfg.train.iterations <= 0 and cfg.train.epochs <= 0:
        raise ConfigError("set train.iterations or train.epochs to a positive number (both are 0)")


def check_device(cfg: TrainConfig) -> torch.device:
    """The device the config asks for, if this machine has it (and fp16 only where it exists)."""
    device = resolve_device(cfg.device)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.amp=fp16 needs a CUDA device, and this run is on {device.type}; "
                          "on the CPU use train.amp=bf16 or none")
    return device


def check_weights_files(cfg: ModelConfig) -> None:
    """model.weights / model.weights_backbone name files that exist (URLs are fetched when the model
    is built; what the files hold is checked then too, before the first step)."""
    for key in ("weights", "weights_backbone"):
        source = getattr(cfg, key)
        if source and not is_url(source) and not os.path.isfile(source):
            raise ConfigError(f"model.{key}={source!r}: file not found")


def check_writable(run_dir: Path) -> None:
    """The run folder exists (or can be made) and takes a file."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the run folder {run_dir}: {e.strerror or e}; set train.out_dir to a "
                          "folder you can write (or train.name to another run)") from None


def check_dataset_sizes(num_train: int, num_val: int, batch_size: int, world_size: int) -> None:
    per_step = batch_size * world_size
    if num_train < per_step:
        raise ConfigError(f"the training set has {num_train} usable image(s), fewer than one batch "
                          f"(train.batch_size={batch_size} x {world_size} process(es)); lower train.batch_size "
                          "or add images")
    if num_val < 1:
        raise ConfigError("the validation set has no usable image; set data.val to a dataset with images")


def check_disk_space(run_dir: Path, checkpoint_bytes: int) -> None:
    """Enough free space in ``run_dir`` for last.pt, best.pt and the temporary copy of one of them,
    counting the space of the checkpoints already there (a resumed run replaces them)."""
    existing = sum((run_dir / n).stat().st_size for n in ("last.pt", "best.pt") if (run_dir / n).is_file())
    needed = CHECKPOINT_COPIES * checkpoint_bytes - existing
    free = free_bytes(run_dir)
    if free < needed:
        raise ConfigError(
            f"not enough free disk space in {run_dir.resolve()}: a checkpoint of this model and optimizer is about "
            f"{format_bytes(checkpoint_bytes)}, a run keeps last.pt, best.pt and a temporary copy while writing, "
            f"so it needs about {format_bytes(needed)} more, and {format_bytes(free)} is free. Free some space "
            "there, or set train.out_dir to a folder on another disk")
