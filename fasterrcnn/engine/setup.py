"""From a config to the objects a run needs: datasets, the model, the device.

Only this module (with the CLI) reads config objects; everything below takes plain arguments.
"""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from ..data import CocoDetection, VocDetection, generate
from ..data.base import DetectionDataset
from ..data.coco_names import COCO_CATEGORY_NAMES
from ..data.transforms import Compose, RandomHorizontalFlip, SeededAugmentation
from ..model import BUILDERS, FastRCNNPredictor
from ..model.faster_rcnn import FasterRCNN
from ..model.published import detector_weights
from ..model.weights import WeightsError, local_weights_file, read_state_dict
from .checkpoint import is_training_state, read_file
from .config import ConfigError, DataConfig, ModelConfig, config_from_dict
from .distributed import barrier, is_main

log = logging.getLogger("fasterrcnn")


@dataclass
class Data:
    train: DetectionDataset | None
    val: DetectionDataset
    class_names: list[str]  # index 0 is "__background__"
    label_to_cat_id: dict[int, int]
    val_ann_file: str | None  # the COCO json of the validation set, when it has one


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} asks for CUDA, but no GPU is available here (PyTorch "
            f"{torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'}); use cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s), "
            f"numbered 0..{torch.cuda.device_count() - 1}"
        )
    return device


def data_format(path: str, declared: str = "auto") -> str:
    """The format of a dataset path: "coco" for an instances json, "voc" for a VOC root, unless declared."""
    if declared != "auto":
        return declared
    return "coco" if path.endswith(".json") else "voc"


def open_dataset(
    path: str, images: str, fmt: str, split: str, classes: list[str], transforms=None, drop_empty: bool = False
):
    if data_format(path, fmt) == "coco":
        return CocoDetection(path, images or None, transforms=transforms, drop_empty=drop_empty)
    kwargs: dict[str, Any] = {"classes": classes} if classes else {}
    return VocDetection(path, split=split, transforms=transforms, drop_empty=drop_empty, **kwargs)


def build_data(cfg: DataConfig, *, train: bool = True, seed: int = 0) -> Data:
    """The datasets of a run. The training set's random transforms are seeded per image and epoch
    from ``seed`` (``SeededAugmentation``), so that they do not depend on the loader's workers."""
    if not cfg.train:  # the built-in synthetic dataset, generated once (by rank 0) and reused

        def synth():
            return generate(
                cfg.synth_dir,
                num_train=cfg.synth_num_train,
                num_val=cfg.synth_num_val,
                seed=cfg.synth_seed,
                image_size=tuple(cfg.synth_size),
            )

        paths = synth() if is_main() else None
        barrier()
        paths = paths or synth()  # the other ranks reuse rank 0's files
        train_path, train_images = str(paths.train_json), str(paths.train_images)
        val_path, val_images, fmt = str(paths.val_json), str(paths.val_images), "coco"
    else:
        train_path, train_images, fmt = cfg.train, cfg.train_images, cfg.format
        val_path, val_images = cfg.val or cfg.train, cfg.val_images or cfg.train_images
        if not cfg.val and data_format(cfg.train, fmt) == "voc" and cfg.voc_val_split != cfg.voc_train_split:
            log.info(
                "data.val is not set: evaluating on the split %r (data.voc_val_split) of the VOC root %s",
                cfg.voc_val_split,
                cfg.train,
            )
        elif not cfg.val:
            log.warning(
                "data.val is not set: evaluating on the training data (%s), which says little about "
                "generalisation; set data.val to a validation set",
                cfg.train,
            )
    transforms = SeededAugmentation(Compose([RandomHorizontalFlip(cfg.hflip)]), seed) if cfg.hflip > 0 else None
    train_ds = (
        open_dataset(train_path, train_images, fmt, cfg.voc_train_split, cfg.voc_classes, transforms, cfg.drop_empty)
        if train
        else None
    )
    val_ds = open_dataset(val_path, val_images, fmt, cfg.voc_val_split, cfg.voc_classes)
    reference = train_ds if train_ds is not None else val_ds
    if train_ds is not None and list(train_ds.class_names) != list(val_ds.class_names):
        raise ConfigError(
            f"the training classes {train_ds.class_names[1:]} differ from the validation classes "
            f"{val_ds.class_names[1:]}"
        )
    for ds in (train_ds, val_ds):
        if ds is not None and len(ds.report):
            log.warning(
                "%s (fasterrcnn check-data %s lists them)",
                ds.report.summary(),
                getattr(ds, "ann_file", getattr(ds, "root", "")),
            )
    label_to_cat_id = dict(
        getattr(reference, "label_to_cat_id", None) or {i: i for i in range(1, len(reference.class_names))}
    )
    return Data(
        train_ds,
        val_ds,
        list(reference.class_names),
        label_to_cat_id,
        str(val_path) if data_format(val_path, fmt) == "coco" else None,
    )


