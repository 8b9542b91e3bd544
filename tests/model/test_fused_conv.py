"""Fused convolutions (model/fused_conv.py) and kept CPU memory (model/cpu_memory.py).

FusedConv2d must compute act(conv(x) + add) as a float64 reference written out here does: in the oneDNN
call (inference mode) for every activation, geometry and memory format, in float32 and bfloat16; in the
plain ops (gradients wanted, or no oneDNN op), with the reference's gradients. fuse_convolutions must fuse
exactly the folded pairs of the real builders' models, leave unfolded ones alone, and not change the
detections. keep_freed_memory must spare the page faults of a freed and reallocated map."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fasterrcnn.model import cpu_memory, fast_path, fused_conv
from fasterrcnn.model.builders import (
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet18_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from fasterrcnn.model.fast_path import fold_batchnorm
from fasterrcnn.model.frozen_bn import FrozenBatchNorm2d
from fasterrcnn.model.fused_conv import FusedBasicBlock, FusedBottleneck, FusedConv2d, fuse_convolutions
from fasterrcnn.model.resnet import BasicBlock, Bottleneck, ResNetBody

ROOT = Path(__file__).resolve().parents[2]
CONTIGUOUS, CHANNELS_LAST = torch.contiguous_format, torch.channels_last
FORMATS = {"nchw": CONTIGUOUS, "nhwc": CHANNELS_LAST}
ACTIVATIONS = ("none", "relu", "hardswish")
# 4 -> 6 channels, 3x3 (one 1x1); groups=2 splits them 2 -> 3 per group
GEOMETRIES = {
    "s1p1": dict(kernel_size=3, stride=1, padding=1),
    "s2p0": dict(kernel_size=3, stride=2, padding=0),
    "s1p1g2": dict(kernel_size=3, stride=1, padding=1, groups=2),
    "s2p1g2": dict(kernel_size=3, stride=2, padding=1, groups=2),
    "d2p2": dict(kernel_size=3, stride=1, padding=2, dilation=2),
    "1x1s2": dict(kernel_size=1, stride=2, padding=0),
}
FUSED_OPS = ("mkldnn._convolution_pointwise.default", "mkldnn._convolution_pointwise.binary")


class OpLog(TorchDispatchMode):
    """The names of the operators dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def reference(x, weight, bias, add, activation, conv):
    """act(conv(x) + add) in float64, from the tensors given (gradients flow to them)."""
    y = F.conv2d(x.double(), weight.double(), bias.double(), conv.stride, conv.padding, conv.dilation, conv.groups)
    if add is not None:
        y = y + add.double()
    if activation == "relu":
        return F.relu(y)
    return F.hardswish(y) if activation == "hardswish" else y


def make_conv(geometry: str, activation: str, bias: bool = True) -> FusedConv2d:
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(4, 6, bias=bias, **GEOMETRIES[geometry])
    with torch.no_grad():  # a bias that matters, weights of output scale ~1
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.4)
        if bias:
            conv.bias.copy_(torch.randn(6, generator=g))
    return FusedConv2d.adopt(conv, activation)


