"""Convolutions with their activation and residual add fused in: one pass over the output instead of three,
for the fast inference path (``fast_path.optimize_for_inference``).

    fuse_convolutions(model)      after BatchNorm folding: each conv followed by its ReLU or Hardswish in an
                                  nn.Sequential, the ResNet stem's conv and ReLU, and each ResNet block's
                                  last conv with the shortcut add and the ReLU become one FusedConv2d call
    FusedConv2d                   an nn.Conv2d (same parameters and names) whose forward(x, add=None) is
                                  act(conv(x) + add)
    FusedBasicBlock, FusedBottleneck   the ResNet blocks' forward on fused convs (same modules and names)

Why: in an unfused block the conv writes its output, then the residual add reads it and the shortcut and
writes it again, then the ReLU reads and writes it once more. On a CPU whose convolutions are fast (bf16
with AMX) those two element-wise passes over every map cost as much as the convolutions themselves (R50-FPN
at 800x1066: 44 ms of ReLU and 43 ms of adds against 165 ms of convolution). oneDNN applies the add and the
activation to each output tile while it is still in cache ("post-ops"), as OpenVINO does; PyTorch exposes
this as ``torch.ops.mkldnn._convolution_pointwise`` (the op its inductor compiler emits for the same fusion).
Where that op cannot run (not a CPU tensor, float16, gradients wanted, a PyTorch without it) the forward is
the plain conv, add and activation: the same values, unfused. One difference: oneDNN's fused ReLU maps NaN to
0 where torch.relu keeps it, so an image with a NaN pixel, on which the plain model (all scores NaN) finds
nothing, gets detections from the fused model (tests/model/test_fused_conv.py pins it).

Shapes: x [B, I, H, W] -> [B, O, H', W']; ``add`` [B, O, H', W'] (the shortcut).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import BasicBlock, Bottleneck, ResNetBody

ACTIVATIONS = {nn.ReLU: "relu", nn.Hardswish: "hardswish"}


def _mkldnn_pointwise_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


MKLDNN_POINTWISE = _mkldnn_pointwise_available()


class FusedConv2d(nn.Conv2d):
    """``act(conv(x) + add)`` in one oneDNN call on the CPU; ``activation`` is "none", "relu" or "hardswish".
    Made from an nn.Conv2d by ``FusedConv2d.adopt`` (the class changes, the parameters stay)."""

    activation: str = "none"

    @classmethod
    def adopt(cls, conv: nn.Conv2d, activation: str = "none") -> FusedConv2d:
        if activation not in ("none", "relu", "hardswish"):
            raise ValueError(f"FusedConv2d: activation must be none, relu or hardswish, got {activation!r}")
        if conv.bias is None:  # the fused op takes a bias; zeros change nothing
            weight = conv.weight
            conv.bias = nn.Parameter(
                torch.zeros(conv.out_channels, device=weight.device, dtype=weight.dtype), requires_grad=False
            )
        conv.__class__ = cls
        conv.activation = activation  # type: ignore[assignment]  # an instance of cls from here on
        return conv  # type: ignore[return-value]

    def _fusable(self, x: torch.Tensor, add: torch.Tensor | None) -> bool:
        return (
            MKLDNN_POINTWISE
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.dtype == self.weight.dtype
            and not (torch.is_grad_enabled() and self._wants_gradient(x, add))
            and (add is None or self._add_fusable(x, add))
        )

    def _wants_gradient(self, x: torch.Tensor, add: torch.Tensor | None) -> bool:
        """The oneDNN op has no backward: any input that wants a gradient sends the call to the plain ops."""
        tensors = (x, self.weight, self.bias, add)
        return any(t is not None and t.requires_grad for t in tensors)

    def _add_fusable(self, x: torch.Tensor, add: torch.Tensor) -> bool:
        if add.dtype != x.dtype or add.device.type != "cpu":
            return False
        if self.activation == "hardswish":  # oneDNN takes ReLU after the add, not Hardswish
            return False
        # PyTorch fuses the add only for one group and a channels-last x or weight;
        # otherwise it runs aten's add_relu after the conv, which has no bfloat16 kernel: the plain ops then
        channels_last = _plainly_channels_last(x) or _plainly_channels_last(self.weight)
        return self.groups == 1 and channels_last

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if not self._fusable(x, add):
            y = super().forward(x)
            if add is not None:
                y = y + add
            if self.activation == "relu":
                return F.relu(y)
            return F.hardswish(y) if self.activation == "hardswish" else y
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        unary = None if self.activation == "none" else self.activation
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *args, unary or "none", [], None)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, add, self.weight, self.bias, *args, "add", 1.0, unary, [], None
        )


def _plainly_channels_last(t: torch.Tensor) -> bool:
    """Channels-last and not also contiguous: what PyTorch's ``suggest_memory_format`` calls channels-last for
    a conv's input or weight (a [O, I, 1, 1] weight, contiguous in both layouts, it calls contiguous)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class FusedBasicBlock(BasicBlock):
    """A BasicBlock whose norms are folded: conv1+ReLU, then conv2 + shortcut + ReLU, two oneDNN calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x), add=identity)


class FusedBottleneck(Bottleneck):
    """A Bottleneck whose norms are folded: conv1+ReLU, conv2+ReLU, conv3 + shortcut + ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), add=identity)


