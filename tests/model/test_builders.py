import pytest
import torch

from fasterrcnn.model import (
    FrozenBatchNorm2d,
    fasterrcnn_resnet18_fpn,
    fasterrcnn_resnet50_c4,
    fasterrcnn_resnet50_c5,
    fasterrcnn_resnet50_fpn,
)
from fasterrcnn.model.resnet import ResNetBody

from .helpers import sample_batch, tiny_model


def _r50_keys():
    with torch.device("meta"):
        return fasterrcnn_resnet50_fpn().state_dict()


def test_resnet50_fpn_state_dict_layout_is_torchvisions():
    sd = _r50_keys()
    # Spot checks of torchvision's fasterrcnn_resnet50_fpn (v1) layout, key by key.
    expected = {
        "backbone.body.conv1.weight": (64, 3, 7, 7),
        "backbone.body.bn1.running_var": (64,),
        "backbone.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.body.layer3.5.conv2.weight": (256, 256, 3, 3),
        "backbone.body.layer4.2.bn3.bias": (2048,),
        "backbone.fpn.inner_blocks.0.0.weight": (256, 256, 1, 1),
        "backbone.fpn.inner_blocks.3.0.weight": (256, 2048, 1, 1),
        "backbone.fpn.layer_blocks.2.0.bias": (256,),
        "rpn.head.conv.0.0.weight": (256, 256, 3, 3),
        "rpn.head.cls_logits.weight": (3, 256, 1, 1),
        "rpn.head.bbox_pred.weight": (12, 256, 1, 1),
        "roi_heads.box_head.fc6.weight": (1024, 256 * 7 * 7),
        "roi_heads.box_head.fc7.weight": (1024, 1024),
        "roi_heads.box_predictor.cls_score.weight": (91, 1024),
        "roi_heads.box_predictor.bbox_pred.weight": (364, 1024),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    # the body's 53 convs and 53 norms (from scratch: BatchNorm2d, 5 tensors each), then 8 FPN convs,
    # 3 RPN convs and 4 linears with a weight and a bias each
    assert len(sd) == 53 + 53 * 5 + 8 * 2 + 3 * 2 + 4 * 2
    assert sum("num_batches_tracked" in k for k in sd) == 53


def test_norm_layers_and_trainable_layers(tmp_path):
    scratch = fasterrcnn_resnet18_fpn(num_classes=3)
    assert isinstance(scratch.backbone.body.bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in scratch.parameters())
    with pytest.raises(ValueError, match="only makes sense with"):
        fasterrcnn_resnet18_fpn(num_classes=3, trainable_backbone_layers=2)

    # an "ImageNet" checkpoint of our own making: a ResNet-18 body plus a classifier
    body = ResNetBody(18, num_stages=4)
    sd = dict(body.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)
    m = fasterrcnn_resnet18_fpn(num_classes=3, weights_backbone=str(path))
    assert isinstance(m.backbone.body.bn1, FrozenBatchNorm2d) and m.backbone.body.bn1.eps == 1e-5
    assert torch.equal(m.backbone.body.layer2[0].conv1.weight, body.layer2[0].conv1.weight)
    trainable = {n.split(".")[2] for n, p in m.named_parameters() if p.requires_grad and n.startswith("backbone.body")}
    assert trainable == {"layer2", "layer3", "layer4"}  # default: the last 3
    m = fasterrcnn_resnet18_fpn(num_classes=3, weights_backbone=str(path), trainable_backbone_layers=0)
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith("backbone.body"))
    assert all(p.requires_grad for n, p in m.named_parameters() if not n.startswith("backbone.body"))