def inputs(conv: nn.Conv2d, with_add: bool, seed: int = 5):
    """x [2, 4, 13, 17] and, with_add, an `add` of the conv's output shape."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 13, 17, generator=g)
    out_shape = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups).shape
    add = torch.randn(out_shape, generator=g) if with_add else None
    return x, add


def takes_the_onednn_op(conv: FusedConv2d, x: torch.Tensor, with_add: bool) -> bool:
    """Whether FusedConv2d sends this inference call to oneDNN (its documented policy): always without an
    add; with one, not for hardswish (oneDNN's binary conv takes only relu after the add), and only for one
    group with x or the weight channels-last as PyTorch judges layouts (``suggest_memory_format``): PyTorch
    fuses the add only then, and otherwise runs aten's add_relu, which has no bf16."""
    if not fused_conv.MKLDNN_POINTWISE:
        return False
    if not with_add:
        return True
    channels_last = any(
        t.is_contiguous(memory_format=CHANNELS_LAST) and not t.is_contiguous() for t in (x, conv.weight)
    )
    return conv.activation != "hardswish" and conv.groups == 1 and channels_last


def check_ops(log: OpLog, conv: FusedConv2d, x: torch.Tensor, with_add: bool, where: str = "") -> None:
    onednn = [op for op in log.ops if op.startswith("mkldnn.")]
    if takes_the_onednn_op(conv, x, with_add):
        assert onednn == [FUSED_OPS[with_add]], where
        assert not any(op.startswith(("aten.relu", "aten.hardswish", "aten.add")) for op in log.ops), where
    else:
        assert onednn == [], where
        assert any(op.startswith(("aten.conv2d.", "aten.convolution.")) for op in log.ops), where


CASES = [(activation, with_add) for activation in ACTIVATIONS for with_add in (False, True)]


# ---- 1. the oneDNN call and the plain ops against the float64 reference --------------------------------
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("activation, with_add", CASES)
def test_fused_call_float32_matches_float64_reference(activation, with_add, geometry):
    conv = make_conv(geometry, activation)
    x, add = inputs(conv, with_add)
    expected = reference(x, conv.weight, conv.bias, add, activation, conv)
    add_formats = FORMATS if with_add else {"none": None}
    for x_name, x_format in FORMATS.items():
        for add_name, add_format in add_formats.items():  # the add in x's format and in the other one
            xl = x.contiguous(memory_format=x_format)
            addl = None if add is None else add.contiguous(memory_format=add_format)
            add_before = None if add is None else addl.clone()
            with torch.inference_mode(), OpLog() as log:
                got = conv(xl, add=addl)
            where = f"x {x_name}, add {add_name}"
            check_ops(log, conv, xl, with_add, where)
            assert got.dtype == torch.float32 and got.shape == expected.shape, where
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4, msg=lambda m, w=where: f"{w}: {m}")
            assert got.is_contiguous(memory_format=x_format), f"{where}: the output keeps x's layout"
            if add is not None:
                assert torch.equal(addl, add_before), f"{where}: the shortcut must not be written to"


@pytest.mark.parametrize(
    "activation, with_add, x_format, geometry",
    [
        (a, w, f, g)
        for a in ACTIVATIONS
        for w in (False, True)
        for f in FORMATS  # the weights stay NCHW, as nn.Conv2d makes them
        for g in ("s1p1", "s2p0", "s1p1g2", "1x1s2")
    ],
)
def test_fused_call_bfloat16_matches_float64_reference_of_the_rounded_values(activation, with_add, x_format, geometry):
    conv = make_conv(geometry, activation)
    x, add = inputs(conv, with_add)
    conv = conv.to(torch.bfloat16)
    xb = x.bfloat16().contiguous(memory_format=FORMATS[x_format])
    addb = None if add is None else add.bfloat16()
    expected = reference(xb, conv.weight, conv.bias, addb, activation, conv)  # of the bf16 values
    with torch.inference_mode(), OpLog() as log:
        got = conv(xb, add=addb)
    check_ops(log, conv, xb, with_add)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    # one bf16 rounding of outputs up to ~4: 2^-7 relative, ~0.016 absolute
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=2e-2)
    assert (got.double() - expected).abs().mean() < 5e-3  # not just within tolerance somewhere


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("activation, with_add", CASES)
def test_with_gradients_the_plain_ops_give_the_reference_values_and_gradients(activation, with_add, geometry):
    conv = make_conv(geometry, activation)
    x, add = inputs(conv, with_add)
    for x_format in (CONTIGUOUS, CHANNELS_LAST):
        conv.zero_grad(set_to_none=True)
        xg = x.detach().contiguous(memory_format=x_format).requires_grad_()  # a new leaf each time
        addg = None if add is None else add.detach().contiguous(memory_format=CHANNELS_LAST).requires_grad_()
        with OpLog() as log:
            got = conv(xg, add=addg)
        assert not any(op.startswith("mkldnn.") for op in log.ops), "gradients wanted: the plain ops"
        assert "aten.convolution.default" in log.ops
        # the reference, with float64 leaves of the same values
        leaves = [t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias)]
        add64 = None if add is None else add.double().requires_grad_()
        expected = reference(*leaves, add64, activation, conv)
        torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-4, atol=1e-4)
        upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        got.backward(upstream.float())
        expected.backward(upstream)
        pairs = [(xg.grad, leaves[0].grad), (conv.weight.grad, leaves[1].grad), (conv.bias.grad, leaves[2].grad)]
        if add is not None:
            pairs.append((addg.grad, add64.grad))
        for name, (g_got, g_expected) in zip(("x", "weight", "bias", "add"), pairs, strict=False):
            assert g_got is not None, f"no gradient for {name}"
            torch.testing.assert_close(g_got.double(), g_expected, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "wants",
    [
        "x",
        "weight",
        "bias",
        "add",
    ],
)
def test_a_gradient_wanted_by_any_one_input_is_computed(wants):
    conv = make_conv("s1p1", "relu")
    x, add = inputs(conv, with_add=True)
    for p in conv.parameters():
        p.requires_grad_(False)
    tensors = {"x": x, "weight": conv.weight, "bias": conv.bias, "add": add}
    tensors[wants].requires_grad_(True)
    got = conv(x, add=add)
    got.sum().backward()
    # d/dt of sum(relu(conv(x) + add)): for `add` the mask of positive outputs, for the bias its sum per channel
    mask = (reference(x, conv.weight, conv.bias, add, "none", conv) > 0).double()
    expected = {"add": mask, "bias": mask.sum(dim=(0, 2, 3))}
    grad = tensors[wants].grad
    assert grad is not None, f"the gradient of {wants} is lost"
    if wants in expected:
        torch.testing.assert_close(grad.double(), expected[wants], rtol=1e-5, atol=1e-5)


