"""Inference-only rewrites of a trained detector: the same detections, less work per image.

    fold_batchnorm(module)          every conv followed by a frozen (or eval-mode) BatchNorm becomes one
                                    conv: W' = W * s, b' = b * s + t with s = gamma / sqrt(var + eps),
                                    t = beta - mean * s; the norm layer becomes nn.Identity
    module_dtype(module)            the dtype a (possibly bfloat16) part expects its input in
FasterRCNN.optimize_for_inference() uses them: eval mode, BatchNorm folded, channels-last (NHWC)
weights and images, and optionally the network's layers in bfloat16; the model then refuses to train
(its norm layers are gone).

Why: a FrozenBatchNorm2d is a multiply and an add over a whole feature map, with no arithmetic
intensity: folded into the conv before it, it costs nothing. Channels-last is the layout oneDNN's
convolutions run fastest in on CPUs (and cuDNN's tensor cores in half precision). bfloat16 halves the
bytes every layer moves and doubles the multiply-add rate of CPUs with AVX-512 BF16 (and of GPUs),
at a precision the features tolerate; box coordinates, scores, decoding and NMS stay in float32.

Shapes: conv weight [O, I, kh, kw], bias [O]; the norm's per-channel scale and shift [O].
"""
from __future__ import annotations

import torch
from torch import nn

from .frozen_bn import FrozenBatchNorm2d
from .resnet import BasicBlock, Bottleneck, ResNetBody

# modules whose forward applies bnK right after convK (and nothing in between)
_CONV_BN_OWNERS = (ResNetBody, BasicBlock, Bottleneck)


def _affine_of(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) in float64 of a norm layer that applies a fixed per-channel affine map, else None."""
    if isinstance(norm, FrozenBatchNorm2d):
        weight, bias, mean, var, eps = norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    elif isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.track_running_stats \
            and norm.running_mean is not None:
        weight = norm.weight if norm.affine else torch.ones_like(norm.running_mean)
        bias = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
        mean, var, eps = norm.running_mean, norm.running_var, norm.eps
    else:
        return None
    def f64(t: torch.Tensor) -> torch.Tensor:  # on the CPU: not every device has float64
        return t.detach().to("cpu", torch.float64)

    scale = f64(weight) * (f64(var) + eps).rsqrt()
    shift = f64(bias) - f64(mean) * scale
    return scale, shift


@torch.no_grad()
def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module) -> bool:
    """Fold ``norm`` (applied to ``conv``'s output) into ``conv`` in place; False if it cannot be."""
    affine = _affine_of(norm)
    if affine is None or not isinstance(conv, nn.Conv2d) or conv.out_channels != affine[0].numel():
        return False
    scale, shift = affine
    weight = conv.weight.detach()
    folded_w = weight.to("cpu", torch.float64) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    folded_b = shift if conv.bias is None else conv.bias.detach().to("cpu", torch.float64) * scale + shift
    conv.weight = nn.Parameter(folded_w.to(weight.device, weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(folded_b.to(weight.device, weight.dtype), requires_grad=False)
    return True


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every (conv, norm) pair of ``module`` whose norm is a FrozenBatchNorm2d or an eval-mode
    BatchNorm2d; each folded norm becomes nn.Identity. Returns the number of pairs folded.

    Pairs are found where the order of application is known: consecutive children of an
    ``nn.Sequential`` (FPN blocks, downsample shortcuts, conv box heads) and ``convK``/``bnK`` of the
    ResNet stem and blocks. A norm layer anywhere else is left as it is (still correct, just not free).
    """
    folded = 0
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                if fold_conv_norm(parent._modules[a], parent._modules[b]):
                    parent._modules[b] = nn.Identity()
                    folded += 1
        elif isinstance(parent, _CONV_BN_OWNERS):
            for k in (1, 2, 3):
                conv, norm = getattr(parent, f"conv{k}", None), getattr(parent, f"bn{k}", None)
                if conv is not None and norm is not None and fold_conv_norm(conv, norm):
                    setattr(parent, f"bn{k}", nn.Identity())
                    folded += 1
    return folded


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (float32 if it has none): what its
    input must be cast to once ``optimize_for_inference`` has cast it to bfloat16."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
