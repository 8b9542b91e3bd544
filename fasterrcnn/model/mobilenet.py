"""MobileNetV3 (Howard et al. 2019) as a detection trunk: the ImageNet network's ``features``, without
its classifier. Inverted residual blocks (1x1 expansion, depthwise kxk, optional squeeze-excitation,
1x1 linear projection, a residual when the shape is kept), hardswish in the later stages.

Shapes (Large, input [B, 3, H, W]; block i of ``MobileNetV3Body`` is ``body[i]``):
    0       stem: 3x3 conv stride 2 + norm + hardswish             -> [B, 16, H/2, W/2]
    1       block k3 e16 -> 16                                      -> [B, 16, H/2, W/2]
    2-3     blocks -> 24, block 2 strided                           -> [B, 24, H/4, W/4]
    4-6     k5 + SE blocks -> 40, block 4 strided                   -> [B, 40, H/8, W/8]
    7-12    hardswish blocks -> 80, then 112 (SE from block 11)     -> [B, 112, H/16, W/16]
    13-15   k5 + SE blocks -> 160, block 13 strided (dilated: not)  -> [B, 160, H/32, W/32]
    16      last 1x1 conv + norm + hardswish                        -> [B, 960, H/32, W/32]
The stages (torchvision's meaning, for freezing and for the FPN) start at the stem, at every strided
block and at the last conv: indices 0, 2, 4, 7, 13, 16 for Large. Module names and the order of
parameters are those of torchvision's ``mobilenet_v3_large().features``, so its ImageNet checkpoints and
its detectors' ``backbone.body.*`` keys load as they are.

Each conv + norm (+ activation) is an ``nn.Sequential``: ``fast_path.fold_batchnorm`` folds the pair.
"""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]


@dataclass(frozen=True)
class BlockSpec:
    """One inverted residual block (the rows of the paper's Tables 1 and 2)."""

    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    hardswish: bool
    stride: int
    dilation: int = 1