# ---- 2. no oneDNN op: the plain ops, the same values ---------------------------------------------------
@pytest.mark.parametrize("activation, with_add", CASES)
def test_without_the_mkldnn_op_the_plain_ops_give_the_same_values(monkeypatch, activation, with_add):
    conv = make_conv("s2p1g2", activation)
    x, add = inputs(conv, with_add)
    x = x.contiguous(memory_format=CHANNELS_LAST)
    expected = reference(x, conv.weight, conv.bias, add, activation, conv)
    monkeypatch.setattr(fused_conv, "MKLDNN_POINTWISE", False)
    with torch.inference_mode(), OpLog() as log:
        got = conv(x, add=add)
    assert not any(op.startswith("mkldnn.") for op in log.ops)
    assert any(op.startswith(("aten.conv2d.", "aten.convolution.")) for op in log.ops)
    if activation != "none":
        assert f"aten.{activation}.default" in log.ops
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_float16_takes_the_plain_ops():
    conv = make_conv("s1p1", "relu")
    x, add = inputs(conv, with_add=True)
    conv = conv.half()
    with torch.inference_mode(), OpLog() as log:
        got = conv(x.half(), add=add.half())
    assert not any(op.startswith("mkldnn.") for op in log.ops)
    assert got.dtype == torch.float16
    expected = reference(x.half(), conv.weight, conv.bias, add.half(), "relu", conv)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=2e-2)


# ---- 3. adopt ------------------------------------------------------------------------------------------
def test_adopt_keeps_the_parameters_and_their_names():
    seq = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())
    conv = seq[0]
    keys, weight, bias = list(seq.state_dict()), conv.weight, conv.bias
    x = torch.randn(1, 3, 6, 7)
    with torch.no_grad():
        expected = seq(x)
    fused = FusedConv2d.adopt(conv, "relu")
    assert fused is conv and type(seq[0]) is FusedConv2d and isinstance(fused, nn.Conv2d)
    assert fused.activation == "relu"
    assert list(seq.state_dict()) == keys == ["0.weight", "0.bias"]
    assert fused.weight is weight and fused.bias is bias  # not copied
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    other = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())
    seq.load_state_dict(other.state_dict())  # strict: a plain model's checkpoint loads
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), other(x), rtol=1e-5, atol=1e-5)


def test_adopt_gives_a_conv_without_bias_a_zero_bias():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = conv(x)
    fused = FusedConv2d.adopt(conv, "none")
    assert isinstance(fused.bias, nn.Parameter) and not fused.bias.requires_grad
    assert fused.bias.shape == (6,) and fused.bias.dtype == fused.weight.dtype
    assert torch.equal(fused.bias, torch.zeros(6))
    assert list(fused.state_dict()) == ["weight", "bias"]
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    bf16 = FusedConv2d.adopt(nn.Conv2d(2, 3, 1, bias=False).to(torch.bfloat16), "relu")
    assert bf16.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("activation", ["gelu", "ReLU", None, "sigmoid"])
