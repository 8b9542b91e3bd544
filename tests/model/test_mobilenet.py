"""MobileNetV3-Large trunk and detectors: stage shapes, key layout, freezing, a training step, the fast path."""

import pytest
import torch

from fasterrcnn.model import BUILDERS
from fasterrcnn.model.frozen_bn import FrozenBatchNorm2d
from fasterrcnn.model.mobilenet import MobileNetV3Body, make_divisible
from fasterrcnn.model.mobilenet_backbone import mobilenet_backbone
from fasterrcnn.ops import box_iou

MOBILE = ["fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"]


def test_make_divisible_rounds_to_eight_never_ten_percent_below():
    assert [make_divisible(v) for v in (16, 18, 60, 72 // 4, 120 // 4, 240 // 4, 480 // 4, 672 // 4, 960 // 4)] == [
        16,
        24,  # 16 would be more than 10% below 18
        64,
        24,
        32,
        64,
        120,
        168,
        240,
    ]
    assert make_divisible(3) == 8 and make_divisible(13.5) == 16  # 12 would be > 10% below 13.5


def test_stage_shapes_of_the_large_trunk():
    body = MobileNetV3Body(return_blocks={i: str(i) for i in range(17)}).eval()
    with torch.no_grad():
        out = body(torch.rand(1, 3, 224, 224))
    # (channels, side) after each block, from the paper's Table 1 (224x224 input)
    expected = [(16, 112), (16, 112), (24, 56), (24, 56), (40, 28), (40, 28), (40, 28), (80, 14), (80, 14)]
    expected += [(80, 14), (80, 14), (112, 14), (112, 14), (160, 7), (160, 7), (160, 7), (960, 7)]
    assert [(t.shape[1], t.shape[2]) for t in out.values()] == expected
    assert body.stage_indices == [0, 2, 4, 7, 13, 16]
    dilated = MobileNetV3Body(dilated=True).eval()
    with torch.no_grad():
        assert dilated(torch.rand(1, 3, 224, 224))["0"].shape == (1, 960, 14, 14)  # the last stage not strided
    small = MobileNetV3Body("mobilenet_v3_small")
    assert small.stage_indices == [0, 1, 2, 4, 9, 12] and small.channels(12) == 576


def test_block_layout_and_key_names():
    body = MobileNetV3Body()
    keys = list(body.state_dict())
    assert keys[:12] == [
        "0.0.weight",
        "0.1.weight",
        "0.1.bias",
        "0.1.running_mean",
        "0.1.running_var",
        "0.1.num_batches_tracked",
        "1.block.0.0.weight",  # block 1: no expansion (16 -> 16): depthwise first
        "1.block.0.1.weight",
        "1.block.0.1.bias",
        "1.block.0.1.running_mean",
        "1.block.0.1.running_var",
        "1.block.0.1.num_batches_tracked",
    ]
    # block 4: expand, depthwise 5x5, squeeze-excitation (72 -> 24 -> 72), project
    block4 = {k[len("4.block.") :]: tuple(v.shape) for k, v in body.state_dict().items() if k.startswith("4.block.")}
    assert block4["0.0.weight"] == (72, 24, 1, 1)
    assert block4["1.0.weight"] == (72, 1, 5, 5)
    assert block4["2.fc1.weight"] == (24, 72, 1, 1) and block4["2.fc1.bias"] == (24,)
    assert block4["2.fc2.weight"] == (72, 24, 1, 1)
    assert block4["3.0.weight"] == (40, 72, 1, 1)
    assert keys[-6:] == [f"16.{s}" for s in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var")] + [
        "16.1.num_batches_tracked"
    ]
    assert len(keys) == len(set(keys)) == 308


def test_detector_keys_outside_the_trunk():
    with torch.device("meta"):
        model = BUILDERS["fasterrcnn_mobilenet_v3_large_320_fpn"](num_classes=91)
    rest = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.startswith("backbone.body.")]
    assert rest == [
        ("backbone.fpn.inner_blocks.0.0.weight", (256, 160, 1, 1)),
        ("backbone.fpn.inner_blocks.0.0.bias", (256,)),
        ("backbone.fpn.inner_blocks.1.0.weight", (256, 960, 1, 1)),
        ("backbone.fpn.inner_blocks.1.0.bias", (256,)),
        ("backbone.fpn.layer_blocks.0.0.weight", (256, 256, 3, 3)),
        ("backbone.fpn.layer_blocks.0.0.bias", (256,)),
        ("backbone.fpn.layer_blocks.1.0.weight", (256, 256, 3, 3)),
        ("backbone.fpn.layer_blocks.1.0.bias", (256,)),
        ("rpn.head.conv.0.0.weight", (256, 256, 3, 3)),
        ("rpn.head.conv.0.0.bias", (256,)),
        ("rpn.head.cls_logits.weight", (15, 256, 1, 1)),
        ("rpn.head.cls_logits.bias", (15,)),
        ("rpn.head.bbox_pred.weight", (60, 256, 1, 1)),
        ("rpn.head.bbox_pred.bias", (60,)),
        ("roi_heads.box_head.fc6.weight", (1024, 12544)),
        ("roi_heads.box_head.fc6.bias", (1024,)),
        ("roi_heads.box_head.fc7.weight", (1024, 1024)),
        ("roi_heads.box_head.fc7.bias", (1024,)),
        ("roi_heads.box_predictor.cls_score.weight", (91, 1024)),
        ("roi_heads.box_predictor.cls_score.bias", (91,)),
        ("roi_heads.box_predictor.bbox_pred.weight", (364, 1024)),
        ("roi_heads.box_predictor.bbox_pred.bias", (364,)),
    ]


