"""What a builder makes of its ``weights``, ``weights_backbone``, ``trainable_backbone_layers`` and
``num_classes`` (names already resolved to files by published.py): the detector checkpoint's contents, the
class count (the checkpoint's unless given; 91, COCO's layout, without either), whether the model starts
from trained weights, and how many backbone layers train (default 3 from trained weights, all of them from
scratch; freezing a random network would only freeze noise, so fewer than all is refused there)."""

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .weights import read_detector_checkpoint


@dataclass(frozen=True)
class BuilderStart:
    state_dict: "OrderedDict[str, torch.Tensor] | None"  # the detector checkpoint's, when weights are given
    num_classes: int
    is_trained: bool  # weights or weights_backbone given
    trainable_layers: int


def builder_start(
    weights: str | os.PathLike | None,
    weights_backbone: str | os.PathLike | None,
    trainable_backbone_layers: int | None,
    num_classes: int | None,
    *,
    all_layers: int,
) -> BuilderStart:
    """``all_layers``: the backbone's trainable layer count when every layer trains (5 ResNet, 6 MobileNetV3)."""
    state_dict = None
    if weights is not None:
        state_dict, found_classes = read_detector_checkpoint(weights)
        num_classes = found_classes if num_classes is None else num_classes
    is_trained = weights is not None or weights_backbone is not None
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3 if is_trained else all_layers
    elif not is_trained and trainable_backbone_layers != all_layers:
        raise ValueError(
            f"trainable_backbone_layers < {all_layers} freezes layers, which only makes sense with weights or "
            "weights_backbone; without them every layer must train"
        )
    return BuilderStart(state_dict, 91 if num_classes is None else num_classes, is_trained, trainable_backbone_layers)