def build_model(cfg: ModelConfig, num_classes: int) -> FasterRCNN:
    """The configured builder for ``num_classes`` (including background).

    With ``weights`` trained on other classes (the fine-tuning case), every weight is loaded but the
    class-specific predictor, which is re-initialised for the new classes.
    """
    if cfg.arch not in BUILDERS:
        raise ConfigError(f"model.arch {cfg.arch!r} is not one of {sorted(BUILDERS)}")
    builder = cast(Callable[..., FasterRCNN], BUILDERS[cfg.arch])  # the dict's values are functions and partials
    kwargs = dict(cfg.options)
    if cfg.trainable_backbone_layers is not None:
        kwargs["trainable_backbone_layers"] = cfg.trainable_backbone_layers
    if cfg.weights_backbone:
        kwargs["weights_backbone"] = cfg.weights_backbone
    try:
        if not cfg.weights:
            return builder(num_classes=num_classes, **kwargs)
        weights = detector_weights(cfg.arch, cfg.weights)  # a published name ("DEFAULT"): its URL
        state = read_state_dict(weights)
        key = "roi_heads.box_predictor.cls_score.weight"
        theirs = state[key].shape[0] if key in state else None
        model = builder(weights=weights, num_classes=theirs, **kwargs)
    except TypeError as e:  # an option the builder does not take
        raise ConfigError(f"model.options: {e}") from None
    except WeightsError as e:  # e.g. weights of another architecture: say which setting to change
        if "do not fit" not in str(e) and "has no" not in str(e):
            raise
        raise WeightsError(
            f"{e}\nmodel.arch is {cfg.arch!r}: use weights made for it, or set model.arch to the "
            "architecture they were made for"
        ) from None
    if theirs != num_classes:
        predictor = model.roi_heads.box_predictor
        in_features = cast(torch.nn.Linear, predictor.cls_score).in_features  # the builders' FastRCNNPredictor
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
        log.info(
            "fine-tuning: loaded every weight of %s but the box predictor, re-initialised for %d classes "
            "(the checkpoint has %d)",
            cfg.weights,
            num_classes,
            theirs,
        )
    return model


def load_model_for_inference(
    weights: str | os.PathLike, *, arch: str = "fasterrcnn_resnet50_fpn", device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, list[str], dict[int, int]]:
    """A model ready for inference from one of our training checkpoints (which carry their config
        and class names) or a torchvision-format detector checkpoint (built with ``arch``; then COCO's
        names on its 91-index layout). ``weights``: a path, a URL read through torch.hub's cache, or a name
    torchvision publishes for ``arch`` ("DEFAULT", "COCO_V1").

        -> (model in eval mode, class names with "__background__" first, label -> category id)."""
    if arch in BUILDERS:
        weights = detector_weights(arch, weights)  # a published name ("DEFAULT", "COCO_V1"): its URL
    path = local_weights_file(weights)  # a URL: through torch.hub's cache
    state = read_file(path)
    if is_training_state(state):
        cfg = config_from_dict(state["config"])
        class_names = list(state["class_names"])
        model = build_model(ModelConfig(arch=cfg.model.arch, options=cfg.model.options), len(class_names))
        model.load_state_dict(state["model"])
        label_to_cat_id = {int(k): int(v) for k, v in state["label_to_cat_id"].items()}
    else:
        if arch not in BUILDERS:
            raise ConfigError(f"arch {arch!r} is not one of {sorted(BUILDERS)}")
        try:
            model = cast(Callable[..., FasterRCNN], BUILDERS[arch])(weights=path)
        except WeightsError as e:  # a bare state_dict names no architecture: say which one was assumed
            raise WeightsError(
                f"{e}\n  {weights} holds a bare state_dict (no architecture recorded), so the model "
                f"was built as --arch {arch}; pass the --arch it was trained with "
                f"(one of {', '.join(sorted(BUILDERS))})"
            ) from None
        class_names = ["__background__"] + [
            COCO_CATEGORY_NAMES.get(i, f"class_{i}") for i in range(1, model.num_classes)
        ]
        label_to_cat_id = {i: i for i in range(1, model.num_classes)}
    return model.to(device).eval(), class_names, label_to_cat_id
