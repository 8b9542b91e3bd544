"""The fast path (model/fast_path.py) on the issue-14 models' parts and builders: a conv box head (ours and
torchvision's Sequential layout) reads its convs' channels-last output through a column-permuted fc; the
fused RPN head with two 3x3 convs; MobileNet-style conv-norm-activation blocks folded; and each new builder,
optimised, gives its plain model's detections (float32: the same, within rounding; bfloat16: most of them)."""

import pytest
import torch
from torch import nn

from fasterrcnn.model import builders
from fasterrcnn.model.fast_path import (
    ChannelsLastFlatten,
    FusedRPNHead,
    PointwiseConv2d,
    channels_last_conv_head,
    fold_batchnorm,
    use_pointwise_convs,
)
from fasterrcnn.model.frozen_bn import FrozenBatchNorm2d
from fasterrcnn.model.roi_heads import ConvFCHead
from fasterrcnn.model.rpn import RPNHead

from .helpers import sample_batch
from .test_fuse import detecting_tiny_model, matched, random_norm

NEW_BUILDERS = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn_v2",
)


def torchvision_layout_conv_head(channels: int, pool: int, width: int) -> nn.Sequential:
    """The v2 box head as torchvision lays it out: (conv, BN, ReLU) blocks, Flatten, Linear, ReLU."""
    blocks = [
        nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        for _ in range(2)
    ]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels * pool * pool, width), nn.ReLU())


@pytest.mark.parametrize("layout", ["ours", "torchvision"])
def test_channels_last_conv_head_gives_the_plain_head_features(layout):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    c, p, width = 8, 5, 16
    head = ConvFCHead(c, (p, p), conv_channels=(c, c), representation_size=width) if layout == "ours" else None
    head = head if head is not None else torchvision_layout_conv_head(c, p, width)
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            random_norm(m, g)
    head.eval()
    x = torch.randn(6, c, p, p, generator=g)
    with torch.no_grad():
        want = head(x)
        assert fold_batchnorm(head) == 2
        head = head.to(memory_format=torch.channels_last)
        fast = channels_last_conv_head(head)
        assert sum(isinstance(m, ChannelsLastFlatten) for m in fast.modules()) == 1
        assert not any(isinstance(m, nn.Flatten) for m in fast.modules())
        got = fast(x.contiguous(memory_format=torch.channels_last))
        empty = fast(torch.zeros(0, c, p, p).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert empty.shape == (0, width)


def test_a_head_without_flatten_then_linear_is_left_as_it_is():
    head = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU())
    assert channels_last_conv_head(head) is head
    assert [type(m) for m in head] == [nn.Conv2d, nn.ReLU]


def test_fused_rpn_head_with_two_convs_gives_the_plain_outputs():
    torch.manual_seed(0)
    head = RPNHead(8, 3, conv_depth=2).eval()
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.3)
            nn.init.normal_(m.bias, std=0.1)
    feats = [torch.randn(2, 8, 6, 7), torch.randn(2, 8, 3, 4)]
    with torch.no_grad():
        want = head(feats)
        fused = FusedRPNHead(head)
        got = fused([f.contiguous(memory_format=torch.channels_last) for f in feats])
    assert fused.outputs.out_features == 16  # 5 * 3 = 15 outputs padded to 16
    for w, o in zip(want, got):
        for a, b in zip(w, o):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_kind", ["batchnorm", "frozen"])
def test_conv_norm_activation_blocks_fold_in_nested_sequentials(norm_kind):
    """MobileNet's layout: Sequential(conv, norm, Hardswish) blocks, depthwise convs among them."""
    g = torch.Generator().manual_seed(0)

    def norm(c):
        return random_norm(nn.BatchNorm2d(c, eps=1e-3).eval() if norm_kind == "batchnorm" else FrozenBatchNorm2d(c), g)

    body = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), norm(8), nn.Hardswish()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), norm(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), norm(4)),
    ).eval()
    x = torch.randn(2, 3, 17, 19, generator=g)
    with torch.no_grad():
        want = body.double()(x.double())
        body.float()
        assert fold_batchnorm(body) == 3
        got = body.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in body.modules())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


