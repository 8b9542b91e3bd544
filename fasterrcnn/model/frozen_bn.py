"""BatchNorm with fixed statistics: y = (x - mean) / sqrt(var + eps) * weight + bias.

Detection trains with a few images per device, far too few for BatchNorm's batch statistics, so a
backbone that starts from trained weights keeps their ImageNet statistics frozen. The four tensors
are buffers, not parameters: nothing here is trained, and the state_dict keys are those of
``nn.BatchNorm2d`` (less ``num_batches_tracked``), so the same checkpoints load either way.

Shapes: x [B, C, H, W] -> [B, C, H, W].

``conv_norm(conv, norm, x)`` is ``norm(conv(x))`` with a FrozenBatchNorm2d folded into the conv on the
fly: its scale multiplies the conv's weight ([O, I, kh, kw], O scales) and its shift becomes the conv's
bias. The separate multiply and add each read and write a whole feature map, in the forward pass and
(the multiply) again in the backward pass; folded, they cost nothing next to the convolution, which
makes a ResNet-50 training step ~5-10% faster. The backward pass recomputes the folded weight rather
than keeping it, so a step holds no more memory than with the separate layer.
"""
import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint written from an nn.BatchNorm2d also holds a step counter we have no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map this layer applies per channel: y = x * scale + shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))``, one convolution when ``norm`` is a FrozenBatchNorm2d (any other norm, e.g. a
    training BatchNorm2d or the nn.Identity left by ``fuse.fold_batchnorm``, runs as it is)."""
    if (not isinstance(norm, FrozenBatchNorm2d) or conv.bias is not None or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)):
        return norm(conv(x))
    scale, shift = norm.scale_and_shift()
    return _ConvScaleShift.apply(x, conv.weight, scale, shift, conv.stride, conv.padding, conv.dilation,
                                 conv.groups)


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
            grad.to(x.dtype), x, folded, None, stride, padding, dilation, False, [0] * len(padding), groups,
            [need_x, need_weight, False])
        if need_weight:
            grad_weight = (grad_weight * scale.reshape(-1, 1, 1, 1).to(grad_weight.dtype)).to(weight.dtype)
        return grad_x, grad_weight, None, None, None, None, None, None