def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of ``divisor`` to ``value``, never more than 10% below it (the paper's rounding)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def large_specs(*, reduced_tail: bool = False, dilated: bool = False) -> list[BlockSpec]:
    r, d = (2 if reduced_tail else 1), (2 if dilated else 1)
    return [
        BlockSpec(16, 3, 16, 16, False, False, 1),
        BlockSpec(16, 3, 64, 24, False, False, 2),
        BlockSpec(24, 3, 72, 24, False, False, 1),
        BlockSpec(24, 5, 72, 40, True, False, 2),
        BlockSpec(40, 5, 120, 40, True, False, 1),
        BlockSpec(40, 5, 120, 40, True, False, 1),
        BlockSpec(40, 3, 240, 80, False, True, 2),
        BlockSpec(80, 3, 200, 80, False, True, 1),
        BlockSpec(80, 3, 184, 80, False, True, 1),
        BlockSpec(80, 3, 184, 80, False, True, 1),
        BlockSpec(80, 3, 480, 112, True, True, 1),
        BlockSpec(112, 3, 672, 112, True, True, 1),
        BlockSpec(112, 5, 672, 160 // r, True, True, 2, d),
        BlockSpec(160 // r, 5, 960 // r, 160 // r, True, True, 1, d),
        BlockSpec(160 // r, 5, 960 // r, 160 // r, True, True, 1, d),
    ]


def small_specs(*, reduced_tail: bool = False, dilated: bool = False) -> list[BlockSpec]:
    r, d = (2 if reduced_tail else 1), (2 if dilated else 1)
    return [
        BlockSpec(16, 3, 16, 16, True, False, 2),
        BlockSpec(16, 3, 72, 24, False, False, 2),
        BlockSpec(24, 3, 88, 24, False, False, 1),
        BlockSpec(24, 5, 96, 40, True, True, 2),
        BlockSpec(40, 5, 240, 40, True, True, 1),
        BlockSpec(40, 5, 240, 40, True, True, 1),
        BlockSpec(40, 5, 120, 48, True, True, 1),
        BlockSpec(48, 5, 144, 48, True, True, 1),
        BlockSpec(48, 5, 288, 96 // r, True, True, 2, d),
        BlockSpec(96 // r, 5, 576 // r, 96 // r, True, True, 1, d),
        BlockSpec(96 // r, 5, 576 // r, 96 // r, True, True, 1, d),
    ]


SPECS = {"mobilenet_v3_large": large_specs, "mobilenet_v3_small": small_specs}


class ConvNormActivation(nn.Sequential):
    """conv (no bias) -> norm -> activation (or none): keys ``0.weight``, ``1.*`` as in torchvision."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        *,
        norm_layer: NormLayer,
        activation: type[nn.Module] | None,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ):
        padding = (kernel - 1) // 2 * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, groups=groups, bias=False),
            norm_layer(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(mean over H, W of x)))): a per-channel gate from the whole map.
    [B, C, H, W] -> [B, C, H, W]; fc1, fc2 are 1x1 convs (C -> S -> C) on the [B, C, 1, 1] means."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """[B, in, H, W] -> expand 1x1 (unless expanded == in) -> depthwise kxk (stride, or dilation) -> SE ->
    project 1x1 (no activation) -> [B, out, H/s, W/s], plus the input when stride 1 and in == out."""

    def __init__(self, spec: BlockSpec, norm_layer: NormLayer):
        super().__init__()
        act = nn.Hardswish if spec.hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if spec.expanded != spec.in_channels:
            layers.append(ConvNormActivation(spec.in_channels, spec.expanded, 1, norm_layer=norm_layer, activation=act))
        layers.append(
            ConvNormActivation(
                spec.expanded,
                spec.expanded,
                spec.kernel,
                norm_layer=norm_layer,
                activation=act,
                stride=1 if spec.dilation > 1 else spec.stride,
                dilation=spec.dilation,
                groups=spec.expanded,
            )
        )
        if spec.use_se:
            layers.append(SqueezeExcitation(spec.expanded, make_divisible(spec.expanded // 4)))
        layers.append(ConvNormActivation(spec.expanded, spec.out_channels, 1, norm_layer=norm_layer, activation=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = spec.stride == 1 and spec.in_channels == spec.out_channels
        self.out_channels = spec.out_channels
        self.starts_stage = spec.stride > 1  # a strided block begins a new stage (torchvision's _is_cn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


def default_norm(channels: int) -> nn.Module:
    """The ImageNet network's own BatchNorm (eps 1e-3, momentum 0.01)."""
    return nn.BatchNorm2d(channels, eps=0.001, momentum=0.01)


class MobileNetV3Body(nn.Sequential):
    """The trunk: children "0" (stem) .. "16" (last conv) for Large. ``forward`` returns an ordered dict of
    the outputs of the blocks in ``return_blocks`` ({block index: output name}), or the last block's
    output under "0" when it is empty."""

    def __init__(
        self,
        arch: str = "mobilenet_v3_large",
        *,
        norm_layer: NormLayer = default_norm,
        reduced_tail: bool = False,
        dilated: bool = False,
        return_blocks: dict[int, str] | None = None,
    ):
        if arch not in SPECS:
            raise ValueError(f"arch must be one of {sorted(SPECS)}, got {arch!r}")
        specs = SPECS[arch](reduced_tail=reduced_tail, dilated=dilated)
        layers: list[nn.Module] = [
            ConvNormActivation(3, specs[0].in_channels, 3, norm_layer=norm_layer, activation=nn.Hardswish, stride=2)
        ]
        layers += [InvertedResidual(s, norm_layer) for s in specs]
        last_in = specs[-1].out_channels
        layers.append(ConvNormActivation(last_in, 6 * last_in, 1, norm_layer=norm_layer, activation=nn.Hardswish))
        super().__init__(*layers)
        self.stage_indices = (
            [0] + [i for i, b in enumerate(self) if getattr(b, "starts_stage", False)] + [len(self) - 1]
        )
        self.return_blocks = dict(return_blocks or {len(self) - 1: "0"})
        bad = [i for i in self.return_blocks if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"return_blocks: no block {bad} (the body has {len(self)})")
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def channels(self, index: int) -> int:
        """Output channels of block ``index``."""
        channels = self[index].out_channels
        assert isinstance(channels, int)
        return channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        last = max(self.return_blocks)
        for i, block in enumerate(self):
            x = block(x)
            if i in self.return_blocks:
                out[self.return_blocks[i]] = x
            if i == last:
                break
        return out


def freeze_stages(body: MobileNetV3Body, trainable_layers: int) -> None:
    """Leave the last ``trainable_layers`` stages trainable (0..len(stage_indices), torchvision's meaning):
    every block before the first trainable stage's first block gets requires_grad=False."""
    num_stages = len(body.stage_indices)
    if not 0 <= trainable_layers <= num_stages:
        raise ValueError(f"trainable_backbone_layers must be in [0, {num_stages}], got {trainable_layers}")
    freeze_before = len(body) if trainable_layers == 0 else body.stage_indices[num_stages - trainable_layers]
    for block in list(body)[:freeze_before]:
        block.requires_grad_(False)


def count_stages(arch: str) -> int:
    """How many stages ``trainable_layers`` counts for ``arch`` (6 for both)."""
    return 2 + sum(s.stride > 1 for s in SPECS[arch]())