def test_a_detector_checkpoint_starts_the_backbone_of_another(tmp_path):
    """weights_backbone may be one of our checkpoints (the model under "model"): its backbone.body
    (trunk and BatchNorm statistics) is taken, and nothing else (FPN, heads, class count) is."""
    donor = fasterrcnn_resnet18_fpn(num_classes=5)
    with torch.no_grad():
        donor.backbone.body.bn1.running_mean.uniform_(-1, 1)
    path = tmp_path / "donor.pt"
    torch.save({"model": donor.state_dict(), "iteration": 3}, path)
    m = fasterrcnn_resnet18_fpn(num_classes=3, weights_backbone=str(path))
    assert isinstance(m.backbone.body.bn1, FrozenBatchNorm2d)
    assert torch.equal(m.backbone.body.bn1.running_mean, donor.backbone.body.bn1.running_mean)
    assert torch.equal(m.backbone.body.layer4[1].conv2.weight, donor.backbone.body.layer4[1].conv2.weight)
    assert not torch.equal(m.backbone.fpn.inner_blocks[0][0].weight, donor.backbone.fpn.inner_blocks[0][0].weight)
    assert m.roi_heads.box_predictor.cls_score.out_features == 3


def test_backbone_checkpoint_that_does_not_fit_is_refused(tmp_path):
    body = ResNetBody(34, num_stages=4)
    path = tmp_path / "resnet34.pth"
    torch.save(body.state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet34.pth do not fit"):
        fasterrcnn_resnet18_fpn(num_classes=3, weights_backbone=str(path))


@pytest.mark.parametrize(
    "builder, roi_op",
    [
        (fasterrcnn_resnet50_c4, "roi_pool"),
        (fasterrcnn_resnet50_c4, "roi_align"),
        (fasterrcnn_resnet50_c5, "roi_align"),
    ],
)
def test_single_map_variants_train_and_detect(builder, roi_op):
    model = builder(
        num_classes=4,
        roi_op=roi_op,
        min_size=96,
        max_size=128,
        rpn_pre_nms_top_n_train=100,
        rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=20,
        box_batch_size_per_image=16,
        box_score_thresh=0.0,
    )
    assert model.rpn.anchor_generator.num_anchors_per_location() == [9]
    assert list(model.backbone(torch.zeros(1, 3, 64, 64)).keys()) == ["0"]
    assert model.roi_heads.box_roi_pool.op == roi_op
    images, targets = sample_batch()
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


def test_c4_backbone_weights_fill_the_res5_head(tmp_path):
    body = ResNetBody(50, num_stages=4)
    path = tmp_path / "resnet50.pth"
    torch.save(body.state_dict(), path)
    m = fasterrcnn_resnet50_c4(num_classes=3, weights_backbone=str(path))
    assert torch.equal(m.roi_heads.box_head.layer4[1].conv2.weight, body.layer4[1].conv2.weight)
    assert torch.equal(m.backbone.body.layer3[0].conv1.weight, body.layer3[0].conv1.weight)
    assert not hasattr(m.backbone.body, "layer4")


def test_custom_backbone_and_predictor_swap():
    # the fine-tuning recipe: replace the predictor for a new number of classes
    from fasterrcnn.model import FastRCNNPredictor

    model = tiny_model(num_classes=4)
    model.roi_heads.box_predictor = FastRCNNPredictor(64, 7)
    assert model.num_classes == 7
    images, targets = sample_batch(num_classes=7)
    losses = model.train()(images, targets)
    assert torch.isfinite(sum(losses.values()))


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_fpn_with_norm_layers_trains(norm):
    model = tiny_model(fpn_norm=norm)
    assert "backbone.fpn.inner_blocks.0.1.weight" in model.state_dict()  # conv, then norm
    assert model.backbone.fpn.inner_blocks[0][0].bias is None
    images, targets = sample_batch()
    losses = model.train()(images, targets)
    sum(losses.values()).backward()
    assert model.backbone.fpn.layer_blocks[0][1].weight.grad is not None


def test_anchor_sizes_option():
    model = tiny_model(anchor_sizes=(16, 32, 64, 128, 256))
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    with pytest.raises(ValueError, match="one size per level"):
        tiny_model(anchor_sizes=(16, 32))
