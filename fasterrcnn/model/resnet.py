"""ResNet-18/34/50/101 bodies (He et al. 2016), the stages a detector reads its features from.

Shapes (input [B, 3, H, W]):
    stem (conv1 7x7/2, bn1, relu, maxpool 3x3/2)  -> [B,  64, H/4,  W/4]
    layer1 (C2, stride 4)                        -> [B,  64*e, H/4,  W/4]
    layer2 (C3, stride 8)                        -> [B, 128*e, H/8,  W/8]
    layer3 (C4, stride 16)                       -> [B, 256*e, H/16, W/16]
    layer4 (C5, stride 32)                       -> [B, 512*e, H/32, W/32]
with e = 1 for BasicBlock (18, 34) and e = 4 for Bottleneck (50, 101). The classifier (avgpool, fc)
is left out. Module names (conv1, bn1, layer1.0.conv1, ...) are those of the ImageNet checkpoints
people have, so those load by name. Bottleneck puts the stride on its 3x3 conv ("ResNet v1.5").
A FrozenBatchNorm2d is folded into the conv before it on the fly (``conv_norm.conv_norm``): same
parameters and state_dict, one pass over each feature map instead of three.
"""

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .conv_norm import conv_norm

NormLayer = Callable[[int], nn.Module]

# depth -> (block kind, blocks per stage)
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else shortcut(self.downsample, x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        out += identity  # in place: the conv's output is not needed for its backward
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else shortcut(self.downsample, x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        out += identity  # in place: the conv's output is not needed for its backward
        return self.relu(out)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer):
    """A 1x1 projection when the block changes shape, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(out_channels))


def shortcut(downsample: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The projection shortcut (conv, norm), with a frozen norm folded into the conv."""
    if len(downsample) == 2:
        return conv_norm(downsample[0], downsample[1], x)
    return downsample(x)


def make_stage(
    block: type, in_channels: int, width: int, num_blocks: int, stride: int, norm_layer: NormLayer
) -> nn.Sequential:
    blocks = [block(in_channels, width, stride, norm_layer)]
    blocks += [block(width * block.expansion, width, 1, norm_layer) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNetBody(nn.Module):
    """The stem and the first ``num_stages`` stages of a ResNet.

    ``forward`` returns an ordered dict {output name: feature map} for the stages listed in
    ``return_stages`` (e.g. {"layer1": "0", "layer4": "3"}).
    """

    def __init__(
        self,
        depth: int = 50,
        *,
        norm_layer: NormLayer = nn.BatchNorm2d,
        num_stages: int = 4,
        return_stages: dict[str, str] | None = None,
    ):
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {depth}")
        kind, blocks_per_stage = RESNET_SPECS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.block = block
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        self.stage_channels: dict[str, int] = {}
        for i, name in enumerate(STAGE_NAMES[:num_stages]):
            width = 64 * 2**i
            stage = make_stage(block, in_channels, width, blocks_per_stage[i], 1 if i == 0 else 2, norm_layer)
            self.add_module(name, stage)
            in_channels = width * block.expansion
            self.stage_channels[name] = in_channels
        self.return_stages = dict(return_stages or {STAGE_NAMES[num_stages - 1]: "0"})
        unknown = set(self.return_stages) - set(self.stage_channels)
        if unknown:
            raise ValueError(f"return_stages names stages this body does not have: {sorted(unknown)}")
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        # ReLU after the max-pool: the two commute (max of ReLUs = ReLU of the max), and the ReLU then
        # runs on a quarter of the pixels
        x = self.relu(self.maxpool(conv_norm(self.conv1, self.bn1, x)))
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in self.stage_channels:
            x = getattr(self, name)(x)
            if name in self.return_stages:
                out[self.return_stages[name]] = x
        return out


def freeze_layers(body: nn.Module, trainable_layers: int) -> None:
    """Leave only the last ``trainable_layers`` of (conv1, layer1..layer4) trainable (0..5).

    With 5, the stem's norm (bn1) trains too. Frozen parameters get requires_grad=False.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable_layers}")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, param in body.named_parameters():
        if not any(name == t or name.startswith(t + ".") for t in trainable):
            param.requires_grad_(False)