def _plain_conv(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and not getattr(m, "_forward_hooks", None)
        and not getattr(m, "_forward_pre_hooks", None)
    )


def _folded(block: nn.Module, count: int) -> bool:
    return all(isinstance(getattr(block, f"bn{k}"), nn.Identity) for k in range(1, count + 1))


def _fuse_block(block: nn.Module) -> bool:
    fused_class, count = (FusedBottleneck, 3) if isinstance(block, Bottleneck) else (FusedBasicBlock, 2)
    convs = [getattr(block, f"conv{k}") for k in range(1, count + 1)]
    if type(block) not in (Bottleneck, BasicBlock) or not _folded(block, count) or not all(map(_plain_conv, convs)):
        return False
    down = block.downsample
    if down is not None and not (
        isinstance(down, nn.Sequential)
        and _plain_conv(down[0])
        and all(isinstance(m, nn.Identity) for m in list(down)[1:])
    ):
        return False
    for conv in convs:  # the last one's ReLU comes after the shortcut add, in the same call
        FusedConv2d.adopt(conv, "relu")
    block.__class__ = fused_class
    return True


def _fuse_sequential(seq: nn.Sequential) -> int:
    """Each plain conv followed (nn.Identity left by folding skipped) by a ReLU or Hardswish: the activation
    moves into the conv and its slot becomes nn.Identity. -> pairs fused."""
    names = [n for n in seq._modules if not isinstance(seq._modules[n], nn.Identity)]
    fused = 0
    for a, b in itertools.pairwise(names):
        conv, act = seq._modules[a], seq._modules[b]
        kind = ACTIVATIONS.get(type(act))
        if kind is not None and conv is not None and _plain_conv(conv):
            FusedConv2d.adopt(conv, kind)  # type: ignore[arg-type]
            seq._modules[b] = nn.Identity()
            fused += 1
    return fused


def fuse_convolutions(model: nn.Module) -> int:
    """Fuse, in place, the activations and residual adds of ``model`` (its BatchNorms already folded) into
    its convolutions (see the module docstring). Returns the number of activations fused."""
    fused = 0
    for m in list(model.modules()):
        if isinstance(m, (Bottleneck, BasicBlock)) and _fuse_block(m):
            fused += 1
        elif isinstance(m, ResNetBody) and isinstance(m.bn1, nn.Identity) and _plain_conv(m.conv1):
            # the stem applies its ReLU after the max-pool (they commute): it moves into the conv
            if isinstance(m.relu, nn.ReLU):
                FusedConv2d.adopt(m.conv1, "relu")
                m.relu = nn.Identity()  # type: ignore[assignment]
                fused += 1
        elif isinstance(m, nn.Sequential):
            fused += _fuse_sequential(m)
    return fused
