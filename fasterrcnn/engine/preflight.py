"""Checks before a run: what the machine, the files and the data hold, checked before a training run
spends any time; each failure says what to change. (The config's own values are checked when it is
read: ``config.check_values``, and ``model_options.option_problem`` for ``model.options``.)

Order in ``train``: the config (``config.check_values``, when it is read), the run length, the device,
the weights files, and the run folder -- all before any data is read; then, once the annotations
are read, the image files (training and validation), the training objects and the dataset sizes,
and once the model exists, the free disk space for checkpoints -- all before the first step.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..data.coco import load_json
from ..data.voc import scan_class_names
from ..files import format_bytes, free_bytes
from ..model.weights import is_url
from .config import Config, ConfigError, ModelConfig, TrainConfig
from .setup import resolve_device

log = logging.getLogger("fasterrcnn")

# A run keeps last.pt and best.pt, and writes each through a temporary copy next to it.
CHECKPOINT_COPIES = 3


def check_run_length(cfg: Config) -> None:
    if cfg.train.iterations <= 0 and cfg.train.epochs <= 0:
        raise ConfigError("set train.iterations or train.epochs to a positive number (both are 0)")
    if cfg.train.iterations > 0 and cfg.train.epochs > 0:
        raise ConfigError(
            f"train.iterations={cfg.train.iterations} and train.epochs={cfg.train.epochs} are both "
            "set: give one (the other 0)"
        )


def check_device(cfg: TrainConfig) -> torch.device:
    """The device the config asks for, if this machine has it (and fp16 only where it exists)."""
    device = resolve_device(cfg.device)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.amp=fp16 needs a CUDA device, and this run is on {device.type}; "
            "on the CPU use train.amp=bf16 or none"
        )
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
        raise ConfigError(
            f"cannot write to the run folder {run_dir}: {e.strerror or e}; set train.out_dir to a "
            "folder you can write (or train.name to another run)"
        ) from None


def check_dataset_sizes(num_train: int, num_val: int, batch_size: int, world_size: int) -> None:
    per_step = batch_size * world_size
    if num_train < per_step:
        raise ConfigError(
            f"the training set has {num_train} usable image(s), fewer than one batch "
            f"(train.batch_size={batch_size} x {world_size} process(es)); lower train.batch_size "
            "or add images"
        )
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
            "there, or set train.out_dir to a folder on another disk"
        )


def _annotation_source(dataset) -> str:
    if getattr(dataset, "ann_file", None) is not None:
        return str(dataset.ann_file)
    return f"{dataset.root} (split {dataset.split})" if hasattr(dataset, "split") else str(getattr(dataset, "root", ""))


def check_image_files(dataset, *, which: str, option: str) -> None:
    """Every image the annotations of ``dataset`` name exists (a stat per image, nothing decoded), so
    that a wrong image folder is found before training, not at the first evaluation."""
    records = getattr(dataset, "records", None)
    if not records:
        return
    missing = [r.path for r in records if not Path(r.path).is_file()]
    if not missing:
        return
    folder = Path(missing[0]).parent
    raise ConfigError(
        f"{_annotation_source(dataset)}: {len(missing)} of the {len(records)} {which} images are not found "
        f"(the first: {missing[0]}, looked for in {folder}); set {option} to the folder that holds them"
    )


def check_training_objects(dataset, *, voc_classes_option: bool) -> None:
    """The training set has objects (not crowd boxes) of the classes the model will learn: none at all
    is an error naming the file and what to set; some classes without any object is a warning."""
    records = getattr(dataset, "records", None)
    if records is None:
        return
    names = list(dataset.class_names[1:])
    counts = [0] * (len(names) + 1)
    crowd = 0
    for r in records:
        for label, is_crowd in zip(r.labels.tolist(), r.iscrowd.tolist()):
            if is_crowd:
                crowd += 1
            else:
                counts[label] += 1
    source = _annotation_source(dataset)
    if sum(counts[1:]) == 0:
        raise ConfigError(
            f"{source}: the training set has no object of the {len(names)} classes it would train "
            f"({_names(names)}): {_why_no_objects(dataset, crowd, voc_classes_option)}"
        )
    absent = [n for n, c in zip(names, counts[1:]) if c == 0]
    if absent:
        log.warning(
            "%s: %d of the %d classes have no object in the training set (the model learns nothing for them): %s",
            source,
            len(absent),
            len(names),
            _names(absent),
        )


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _why_no_objects(dataset, crowd: int, voc_classes_option: bool) -> str:
    if hasattr(dataset, "split") and not hasattr(dataset, "ann_file"):  # VOC: the class list may not fit
        found = scan_class_names(dataset.root, dataset.split)
        if found and not voc_classes_option:
            return (
                f"its XML files name the classes {_names(found)}, and data.voc_classes is not set (the 20 "
                f"VOC classes are used); set data.voc_classes={found}"
            )
        if found:
            return f"its XML files name the classes {_names(found)}: set data.voc_classes to them"
        return "its XML files have no object; add annotations, or set data.train to another dataset"
    if not crowd and getattr(dataset, "ann_file", None) is not None:  # crowd boxes are not kept as records
        annotations = load_json(dataset.ann_file).get("annotations") or []
        crowd = sum(1 for a in annotations if isinstance(a, dict) and a.get("iscrowd"))
    if crowd:
        return (
            f"its {crowd} annotation(s) are all crowd boxes (iscrowd=1), which train nothing; add annotations "
            "with iscrowd=0, or set data.train to another dataset"
        )
    return "it has no usable annotation (see the warnings above); add annotations, or set data.train to another dataset"