def test_defaults_of_the_two_builders():
    with torch.device("meta"):
        big, small = (BUILDERS[n](num_classes=3) for n in MOBILE)
    assert (big.transform.min_size, big.transform.max_size) == ((800,), 1333)
    assert (small.transform.min_size, small.transform.max_size) == ((320,), 640)
    assert small.rpn._pre_nms_top_n["testing"] == small.rpn._post_nms_top_n["testing"] == 150
    assert big.rpn._post_nms_top_n["testing"] == 1000
    assert big.rpn.score_thresh == small.rpn.score_thresh == 0.05
    assert big.rpn.anchor_generator.num_anchors_per_location() == [15, 15, 15]


@pytest.mark.parametrize("trainable, first_trained", [(0, None), (1, 16), (2, 13), (3, 7), (4, 4), (5, 2), (6, 0)])
def test_trainable_layers_count_stages_from_the_end(trainable, first_trained):
    backbone = mobilenet_backbone(norm_layer=FrozenBatchNorm2d, trainable_layers=trainable)
    trained = {int(k.split(".")[0]) for k, p in backbone.body.named_parameters() if p.requires_grad}
    assert trained == (set() if first_trained is None else set(range(first_trained, 17)))
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        mobilenet_backbone(trainable_layers=7)


def test_without_weights_every_layer_trains_and_freezing_is_refused():
    model = BUILDERS["fasterrcnn_mobilenet_v3_large_fpn"](num_classes=3)
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model.backbone.body[0][1], torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        BUILDERS["fasterrcnn_mobilenet_v3_large_fpn"](num_classes=3, trainable_backbone_layers=3)


@pytest.mark.parametrize("name", MOBILE)
def test_a_training_step_reaches_every_trainable_parameter(name):
    torch.manual_seed(0)
    model = BUILDERS[name](num_classes=3, min_size=128, max_size=160).train()
    images = [torch.rand(3, 120, 160), torch.rand(3, 128, 128)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 60.0, 70.0], [30.0, 40.0, 120.0, 120.0]]), "labels": torch.tensor([2, 1])},
    ]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_imagenet_weights_load_into_the_trunk_and_the_classifier_is_skipped(tmp_path):
    torch.manual_seed(0)
    source = MobileNetV3Body()
    state = {f"features.{k}": v for k, v in source.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(1280, 960)
    torch.save(state, tmp_path / "mnv3.pth")
    model = BUILDERS["fasterrcnn_mobilenet_v3_large_fpn"](num_classes=3, weights_backbone=str(tmp_path / "mnv3.pth"))
    assert isinstance(model.backbone.body[0][1], FrozenBatchNorm2d)
    assert torch.equal(model.backbone.body[5].block[2].fc1.weight, source[5].block[2].fc1.weight)
    assert torch.equal(model.backbone.body[16][1].running_var, source[16][1].running_var)
    del state["features.3.block.1.0.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(
        ValueError, match=r"broken\.pth.*\n.*missing from the checkpoint \(1\):\n\s+3\.block\.1\.0\.weight"
    ):
        BUILDERS["fasterrcnn_mobilenet_v3_large_fpn"](num_classes=3, weights_backbone=str(tmp_path / "broken.pth"))


def test_optimised_model_keeps_the_detections():
    torch.manual_seed(0)
    model = BUILDERS["fasterrcnn_mobilenet_v3_large_320_fpn"](num_classes=4).eval()
    with torch.no_grad():  # spread the BatchNorm statistics so that folding them is not trivial; decisive heads
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.rpn.head.cls_logits.weight.mul_(20.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
    images = [torch.rand(3, 240, 320)]
    with torch.inference_mode():
        plain = model(images)[0]
        fast = model.optimize_for_inference()(images)[0]
    assert plain["boxes"].shape[0] >= 20
    iou = box_iou(plain["boxes"], fast["boxes"])
    same = (
        (iou >= 0.99)
        & (plain["labels"][:, None] == fast["labels"])
        & ((plain["scores"][:, None] - fast["scores"]).abs() <= 1e-3)
    )
    assert same.any(dim=1).float().mean() >= 0.98
