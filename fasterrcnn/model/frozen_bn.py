"""BatchNorm with fixed statistics: y = (x - mean) / sqrt(var + eps) * weight + bias.

Detection trains with a few images per device, far too few for BatchNorm's batch statistics, so a
backbone that starts from trained weights keeps their ImageNet statistics frozen. The four tensors
are buffers, not parameters: nothing here is trained, and the state_dict keys are those of
``nn.BatchNorm2d`` (less ``num_batches_tracked``), so the same checkpoints load either way.

Shapes: x [B, C, H, W] -> [B, C, H, W].

The ResNet blocks do not call this layer's forward after a conv: ``conv_norm.conv_norm`` folds it into
the convolution on the fly, using ``scale_and_shift``.
"""

import torch
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
