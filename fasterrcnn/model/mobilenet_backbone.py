"""MobileNetV3 backbones for detection, with torchvision's ``mobilenet_backbone`` call.

    mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True)
        fpn=True:  body blocks 13 and 16 (Large: both stride 32, 160 and 960 channels) -> FPN -> "0", "1" and
                   "pool" (stride 64), 256 channels; keys backbone.body.<block>..., backbone.fpn...
        fpn=False: the whole trunk, then a 1x1 conv to 256 channels: [B, 3, H, W] -> [B, 256, H/32, W/32]
``trainable_layers`` counts stages from the end (0..6 for Large: the last conv, the blocks from 13, from 7,
from 4, from 2, everything), as torchvision counts them. ``weights``: an ImageNet MobileNetV3 checkpoint
(torchvision's ``features.*`` and ``classifier.*`` keys, the classifier skipped) as a path, a URL or a
published name ("DEFAULT", "IMAGENET1K_V1"), or a detector checkpoint whose ``backbone.body.*`` is taken.
"""

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .backbone import BackboneWithFPN
from .frozen_bn import FrozenBatchNorm2d
from .mobilenet import MobileNetV3Body, NormLayer, freeze_stages
from .published import backbone_weights
from .weights import check_compatible, read_state_dict


class MobileNetTrunk(nn.Sequential):
    """``fpn=False``: the trunk, then a 1x1 conv to ``out_channels``; returns {"0": map} like every backbone."""

    def __init__(self, body: MobileNetV3Body, out_channels: int = 256):
        super().__init__(body, nn.Conv2d(body.channels(len(body) - 1), out_channels, 1))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        (features,) = self[0](x).values()
        return OrderedDict([("0", self[1](features))])


def load_mobilenet_weights(body: MobileNetV3Body, source: str | os.PathLike) -> None:
    """An ImageNet MobileNetV3 checkpoint (``features.*``) or a detector's ``backbone.body.*`` into ``body``,
    strictly but for BatchNorm's step counters and the classifier."""
    state = read_state_dict(source)
    for prefix in ("backbone.body.", "features."):
        if any(k.startswith(prefix) for k in state):
            state = OrderedDict((k[len(prefix) :], v) for k, v in state.items() if k.startswith(prefix))
            break
    state = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    check_compatible(body, state, os.fspath(source), ignore=("num_batches_tracked",))
    body.load_state_dict(state, strict=False)  # strict but for the step counters (checked above)


def mobilenet_backbone(
    *,
    backbone_name: str = "mobilenet_v3_large",
    weights: str | os.PathLike | None = None,
    fpn: bool = True,
    norm_layer: NormLayer = FrozenBatchNorm2d,
    trainable_layers: int = 2,
    returned_layers: Sequence[int] | None = None,
    extra_blocks: nn.Module | None = None,
    out_channels: int = 256,
    dilated: bool = False,
) -> nn.Module:
    """A MobileNetV3 (Large or Small) backbone, with or without an FPN (see the module docstring).
    ``returned_layers``: stage numbers (default the last two) whose first block feeds the FPN."""
    body = MobileNetV3Body(backbone_name, norm_layer=norm_layer, dilated=dilated)
    weights = backbone_weights(backbone_name, weights)
    if weights is not None:
        load_mobilenet_weights(body, weights)
    freeze_stages(body, trainable_layers)
    if not fpn:
        return MobileNetTrunk(body, out_channels)
    stages = body.stage_indices
    returned = list(returned_layers) if returned_layers is not None else [len(stages) - 2, len(stages) - 1]
    if not returned or min(returned) < 0 or max(returned) >= len(stages):
        raise ValueError(f"returned_layers must be stage numbers in [0, {len(stages) - 1}], got {returned}")
    body.return_blocks = {stages[k]: str(i) for i, k in enumerate(returned)}
    channels = [body.channels(stages[k]) for k in returned]
    return BackboneWithFPN(body, channels, out_channels, extra_blocks=extra_blocks)
