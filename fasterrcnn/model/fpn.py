"""Feature Pyramid Network (Lin et al. 2017): one 256-channel map per stage, strong at every scale.

Shapes (inputs from a ResNet body, L inputs C2..C5 with channels in_channels_list):
    inner_blocks[i]: 1x1 conv      C_i [B, c_i, H_i, W_i] -> lateral [B, D, H_i, W_i]
    top-down:        lateral_i + nearest-upsample(merged_{i+1}) -> merged_i
    layer_blocks[i]: 3x3 conv      merged_i -> P_i [B, D, H_i, W_i]
    extra levels:    ``extra_blocks`` (torchvision's interface: ``forward(results, inputs, names) -> (results,
                     names)``); the default LastLevelMaxPool: P6 = max-pool(P5, kernel 1, stride 2)
                     -> [B, D, ceil(H_5/2), ceil(W_5/2)], named "pool"; LastLevelP6P7: two stride-2 3x3 convs
                     -> "p6", "p7" (RetinaNet's levels)
Outputs keep the input names ("0".."3") and add the extra levels' names.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> nn.Sequential:
    """A conv, then (optionally) a norm layer. Without a norm the conv sits alone in the Sequential:
    the keys (inner_blocks.0.0.weight) are the layout of torchvision's checkpoints."""
    if norm == "none":
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2))
    layer = {"bn": lambda: nn.BatchNorm2d(out_channels), "gn": lambda: nn.GroupNorm(32, out_channels)}
    if norm not in layer:
        raise ValueError(f"norm must be 'none', 'bn' or 'gn', got {norm!r}")
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False), layer[norm]()
    )


class LastLevelMaxPool(nn.Module):
    """The "pool" level: every other row and column of the last map (max-pool with kernel 1, stride 2), a
    strided view (no copy)."""

    def forward(
        self, results: list[torch.Tensor], inputs: list[torch.Tensor], names: list[str]
    ) -> tuple[list[torch.Tensor], list[str]]:
        return [*results, results[-1][:, :, ::2, ::2]], [*names, "pool"]


class LastLevelP6P7(nn.Module):
    """P6 = 3x3 stride-2 conv of P5 (of C5 when the channel counts differ), P7 = 3x3 stride-2 conv of
    relu(P6): the levels "p6" and "p7" (RetinaNet's); keys ``p6.weight``, ``p7.weight``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]  # a conv made with a bias
        self.use_p5 = in_channels == out_channels

    def forward(
        self, results: list[torch.Tensor], inputs: list[torch.Tensor], names: list[str]
    ) -> tuple[list[torch.Tensor], list[str]]:
        p6 = self.p6(results[-1] if self.use_p5 else inputs[-1])
        p7 = self.p7(F.relu(p6))
        return [*results, p6, p7], [*names, "p6", "p7"]


class FeaturePyramidNetwork(nn.Module):
    """``norm``: "none" (torchvision's v1 layout), "bn" or "gn" after every conv (trains faster from scratch).
    ``extra_blocks``: the levels above the last (default LastLevelMaxPool; None with ``extra_max_pool=False``)."""

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int = 256,
        *,
        extra_max_pool: bool = True,
        norm: str = "none",
        extra_blocks: nn.Module | None = None,
    ):
        super().__init__()
        self.inner_blocks = nn.ModuleList(conv_block(c, out_channels, 1, norm) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(conv_block(out_channels, out_channels, 3, norm) for _ in in_channels_list)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if extra_blocks is None and extra_max_pool:
            extra_blocks = LastLevelMaxPool()
        self.extra_blocks = extra_blocks
        self.out_channels = out_channels

    def forward(self, x: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
        names = list(x.keys())
        feats = list(x.values())
        merged = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](merged)]
        for i in range(len(feats) - 2, -1, -1):
            # in place: a conv's output, not needed for its backward
            merged = add_upsampled_(self.inner_blocks[i](feats[i]), merged)
            results.insert(0, self.layer_blocks[i](merged))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict(zip(names, results))


def add_upsampled_(lateral: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``lateral += nearest-upsample(coarse)`` to lateral's size, in place.

    For an exact 2x (the usual case: padded sizes divisible by 32) the upsampling is a broadcast over a
    [B, C, H/2, 2, W/2, 2] view of ``lateral``, so no upsampled map is allocated (on a CPU a fresh
    feature map costs page faults as well as the writes); otherwise F.interpolate's nearest."""
    h, w = lateral.shape[-2:]
    hc, wc = coarse.shape[-2:]
    if h == 2 * hc and w == 2 * wc:
        lateral.unflatten(2, (hc, 2)).unflatten(4, (wc, 2)).add_(coarse[:, :, :, None, :, None])
        return lateral
    return lateral.add_(F.interpolate(coarse, size=(h, w), mode="nearest"))
