"""The builder options the ablation grid uses: RoI op and size on the FPN model, the ResNet-18 C4 model."""

import torch

from fasterrcnn.model import fasterrcnn_resnet18_c4, fasterrcnn_resnet18_fpn
from fasterrcnn.ops import MultiScaleRoIAlign, MultiScaleRoIPool, roi_pool

SMALL = dict(
    num_classes=3,
    min_size=64,
    max_size=96,
    representation_size=16,
    rpn_pre_nms_top_n_test=20,
    rpn_post_nms_top_n_test=10,
)


def test_multiscale_roipool_reads_each_rois_level_with_roipool():
    g = torch.Generator().manual_seed(0)
    features = {"0": torch.randn(1, 3, 16, 16, generator=g), "1": torch.randn(1, 3, 8, 8, generator=g)}
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [4.0, 8.0, 60.0, 50.0]])]
    # canonical scale 16 at level 2 (stride 4): the 20-px box reads map "0", the 56x42 one map "1"
    pooler = MultiScaleRoIPool(["0", "1"], output_size=2, canonical_scale=16, canonical_level=2)
    out = pooler(features, boxes, [(64, 64)])
    assert torch.equal(out[0], roi_pool(features["0"], [boxes[0][:1]], 2, 0.25)[0])
    assert torch.equal(out[1], roi_pool(features["1"], [boxes[0][1:]], 2, 0.125)[0])


def test_fpn_roi_options_keep_the_default_layout():
    torch.manual_seed(0)
    default = fasterrcnn_resnet18_fpn(**SMALL)
    assert isinstance(default.roi_heads.box_roi_pool, MultiScaleRoIAlign)
    assert default.roi_heads.box_roi_pool.output_size == (7, 7)
    pool5 = fasterrcnn_resnet18_fpn(roi_op="roi_pool", roi_output_size=5, **SMALL)
    assert isinstance(pool5.roi_heads.box_roi_pool, MultiScaleRoIPool)
    assert pool5.roi_heads.box_head.fc6.in_features == 256 * 5 * 5
    assert list(pool5.state_dict()) == list(default.state_dict())  # same keys: only shapes of fc6 differ
    pool5.eval()
    with torch.inference_mode():
        (det,) = pool5([torch.rand(3, 64, 96)])
    assert det["boxes"].shape[1] == 4


def test_resnet18_c4_trains_and_detects_on_one_map():
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_c4(anchor_sizes=[16, 32, 64], roi_output_size=5, **SMALL)
    assert list(model.backbone(torch.rand(1, 3, 64, 64))) == ["0"]
    assert model.backbone.out_channels == 256 and model.rpn.head.cls_logits.out_channels == 9
    losses = model.train()(
        [torch.rand(3, 64, 96)], [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1])}]
    )
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    sum(losses.values()).backward()
    model.eval()
    with torch.inference_mode():
        (det,) = model([torch.rand(3, 64, 96)])
    assert det["boxes"].shape[1] == 4
