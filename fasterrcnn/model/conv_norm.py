"""A convolution followed by a FrozenBatchNorm2d, computed as one convolution, in training too.

``conv_norm(conv, norm, x)`` is ``norm(conv(x))`` with the frozen norm folded into the conv on the fly:
its scale multiplies the conv's weight ([O, I, kh, kw], O scales) and its shift becomes the conv's bias,
``conv(x, W * s) + t`` instead of ``conv(x, W) * s + t``. The separate multiply and add each read and
write a whole feature map, in the forward pass and (the multiply) again in the backward pass; folded,
they cost nothing next to the convolution (the gain on a ResNet-50 training step is measured in
docs/design-decisions.md). The parameters, the state_dict and the gradients are those of the two layers.

The backward pass is written by hand (``_ConvScaleShift``): it recomputes the folded weight rather than
keeping it, so a step holds no more memory than with the separate layer, and scales the weight gradient
back to the unfolded weight.

Shapes: x [B, I, H, W] -> [B, O, H', W']; weight [O, I, kh, kw]; scale, shift [O].
"""

import torch
import torch.nn.functional as F
from torch import nn

from .frozen_bn import FrozenBatchNorm2d


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))``, one convolution when ``norm`` is a FrozenBatchNorm2d (any other norm, e.g. a
    training BatchNorm2d or the nn.Identity left by ``fast_path.fold_batchnorm``, runs as it is)."""
    if (
        not isinstance(norm, FrozenBatchNorm2d)
        or conv.bias is not None
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
    ):
        return norm(conv(x))
    scale, shift = norm.scale_and_shift()
    return _ConvScaleShift.apply(x, conv.weight, scale, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


class _ConvScaleShift(torch.autograd.Function):
    """y = conv2d(x, weight * scale[:, None, None, None], bias=shift), scale and shift constant.

    Saves x and the weight itself (a parameter, alive anyway), not the folded weight: backward folds
    it again (a weight-sized multiply) for the input gradient, and scales the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, stride, padding, dilation, groups):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # run in the autocast dtype, as F.conv2d would
            x = x.to(torch.get_autocast_dtype(device))
        folded = (weight * scale.reshape(-1, 1, 1, 1)).to(x.dtype)
        ctx.save_for_backward(x, weight, scale)
        ctx.conv_args = (stride, padding, dilation, groups)
        with torch.autocast(device, enabled=False):
            return F.conv2d(x, folded, shift.to(x.dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        folded = (weight * scale.reshape(-1, 1, 1, 1)).to(x.dtype)
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad.to(x.dtype),
            x,
            folded,
            None,
            stride,
            padding,
            dilation,
            False,
            [0] * len(padding),
            groups,
            [need_x, need_weight, False],
        )
        if need_weight:
            grad_weight = (grad_weight * scale.reshape(-1, 1, 1, 1).to(grad_weight.dtype)).to(weight.dtype)
        return grad_x, grad_weight, None, None, None, None, None, None
