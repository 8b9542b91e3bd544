"""Backbones: a module mapping images [B, 3, H, W] to an ordered dict of feature maps, with
``out_channels`` stating their (common) channel count. Any module honouring that can drive
``FasterRCNN``.

    build_resnet_fpn:           ResNet C2..C5 -> FPN P2..P6 ("0", "1", "2", "3", "pool"), D channels
    resnet_fpn_backbone:        the same with torchvision's call (backbone_name=, weights=, ...)
    resnet_single_map_backbone: ResNet up to C4 (stride 16) or C5 (stride 32) -> {"0": map}
"""

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .fpn import FeaturePyramidNetwork
from .frozen_bn import FrozenBatchNorm2d
from .published import backbone_weights
from .resnet import RESNET_SPECS, STAGE_NAMES, NormLayer, ResNetBody, freeze_layers
from .weights import load_backbone_weights


class BackboneWithFPN(nn.Module):
    """``body``: any module mapping images to an ordered dict of maps whose channels are
    ``in_channels_list`` (finest first); the FPN turns them into ``out_channels``-channel maps."""

    def __init__(
        self,
        body: nn.Module,
        in_channels_list: list[int],
        out_channels: int = 256,
        fpn_norm: str = "none",
        extra_blocks: nn.Module | None = None,
    ):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, norm=fpn_norm, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


class SingleMapBackbone(nn.Module):
    def __init__(self, body: ResNetBody):
        super().__init__()
        self.body = body
        (stage,) = body.return_stages
        self.out_channels = body.stage_channels[stage]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.body(x)


def build_resnet_fpn(
    depth: int = 50,
    *,
    norm_layer: NormLayer = nn.BatchNorm2d,
    trainable_layers: int = 5,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    out_channels: int = 256,
    fpn_norm: str = "none",
    extra_blocks: nn.Module | None = None,
) -> BackboneWithFPN:
    """ResNet-``depth`` stages ``returned_layers`` (1..4) -> FPN: the builders' backbone. The body holds the
    stages up to the last returned one (as torchvision's)."""
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"returned_layers must be a subset of 1..4, got {list(returned_layers)}")
    return_stages = {STAGE_NAMES[k - 1]: str(i) for i, k in enumerate(returned_layers)}
    body = ResNetBody(depth, norm_layer=norm_layer, num_stages=max(returned_layers), return_stages=return_stages)
    freeze_layers(body, trainable_layers)
    in_channels_list = [body.stage_channels[s] for s in body.return_stages]
    return BackboneWithFPN(body, in_channels_list, out_channels, fpn_norm, extra_blocks=extra_blocks)


def resnet_fpn_backbone(
    *,
    backbone_name: str,
    weights: str | os.PathLike | None,
    norm_layer: NormLayer = FrozenBatchNorm2d,
    trainable_layers: int = 3,
    returned_layers: Sequence[int] | None = None,
    extra_blocks: nn.Module | None = None,
) -> BackboneWithFPN:
    """torchvision's ``resnet_fpn_backbone``, call for call: ``backbone_name`` "resnet18", "resnet34",
    "resnet50" or "resnet101"; ``weights`` None, an ImageNet checkpoint (path or URL) or a published name
    ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"), loaded into the trunk; ``trainable_layers`` 0..5 counted
    from layer4; ``returned_layers`` default [1, 2, 3, 4]; ``extra_blocks`` default the "pool" level. The FPN
    has 256 channels. ``FasterRCNN(resnet_fpn_backbone(backbone_name="resnet50", weights=None), num_classes=2)``
    is a detector."""
    depth = int(backbone_name[len("resnet") :]) if backbone_name.startswith("resnet") else -1
    if backbone_name != f"resnet{depth}" or depth not in RESNET_SPECS:
        raise ValueError(
            f"backbone_name must be one of {[f'resnet{d}' for d in sorted(RESNET_SPECS)]}, got {backbone_name!r}"
        )
    returned = list(returned_layers) if returned_layers is not None else [1, 2, 3, 4]
    backbone = build_resnet_fpn(
        depth, norm_layer=norm_layer, trainable_layers=5, returned_layers=returned, extra_blocks=extra_blocks
    )
    weights = backbone_weights(backbone_name, weights)
    if weights is not None:
        absent = tuple(f"{name}." for name in STAGE_NAMES[max(returned) :])
        load_backbone_weights({"": backbone.body}, weights, skip=absent)
    freeze_layers(backbone.body, trainable_layers)
    return backbone


def resnet_single_map_backbone(
    depth: int = 50, *, feature: str = "c4", norm_layer: NormLayer = nn.BatchNorm2d, trainable_layers: int = 5
) -> SingleMapBackbone:
    stages = {"c4": 3, "c5": 4}
    if feature not in stages:
        raise ValueError(f"feature must be 'c4' or 'c5', got {feature!r}")
    n = stages[feature]
    body = ResNetBody(depth, norm_layer=norm_layer, num_stages=n, return_stages={STAGE_NAMES[n - 1]: "0"})
    freeze_layers(body, trainable_layers)
    return SingleMapBackbone(body)
