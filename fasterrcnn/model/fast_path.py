"""The fast inference path: modules that ``FasterRCNN.optimize_for_inference`` swaps in around a trained
detector, so that the learner's modules (``rpn.RPNHead``, ``roi_heads.TwoMLPHead``, the ResNet blocks) stay
as the paper describes them. The same detections, less work per image.

    optimize_for_inference(model)   eval mode; every BatchNorm folded into the conv before it; channels-last
                                    (NHWC) weights and images; the swaps below; with ``dtype=torch.bfloat16``
                                    (or float16) the backbone and the heads in that dtype; no gradients;
                                    activations and residual adds fused into the convs (fused_conv.py;
                                    ``fuse=False`` keeps them apart); on the CPU, freed feature maps
                                    kept for the next image (cpu_memory.py; ``reuse_memory=False``: not)
    fold_batchnorm(module)          each conv followed by a frozen (or eval-mode) BatchNorm becomes one conv:
                                    W' = W * s, b' = b * s + t with s = gamma / sqrt(var + eps),
                                    t = beta - mean * s; the norm layer becomes nn.Identity
    FusedRPNHead(head)              an RPNHead whose two 1x1 output convs are one matrix product
    ChannelsLastTwoMLPHead(head, D) a TwoMLPHead whose fc6 reads the pooler's channels-last rows as they are
    channels_last_conv_head(head)   a conv box head (convs, flatten, fc: ConvFCHead, or any nn.Sequential
                                    with an nn.Flatten then an nn.Linear) whose fc reads the convs' channels-last
                                    output as it is (ChannelsLastFlatten and the fc's columns permuted)
    PointwiseConv2d                 a 1x1 convolution that runs as a matrix-vector product on a 1x1 map (the
                                    squeeze-excitation convs of MobileNetV3 after their global pooling)
    CastInput(dtype)                a forward pre-hook casting a part's input to the dtype of its weights

Why: a FrozenBatchNorm2d is a multiply and an add over a whole feature map, with no arithmetic intensity:
folded into the conv before it, it costs nothing. Channels-last is the layout oneDNN's convolutions run
fastest in on CPUs (and cuDNN's tensor cores in half precision). bfloat16 halves the bytes every layer
moves and doubles the multiply-add rate of CPUs with AVX-512 BF16 (and of GPUs), at a precision the
features tolerate; box coordinates, scores, decoding and NMS stay in float32 (the RPN and the RoI heads
convert the head outputs). The optimised model cannot train (its norm layers are gone) and its state_dict
is not a checkpoint's. Measured effects: docs/design-decisions.md, "Measured choices in the ops and the
fast path".

Shapes: conv weight [O, I, kh, kw], bias [O]; the norm's per-channel scale and shift [O]. RPN head, per
level: [B, C, H, W] -> logits [B, A, H, W], deltas [B, 4A, H, W]. Box head: [R, D, P, P] -> [R, F].
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_memory import keep_freed_memory
from .frozen_bn import FrozenBatchNorm2d
from .fused_conv import fuse_convolutions
from .resnet import BasicBlock, Bottleneck, ResNetBody
from .roi_heads import ConvFCHead, TwoMLPHead
from .rpn import RPNHead

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# modules whose forward applies bnK right after convK (and nothing in between)
_CONV_BN_OWNERS = (ResNetBody, BasicBlock, Bottleneck)


def optimize_for_inference(
    model: nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    fuse: bool = True,
    reuse_memory: bool = True,
) -> nn.Module:
    """Prepare a FasterRCNN, in place, for fast inference, and return it (see the module docstring).
    Our RPNHead and TwoMLPHead are replaced by their fast forms; other heads keep their own forward."""
    if dtype not in DTYPES:
        raise ValueError(f"optimize_for_inference: dtype must be float32, bfloat16 or float16, got {dtype}")
    model.eval()
    fold_batchnorm(model)
    if channels_last:
        model.to_channels_last()
    rpn, heads = model.rpn, model.roi_heads
    if fuse:
        fuse_convolutions(model)
    use_pointwise_convs(model)
    if isinstance(rpn.head, RPNHead):
        rpn.head = FusedRPNHead(rpn.head)
    heads.box_head = _fast_box_head(heads.box_head, model.backbone.out_channels, channels_last)
    later_heads = getattr(heads, "later_heads", None)  # Cascade R-CNN's stages after the first (model/cascade.py)
    if later_heads is not None:
        for k, head in enumerate(later_heads):
            later_heads[k] = _fast_box_head(head, model.backbone.out_channels, channels_last)
    box_parts = [heads.box_head, *(later_heads or [])]
    for part in (model.backbone, rpn.head, *box_parts, heads.box_predictor, *getattr(heads, "later_predictors", [])):
        part.to(dtype)
    if dtype != torch.float32:
        # the parts whose input comes from outside the cast network: the float32 image batch, and the
        # pooler's output (ours keeps the maps' dtype; another pooler may not)
        for part in (model.backbone, *box_parts):
            part.register_forward_pre_hook(CastInput(dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    model.inference_only = True  # FasterRCNN.train refuses to train from now on
    if reuse_memory and all(p.device.type == "cpu" for p in model.parameters()):
        keep_freed_memory()
    return model


def _fast_box_head(head: nn.Module, channels: int, channels_last: bool) -> nn.Module:
    if isinstance(head, TwoMLPHead):  # our poolers output channels-last rows, whatever the model's layout
        return ChannelsLastTwoMLPHead(head, channels)
    if channels_last:  # a conv head's convs then output channels-last maps
        return channels_last_conv_head(head)
    return head


# ---- BatchNorm folding ---------------------------------------------------------------------------------
def _affine_of(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) in float64 of a norm layer that applies a fixed per-channel affine map, else None."""
    if isinstance(norm, FrozenBatchNorm2d):
        weight, bias, mean, var, eps = norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    elif (
        isinstance(norm, nn.BatchNorm2d)
        and not norm.training
        and norm.track_running_stats
        and norm.running_mean is not None
    ):
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
            for a, b in itertools.pairwise(names):
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


