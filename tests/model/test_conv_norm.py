"""conv_norm: a conv followed by a FrozenBatchNorm2d, folded into one convolution on the fly, against
the two layers run one after the other (float64), forward and backward."""

import pytest
import torch
from torch import nn

from fasterrcnn.model.conv_norm import conv_norm
from fasterrcnn.model.frozen_bn import FrozenBatchNorm2d
from fasterrcnn.model.resnet import ResNetBody


def frozen_bn(channels: int, g: torch.Generator, dtype=torch.float64) -> FrozenBatchNorm2d:
    bn = FrozenBatchNorm2d(channels, eps=1e-5).to(dtype)
    bn.weight.copy_(torch.rand(channels, generator=g, dtype=dtype) + 0.5)
    bn.bias.copy_(torch.randn(channels, generator=g, dtype=dtype))
    bn.running_mean.copy_(torch.randn(channels, generator=g, dtype=dtype))
    bn.running_var.copy_(torch.rand(channels, generator=g, dtype=dtype) + 0.1)
    return bn


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,channels_last",
    [(1, 1, 0, 1, False), (3, 2, 1, 1, False), (3, 1, 2, 2, True), (7, 2, 3, 1, True)],
)
def test_conv_norm_equals_conv_then_frozen_bn_forward_and_backward(kernel, stride, padding, dilation, channels_last):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel, stride=stride, padding=padding, dilation=dilation, bias=False).double()
    bn = frozen_bn(5, g)
    x = torch.randn(2, 6, 17, 13, generator=g, dtype=torch.float64)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    upstream = torch.randn_like(bn(conv(x)))

    expected = bn(conv(x))
    gx_ref, gw_ref = torch.autograd.grad(expected, (x, conv.weight), upstream)
    got = conv_norm(conv, bn, x)
    gx, gw = torch.autograd.grad(got, (x, conv.weight), upstream)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)


def test_conv_norm_frozen_everything_records_no_graph_and_other_norms_run_as_they_are():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).requires_grad_(False)
    x = torch.randn(1, 3, 8, 8, generator=g)
    assert conv_norm(conv, frozen_bn(4, g, torch.float32), x).grad_fn is None
    bn = nn.BatchNorm2d(4).train()
    conv.requires_grad_(True)
    torch.testing.assert_close(conv_norm(conv, bn, x), nn.BatchNorm2d(4).train()(conv(x)))
    assert torch.equal(conv_norm(conv, nn.Identity(), x), conv(x))


def test_conv_norm_under_bfloat16_autocast():
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    bn = frozen_bn(8, g, torch.float32)
    x = torch.randn(2, 8, 10, 10, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv_norm(conv, bn, x)
        ref = bn(conv(x))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    assert torch.isfinite(conv.weight.grad).all()


def test_resnet_body_with_frozen_norms_equals_the_unfolded_network():
    """A whole ResNet-18 body, folded on the fly, against the same layers called one by one."""
    torch.manual_seed(3)
    body = ResNetBody(18, norm_layer=lambda c: FrozenBatchNorm2d(c), return_stages={"layer4": "0"}).double()
    g = torch.Generator().manual_seed(3)
    for m in body.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.load_state_dict(frozen_bn(m.num_features, g).state_dict())
    x = torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64)

    def unfolded(x):
        x = body.maxpool(body.relu(body.bn1(body.conv1(x))))
        for stage in (body.layer1, body.layer2, body.layer3, body.layer4):
            for blk in stage:
                idn = x if blk.downsample is None else blk.downsample(x)
                out = blk.relu(blk.bn1(blk.conv1(x)))
                x = blk.relu(blk.bn2(blk.conv2(out)) + idn)
        return x

    torch.testing.assert_close(body(x)["0"], unfolded(x), rtol=1e-10, atol=1e-10)
