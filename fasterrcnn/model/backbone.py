"""Backbones: a module mapping images [B, 3, H, W] to an ordered dict of feature maps, with
``out_channels`` stating their (common) channel count. Any module honouring that can drive
``FasterRCNN``.

    resnet_fpn_backbone:        ResNet C2..C5 -> FPN P2..P6 ("0", "1", "2", "3", "pool"), D channels
    resnet_single_map_backbone: ResNet up to C4 (stride 16) or C5 (stride 32) -> {"0": map}
"""

from collections import OrderedDict

import torch
from torch import nn

from .fpn import FeaturePyramidNetwork
from .resnet import STAGE_NAMES, NormLayer, ResNetBody, freeze_layers


class BackboneWithFPN(nn.Module):
    """``body``: any module mapping images to an ordered dict of maps whose channels are
    ``in_channels_list`` (finest first); the FPN turns them into ``out_channels``-channel maps."""

    def __init__(self, body: nn.Module, in_channels_list: list[int], out_channels: int = 256, fpn_norm: str = "none"):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, norm=fpn_norm)
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


def resnet_fpn_backbone(
    depth: int = 50,
    *,
    norm_layer: NormLayer = nn.BatchNorm2d,
    trainable_layers: int = 5,
    returned_layers: tuple[int, ...] = (1, 2, 3, 4),
    out_channels: int = 256,
    fpn_norm: str = "none",
) -> BackboneWithFPN:
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"returned_layers must be a subset of 1..4, got {returned_layers}")
    return_stages = {STAGE_NAMES[k - 1]: str(i) for i, k in enumerate(returned_layers)}
    body = ResNetBody(depth, norm_layer=norm_layer, num_stages=4, return_stages=return_stages)
    freeze_layers(body, trainable_layers)
    in_channels_list = [body.stage_channels[s] for s in body.return_stages]
    return BackboneWithFPN(body, in_channels_list, out_channels, fpn_norm)


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