# ---- the heads' fast forms -----------------------------------------------------------------------------
class FusedRPNHead(nn.Module):
    """An RPNHead (its 3x3 conv shared, not copied) whose logits and deltas come from one matrix product
    over the rows of the channels-last map, [B*H*W, C] @ [C, 5A], instead of two 1x1 convolutions of A and
    4A outputs (each a full read of the map, with kernels tuned for wide outputs). ``outputs`` holds a copy
    of the two convs' weights, zero rows padding 5A to a multiple of 16, the width matrix kernels handle
    best. The outputs are views in the layout ``rpn.flatten_head_outputs`` wants."""

    def __init__(self, head: RPNHead):
        super().__init__()
        self.conv = head.conv
        a, c = head.cls_logits.out_channels, head.cls_logits.in_channels
        self.num_anchors = a
        weight = head.cls_logits.weight
        self.outputs = nn.Linear(c, 5 * a + (-5 * a) % 16, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.outputs.weight.zero_()
            self.outputs.bias.zero_()
            self.outputs.weight[: 5 * a] = torch.cat([head.cls_logits.weight, head.bbox_pred.weight]).flatten(1)
            self.outputs.bias[: 5 * a] = torch.cat([head.cls_logits.bias, head.bbox_pred.bias])

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        a = self.num_anchors
        logits, deltas = [], []
        for f in features:
            out = self.outputs(self.conv(f).permute(0, 2, 3, 1))  # [B, H, W, 5A + padding]
            logits.append(out[..., :a].permute(0, 3, 1, 2))  # [B, A, H, W] views
            deltas.append(out[..., a : 5 * a].permute(0, 3, 1, 2))  # [B, 4A, H, W]
        return logits, deltas


class ChannelsLastTwoMLPHead(nn.Module):
    """A TwoMLPHead whose fc6 columns are permuted once from (channel, y, x) to (y, x, channel) order, the
    order of the pooler's channels-last rows: flattening a pooled [R, D, P, P] with channels-last strides is
    then a view, not a copy (a contiguous input is copied once, as the plain head does). fc6 no longer
    matches a checkpoint's. ``channels`` is D, the pooled maps' channel count."""

    def __init__(self, head: TwoMLPHead, channels: int):
        super().__init__()
        weight = head.fc6.weight.detach()
        if weight.shape[1] % channels:
            raise ValueError(
                f"ChannelsLastTwoMLPHead: fc6 has {weight.shape[1]} inputs, not a multiple of {channels} channels"
            )
        self.fc6 = nn.Linear(head.fc6.in_features, head.fc6.out_features, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.fc6.weight.copy_(weight.view(weight.shape[0], channels, -1).transpose(1, 2).reshape(weight.shape))
            self.fc6.bias.copy_(head.fc6.bias)
        self.fc7 = head.fc7
        self.out_features = head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [R, D, P, P] -> [R, P*P*D] in (y, x, channel) order; flatten, not reshape(R, -1): R may be 0
        x = x.permute(0, 2, 3, 1).flatten(start_dim=1)
        x = F.relu(self.fc6(x))
        return F.relu(self.fc7(x))


class ChannelsLastFlatten(nn.Module):
    """[R, C, H, W] -> [R, H*W*C], rows in (y, x, channel) order: a view of a channels-last map (a
    contiguous one is copied once, as nn.Flatten would copy a channels-last one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(start_dim=1)  # flatten, not reshape(R, -1): R may be 0


def _channels_last_linear(fc: nn.Linear, channels: int) -> nn.Linear:
    """A copy of ``fc`` whose input columns are permuted from (channel, y, x) to (y, x, channel) order."""
    weight = fc.weight.detach()
    if weight.shape[1] % channels:
        raise ValueError(f"channels-last fc: {weight.shape[1]} inputs, not a multiple of {channels} channels")
    out = nn.Linear(fc.in_features, fc.out_features, bias=fc.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight.view(weight.shape[0], channels, -1).transpose(1, 2).reshape(weight.shape))
        if fc.bias is not None:
            out.bias.copy_(fc.bias)
    return out


def _last_conv_channels(modules: list[nn.Module]) -> int | None:
    """The output channels of the last nn.Conv2d in ``modules`` (searched depth-first), else None."""
    convs = [m for part in modules for m in part.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else None


def channels_last_conv_head(head: nn.Module) -> nn.Module:
    """A conv box head whose fc reads the last conv's channels-last output without a copy; returns the head
    (changed in place) or its fast form, or ``head`` as it is when it is not a conv head.

    Two forms are recognised by structure, not by attribute names: an nn.Sequential in which an nn.Flatten,
    preceded by convolutions, is followed by an nn.Linear (torchvision's layout of the v2 box head:
    conv blocks, Flatten, Linear, ReLU), and ``roi_heads.ConvFCHead`` with its ``convs`` and ``fc``."""
    if isinstance(head, nn.Sequential):
        names = list(head._modules)
        for i, (a, b) in enumerate(itertools.pairwise(names)):
            flatten, fc = head._modules[a], head._modules[b]
            channels = _last_conv_channels([head._modules[n] for n in names[:i]])
            if isinstance(flatten, nn.Flatten) and isinstance(fc, nn.Linear) and channels is not None:
                if flatten.start_dim != 1 or flatten.end_dim != -1:
                    return head
                head._modules[a] = ChannelsLastFlatten()
                head._modules[b] = _channels_last_linear(fc, channels)
                return head
        return head
    if isinstance(head, ConvFCHead):
        convs, fc = getattr(head, "convs", None), getattr(head, "fc", None)
        channels = _last_conv_channels([convs]) if isinstance(convs, nn.Module) else None
        if isinstance(fc, nn.Linear) and channels is not None:
            return nn.Sequential(convs, ChannelsLastFlatten(), _channels_last_linear(fc, channels), nn.ReLU())
    return head


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution (stride 1, no padding, one group) that, on a map of one pixel, runs as a matrix-vector
    product, [B, I] @ [I, O], instead of oneDNN's convolution, whose set-up dominates the work there (each
    squeeze-excitation conv of MobileNetV3 reads the [B, C, 1, 1] global average). Larger maps run the plain
    convolution. Its parameters are the conv's (same names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2] * x.shape[3] != 1:
            return super().forward(x)
        b, c = x.shape[:2]
        out = F.linear(x.reshape(b, c), self.weight.reshape(self.out_channels, c), self.bias)
        return out.reshape(b, self.out_channels, 1, 1)


def use_pointwise_convs(module: nn.Module) -> int:
    """Make each plain 1x1 nn.Conv2d of ``module`` a PointwiseConv2d (in place: the class changes, the
    parameters stay); returns how many."""
    count = 0
    for m in module.modules():
        if (
            type(m) is nn.Conv2d
            and m.kernel_size == (1, 1)
            and m.stride == (1, 1)
            and m.padding == (0, 0)
            and m.dilation == (1, 1)
            and m.groups == 1
            and m.padding_mode == "zeros"
        ):
            m.__class__ = PointwiseConv2d
            count += 1
    return count


class CastInput:
    """A forward pre-hook (``module.register_forward_pre_hook(CastInput(dtype))``) that casts the module's
    floating-point input (a tensor, or a list of tensors) to ``dtype``: the entry of a part whose weights
    ``optimize_for_inference`` cast to bfloat16 or float16. A hook, not a wrapper module, so the optimised
    model keeps the plain model's module names (``model.backbone.body...``) in every dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        if isinstance(x, (list, tuple)):
            x = type(x)(t.to(self.dtype) if t.is_floating_point() else t for t in x)
        elif x.is_floating_point():
            x = x.to(self.dtype)
        return (x, *rest)

    def __repr__(self) -> str:
        return f"CastInput({self.dtype})"
