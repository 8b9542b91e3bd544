"""Fused convolutions (model/fused_conv.py) against a plain float64 reference, the fast path's detections
with and without them, and the kept CPU memory (model/cpu_memory.py)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasterrcnn.model import fused_conv
from fasterrcnn.model.builders import fasterrcnn_resnet18_fpn, fasterrcnn_resnet50_fpn_v2
from fasterrcnn.model.builders_mobilenet import fasterrcnn_mobilenet_v3_large_320_fpn
from fasterrcnn.model.fused_conv import FusedBasicBlock, FusedConv2d, fuse_convolutions
from fasterrcnn.model.resnet import BasicBlock


def _reference(x, conv, add, activation):
    y = F.conv2d(
        x.double(), conv.weight.double(), conv.bias.double(), conv.stride, conv.padding, conv.dilation, conv.groups
    )
    if add is not None:
        y = y + add.double()
    if activation == "relu":
        return y.relu()
    return F.hardswish(y) if activation == "hardswish" else y


@pytest.mark.parametrize("activation", ["none", "relu", "hardswish"])
@pytest.mark.parametrize(
    "kw", [dict(padding=1), dict(stride=2, padding=0), dict(groups=2, padding=1), dict(dilation=2, padding=2)]
)
@pytest.mark.parametrize("with_add", [False, True])
def test_fused_conv_matches_float64(activation, kw, with_add):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kw)
    x = torch.randn(2, 4, 11, 13)
    out_shape = conv(x).shape
    add = torch.randn(out_shape) if with_add else None
    fused = FusedConv2d.adopt(conv, activation)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        ref = _reference(xl, fused, add, activation)
        with torch.inference_mode():  # the oneDNN call
            got = fused(xl, add=add)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    # gradients wanted: the plain ops, the same values and gradients
    xg = x.clone().requires_grad_()
    got = fused(xg, add=add)
    torch.testing.assert_close(got.double(), _reference(x, fused, add, activation), rtol=1e-4, atol=1e-4)
    got.sum().backward()
    xr = x.double().requires_grad_()
    _reference(xr, fused, add, activation).sum().backward()
    torch.testing.assert_close(xg.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)


def test_fused_conv_bf16_and_fallback(monkeypatch):
    torch.manual_seed(1)
    conv = FusedConv2d.adopt(nn.Conv2d(8, 8, 3, padding=1, bias=False), "relu")
    assert torch.equal(conv.bias, torch.zeros(8)) and set(conv.state_dict()) == {"weight", "bias"}
    x, add = torch.randn(1, 8, 9, 9), torch.randn(1, 8, 9, 9)
    ref = _reference(x, conv, add, "relu")
    with torch.inference_mode():
        bf = conv.to(torch.bfloat16)(x.bfloat16(), add=add.bfloat16())
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.double(), ref, rtol=0.05, atol=0.08)
    monkeypatch.setattr(fused_conv, "MKLDNN_POINTWISE", False)
    conv.float()  # the weights now rounded to bf16 once: a new reference
    with torch.inference_mode():
        torch.testing.assert_close(conv(x, add=add).double(), _reference(x, conv, add, "relu"), rtol=1e-4, atol=1e-4)
    # bf16 in the NCHW layout: PyTorch has no fused bf16 add+ReLU there, the plain ops run (same values)
    conv.to(torch.bfloat16)
    monkeypatch.setattr(fused_conv, "MKLDNN_POINTWISE", True)
    with torch.inference_mode():
        nchw = conv(x.bfloat16(), add=add.bfloat16())
    torch.testing.assert_close(nchw.double(), ref, rtol=0.05, atol=0.08)
    with pytest.raises(ValueError, match="activation"):
        FusedConv2d.adopt(nn.Conv2d(2, 2, 1), "gelu")


def _detections(model, images):
    with torch.inference_mode():
        return model(images)


@pytest.mark.parametrize(
    "build",
    [
        lambda: fasterrcnn_resnet18_fpn(
            num_classes=4, min_size=64, max_size=96, fpn_channels=16, representation_size=32
        ),
        lambda: fasterrcnn_mobilenet_v3_large_320_fpn(num_classes=4, min_size=64, max_size=96),
        lambda: fasterrcnn_resnet50_fpn_v2(num_classes=4, min_size=64, max_size=96),
    ],
    ids=["resnet18_fpn", "mobilenet_v3_320", "resnet50_fpn_v2"],
)
def test_fused_fast_path_gives_the_unfused_detections(build):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # decisive scores, so that there are detections to compare
        model.roi_heads.box_predictor.cls_score.weight.mul_(8.0)
    state = model.state_dict()
    images = [torch.rand(3, 70, 90), torch.rand(3, 90, 64)]
    plain = build().eval()
    plain.load_state_dict(state)
    fused = build().eval()
    fused.load_state_dict(state)
    plain.optimize_for_inference(fuse=False, reuse_memory=False)
    fused.optimize_for_inference(fuse=True, reuse_memory=False)
    assert any(isinstance(m, FusedConv2d) for m in fused.modules())
    assert not any(isinstance(m, FusedConv2d) for m in plain.modules())
    a, b = _detections(plain, images), _detections(fused, images)
    assert sum(len(d["scores"]) for d in a) > 0
    for da, db in zip(a, b, strict=True):
        assert torch.equal(da["labels"], db["labels"])
        torch.testing.assert_close(da["boxes"], db["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(da["scores"], db["scores"], rtol=1e-4, atol=1e-4)


def test_what_is_fused_in_a_resnet_fpn():
    model = fasterrcnn_resnet18_fpn(num_classes=3, min_size=64, max_size=96).eval()
    # BatchNorm not folded: no block and not the stem; only the RPN head's conv + ReLU, which has no norm
    assert fuse_convolutions(model) == 1
    assert not any(isinstance(m, FusedBasicBlock) for m in model.modules())
    assert type(model.backbone.body.conv1) is nn.Conv2d and model.rpn.head.conv[0][0].activation == "relu"
    model.optimize_for_inference(reuse_memory=False)
    body = model.backbone.body
    blocks = [m for m in body.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(type(b) is FusedBasicBlock for b in blocks)
    assert body.conv1.activation == "relu" and isinstance(body.relu, nn.Identity)
    assert all(b.conv2.activation == "relu" for b in blocks)  # applied after the shortcut add
    assert model.rpn.head.conv[0][0].activation == "relu"


def test_optimize_keeps_memory_only_when_asked(monkeypatch):
    from fasterrcnn.model import fast_path

    calls = []
    monkeypatch.setattr(fast_path, "keep_freed_memory", lambda: calls.append(1) or True)
    fasterrcnn_resnet18_fpn(num_classes=3).optimize_for_inference(reuse_memory=False)
    assert calls == []
    fasterrcnn_resnet18_fpn(num_classes=3).optimize_for_inference()
    assert calls == [1]


_FAULTS = """
import resource, sys, torch
from fasterrcnn.model.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
for _ in range(3):  # 64 MB maps, freed: as the first images of a run
    x = torch.ones(16 * 2**20)
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_means_no_page_faults_for_the_next_map():
    def faults(mode):
        done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    plain, kept = faults("plain"), faults("keep")
    assert plain > 10_000, f"64 MB of fresh pages should fault ~16,000 times, got {plain}"
    assert kept < plain / 10, f"kept memory: {kept} faults against {plain}"