# ---- each new builder, optimised, against its plain self ------------------------------------------------
def small_detecting_model(arch: str) -> nn.Module:
    """``arch`` from scratch (3 classes, small images, few proposals), every BatchNorm given random statistics
    (eval mode), the last norm of each residual branch a small scale, the heads decisive."""
    torch.manual_seed(0)
    model = builders.BUILDERS[arch](
        num_classes=3,
        min_size=160,
        max_size=192,
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=50,
        box_score_thresh=0.0,
    )
    g = torch.Generator().manual_seed(1)
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    for _, m in norms:  # statistics from the images (features of unit scale, as a trained network has)
        random_norm(m, g)
        m.momentum = None  # the plain average over the batch
        m.train()
    images = [torch.rand(3, 160, 192, generator=g), torch.rand(3, 192, 160, generator=g)]
    with torch.no_grad():
        model(images)  # in eval mode but for the norms: the box head's see test-time proposals
        for name, m in norms:
            if name.endswith((".bn3", ".block.3.1", ".block.2.1")):
                m.weight.mul_(0.25)
        model.rpn.head.cls_logits.weight.mul_(4.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize("arch", NEW_BUILDERS)
def test_optimised_new_builder_gives_the_plain_detections(arch):
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 150, 200, generator=g), torch.rand(3, 200, 170, generator=g)]
    plain = small_detecting_model(arch)
    fast = small_detecting_model(arch).optimize_for_inference()
    bf16 = small_detecting_model(arch).optimize_for_inference(dtype=torch.bfloat16)
    # every norm of the backbone and the heads is folded away
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in fast.modules())
    assert type(fast.rpn.head) is FusedRPNHead
    with torch.inference_mode():
        want, got, got16 = plain(images), fast(images), bf16(images)
    hit, total = matched(want, got, iou_min=0.99, score_tol=1e-3)
    assert total >= 20, "the comparison needs detections"
    assert hit / total >= 0.98
    hit, total = matched(want, got16, iou_min=0.9, score_tol=None)
    assert hit / total >= 0.7


def test_pointwise_convs_give_the_convolutions_output_on_one_pixel_and_on_maps():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(6, 5, 1), nn.ReLU(), nn.Conv2d(5, 4, 1, bias=False), nn.Conv2d(4, 4, 3)).eval()
    pooled, maps = torch.randn(3, 6, 1, 1), torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        want = block[:3](pooled), block[:3](maps)
        names = [n for n, _ in block.named_parameters()]
        assert use_pointwise_convs(block) == 2  # the 1x1 convs, not the 3x3
        assert [type(m) for m in block] == [PointwiseConv2d, nn.ReLU, PointwiseConv2d, nn.Conv2d]
        assert [n for n, _ in block.named_parameters()] == names
        got = block[:3](pooled), block[:3](maps.contiguous(memory_format=torch.channels_last))
    for w, g in zip(want, got):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_optimised_v2_like_tiny_model_gives_the_plain_detections():
    """The v2 parts on a tiny model, whatever the v2 builder's state: BatchNorm in the FPN and a conv box head,
    an RPN head of two 3x3 convs."""
    overrides = dict(fpn_norm="bn", box_head_convs=(32, 32), rpn_head=RPNHead(32, 3, conv_depth=2))
    images, _ = sample_batch()
    plain = detecting_tiny_model(**overrides)
    fast = detecting_tiny_model(**overrides).optimize_for_inference()
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in fast.modules())
    assert any(isinstance(m, ChannelsLastFlatten) for m in fast.roi_heads.box_head.modules())
    with torch.inference_mode():
        want, got = plain(images), fast(images)
    hit, total = matched(want, got, iou_min=0.99, score_tol=1e-3)
    assert total >= 50, "the comparison needs detections"
    assert hit == total