def test_adopt_rejects_an_unknown_activation_and_leaves_the_conv(activation):
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with pytest.raises(ValueError, match="activation"):
        FusedConv2d.adopt(conv, activation)
    assert type(conv) is nn.Conv2d and conv.bias is None


# ---- 4. fuse_convolutions on the builders' models ------------------------------------------------------
TINY = dict(num_classes=3, min_size=64, max_size=96)
BUILDERS = {
    "resnet18_fpn": lambda: fasterrcnn_resnet18_fpn(**TINY, fpn_channels=16, representation_size=32),
    "resnet50_fpn": lambda: fasterrcnn_resnet50_fpn(**TINY, fpn_channels=16, representation_size=32),
    # few proposals: its box head runs four 256-channel 3x3 convs per RoI
    "resnet50_fpn_v2": lambda: fasterrcnn_resnet50_fpn_v2(
        **TINY, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100
    ),
    "mobilenet_v3_large_fpn": lambda: fasterrcnn_mobilenet_v3_large_fpn(**TINY),
    "mobilenet_v3_large_320_fpn": lambda: fasterrcnn_mobilenet_v3_large_320_fpn(**TINY),
}
# FusedConv2d modules after optimize_for_inference, by activation:
#   ResNet-18: stem + 8 blocks x 2 convs + the RPN conv                                     = 18 relu
#   ResNet-50: stem + 16 blocks x 3 convs + the RPN conv                                    = 50 relu
#   v2: ResNet-50's 49 + 2 RPN convs + 4 box-head convs                                     = 55 relu
#   MobileNetV3-Large: stem (hs), block 1's depthwise (re), blocks 2-15's expand + depthwise (2-6 re,
#   7-15 hs), the last 1x1 (hs), the RPN conv (re)                                        = 12 relu, 20 hardswish
FUSED_COUNTS = {
    "resnet18_fpn": {"relu": 18},
    "resnet50_fpn": {"relu": 50},
    "resnet50_fpn_v2": {"relu": 55},
    "mobilenet_v3_large_fpn": {"relu": 12, "hardswish": 20},
    "mobilenet_v3_large_320_fpn": {"relu": 12, "hardswish": 20},
}


def fused_counts(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, FusedConv2d):
            counts[m.activation] = counts.get(m.activation, 0) + 1
    return counts


def detections(model, images):
    with torch.inference_mode():
        return model(images)


@pytest.mark.parametrize("name", [n for n in BUILDERS if n != "resnet50_fpn"])  # its blocks are v2's
def test_fused_fast_path_gives_the_unfused_detections(name):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    with torch.no_grad():  # decisive scores: fewer near-ties for NMS and the top-k to break differently
        model.roi_heads.box_predictor.cls_score.weight.mul_(8.0)
    plain = copy.deepcopy(model).optimize_for_inference(fuse=False, reuse_memory=False)
    fused = model.optimize_for_inference(fuse=True, reuse_memory=False)
    assert fused_counts(plain) == {}
    assert fused_counts(fused) == FUSED_COUNTS[name]
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 80, 70, generator=g)]
    a, b = detections(plain, images), detections(fused, images)
    assert all(len(d["scores"]) > 0 for d in a), "no detections to compare"
    for da, db in zip(a, b, strict=True):
        assert torch.equal(da["labels"], db["labels"])
        torch.testing.assert_close(da["boxes"], db["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(da["scores"], db["scores"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "depth, block, fused_block, blocks", [(18, BasicBlock, FusedBasicBlock, 8), (50, Bottleneck, FusedBottleneck, 16)]
)
def test_what_is_fused_in_a_resnet_fpn(depth, block, fused_block, blocks):
    build = BUILDERS[f"resnet{depth}_fpn"]
    model = build().eval()
    fold_batchnorm(model)
    assert fuse_convolutions(model) == blocks + 2  # each block, the stem, the RPN conv
    assert fuse_convolutions(model) == 0  # nothing left: fusing twice changes nothing
    body = model.backbone.body
    found = [m for m in body.modules() if isinstance(m, block)]
    assert len(found) == blocks and all(type(m) is fused_block for m in found)
    convs = ("conv1", "conv2") if block is BasicBlock else ("conv1", "conv2", "conv3")
    for m in found:
        assert all(type(getattr(m, c)) is FusedConv2d and getattr(m, c).activation == "relu" for c in convs)
        if m.downsample is not None:  # the shortcut's conv has no activation of its own
            assert type(m.downsample[0]) is nn.Conv2d
    assert type(body.conv1) is FusedConv2d and body.conv1.activation == "relu"
    assert isinstance(body.relu, nn.Identity)
    rpn_conv = model.rpn.head.conv[0]
    assert type(rpn_conv[0]) is FusedConv2d and rpn_conv[0].activation == "relu"
    assert isinstance(rpn_conv[1], nn.Identity)
    assert fused_counts(model) == FUSED_COUNTS[f"resnet{depth}_fpn"]
    # and as optimize_for_inference leaves it (the RPN head wrapped, its conv shared)
    optimized = build().optimize_for_inference(reuse_memory=False)
    assert fused_counts(optimized) == FUSED_COUNTS[f"resnet{depth}_fpn"]
    assert type(optimized.rpn.head).__name__ == "FusedRPNHead"
    assert type(optimized.rpn.head.conv[0][0]) is FusedConv2d


def test_unfolded_batchnorm_blocks_are_not_fused():
    # from scratch: nn.BatchNorm2d; in train mode (not foldable), and in eval mode but not folded
    for train in (True, False):
        model = BUILDERS["resnet18_fpn"]().train(train)
        assert fuse_convolutions(model) == 1  # only the RPN's conv + ReLU, which has no norm
        assert [n for n, m in model.named_modules() if isinstance(m, FusedConv2d)] == ["rpn.head.conv.0.0"]
        body = model.backbone.body
        assert all(type(m) is BasicBlock for m in body.modules() if isinstance(m, BasicBlock))
        assert type(body.conv1) is nn.Conv2d and isinstance(body.relu, nn.ReLU)
    # FrozenBatchNorm2d still there
    frozen = ResNetBody(50, norm_layer=FrozenBatchNorm2d, num_stages=2)
    assert fuse_convolutions(frozen) == 0
    assert all(type(m) is Bottleneck for m in frozen.modules() if isinstance(m, Bottleneck))
    assert not any(isinstance(m, FusedConv2d) for m in frozen.modules())
    # folded but for the shortcut's norm (train mode): the block keeps its class and plain convs
    block = BasicBlock(8, 16, 2, nn.BatchNorm2d).eval()
    block.downsample[1].train()
    assert fold_batchnorm(block) == 2
    assert fuse_convolutions(block) == 0
    assert type(block) is BasicBlock and type(block.conv1) is nn.Conv2d and type(block.conv2) is nn.Conv2d


@pytest.mark.parametrize(
    "block_class, in_channels, stride",
    [(BasicBlock, 8, 1), (BasicBlock, 8, 2), (Bottleneck, 32, 1), (Bottleneck, 16, 2)],
    ids=["basic", "basic_down", "bottleneck", "bottleneck_down"],
)
def test_a_fused_block_computes_the_block(block_class, in_channels, stride):
    g = torch.Generator().manual_seed(4)
    block = block_class(in_channels, 8, stride, nn.BatchNorm2d).eval()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(2, in_channels, 12, 10, generator=g)
    with torch.no_grad():
        expected = block(x.clone())
    fold_batchnorm(block)
    assert fuse_convolutions(block) == 1
    assert type(block) is (FusedBasicBlock if block_class is BasicBlock else FusedBottleneck)
    for layout in (CONTIGUOUS, CHANNELS_LAST):
        xl = x.contiguous(memory_format=layout)
        before = xl.clone()
        with torch.inference_mode():
            got = block(xl)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(xl, before), "the block's input (its shortcut) must be left as it was"


def test_bfloat16_fused_backbone_follows_the_float32_one():
    model = BUILDERS["resnet18_fpn"]().eval()
    reference_model = copy.deepcopy(model).optimize_for_inference(fuse=False, reuse_memory=False)
    bf16 = model.optimize_for_inference(dtype=torch.bfloat16, reuse_memory=False)
    assert fused_counts(bf16) == FUSED_COUNTS["resnet18_fpn"]
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        a, b = reference_model.backbone(x), bf16.backbone(x)
    for k in a:
        assert b[k].dtype == torch.bfloat16
        assert (a[k] - b[k].float()).norm() / a[k].norm() < 0.03, k


@pytest.mark.parametrize("name", ["resnet18_fpn", "resnet50_fpn"])
def test_bfloat16_without_channels_last_runs_the_fused_resnet(name):
    """optimize_for_inference(dtype=torch.bfloat16, channels_last=False) with the default fuse=True: each
    block's conv + shortcut + ReLU in bf16 on NCHW maps (which PyTorch's fused op cannot run in bf16); a
    Bottleneck's is a 1x1 conv."""
    model = BUILDERS[name]().eval()
    model.optimize_for_inference(dtype=torch.bfloat16, channels_last=False, reuse_memory=False)
    out = detections(model, [torch.rand(3, 64, 80)])
    assert torch.isfinite(out[0]["boxes"]).all()


# ---- 5. keep_freed_memory ------------------------------------------------------------------------------
def test_keep_freed_memory_returns_a_bool_and_can_be_called_again():
    first = cpu_memory.keep_freed_memory()
    assert isinstance(first, bool)
    assert cpu_memory.keep_freed_memory() is first
    if sys.platform.startswith("linux") and first:
        assert cpu_memory._applied is True


def test_keep_freed_memory_does_nothing_off_linux(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", False)
    monkeypatch.setattr(cpu_memory.sys, "platform", "darwin")
    assert cpu_memory.keep_freed_memory() is False
    assert cpu_memory._applied is False


_PAGE_FAULTS = """
import resource, sys, torch
from fasterrcnn.model.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is True and keep_freed_memory() is True
counts = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)  # 64 MB, every page written
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x  # freed
print(*counts)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_spares_the_page_faults_of_the_next_map():
    def faults(mode: str) -> list[int]:
        done = subprocess.run(
            [sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr
        return [int(n) for n in done.stdout.split()]

    plain, kept = faults("plain"), faults("keep")
    pages = 16 * 2**20 * 4 // 4096  # 16,384 pages of 4 KiB
    # without: glibc maps every 64 MB block afresh and returns it on free, so each one faults all its pages
    assert all(n >= pages * 0.9 for n in plain), f"plain {plain}"
    # with: the freed block is reused. Once, the second or the third request (varying from run to run with
    # where the heap starts) does not fit a freed block (posix_memalign's padding) and takes a new one; the
    # two blocks then serve every later request
    assert sum(kept[1:]) < pages * 1.1, f"more than one fresh block after the first: kept {kept}"
    assert sum(kept[3:]) < sum(plain[3:]) / 20, f"kept {kept} against plain {plain}"


# ---- 6. optimize_for_inference(reuse_memory=...) --------------------------------------------------------
def test_optimize_keeps_freed_memory_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(fast_path, "keep_freed_memory", lambda: calls.append(1) or True)
    BUILDERS["resnet18_fpn"]().optimize_for_inference(reuse_memory=False)
    assert calls == []
    BUILDERS["resnet18_fpn"]().optimize_for_inference(fuse=False, reuse_memory=False)
    assert calls == []
    BUILDERS["resnet18_fpn"]().optimize_for_inference()  # the default: a CPU model keeps it
    assert calls == [1]


def test_the_fused_relu_maps_nan_to_zero_where_torch_relu_keeps_it():
    """A documented difference (fused_conv.py): a NaN entering a fused conv + ReLU comes out 0, not NaN."""
    conv = FusedConv2d.adopt(nn.Conv2d(2, 2, 1), "relu")
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    x = x.contiguous(memory_format=CHANNELS_LAST)
    with torch.inference_mode():
        fused = conv(x)
    plain = F.relu(F.conv2d(x, conv.weight, conv.bias))
    assert torch.isnan(plain[0, :, 0, 0]).all()
    if fused_conv.MKLDNN_POINTWISE:
        assert torch.equal(fused[0, :, 0, 0], torch.zeros(2))
    assert torch.equal(fused[0, :, 1:, 1:], plain[0, :, 1:, 1:])
