"""Our ResNet-50-FPN v2 and torchvision-compatible backbone helpers against torchvision's, with the same weights.

Runs where torchvision is importable (never a dependency); `make test-parity` runs it in the reference
environment. torchvision's v2 keeps BatchNorm2d (in eval mode) in the trunk, the FPN and the box head: its
statistics are calibrated on images (the backbone's, then the box head's on the RoIs it sees) and the heads
are scaled so the RPN and the classifier decide, so that every stage shapes the detections.
"""

import os

import pytest
import torch

if os.environ.get("FASTERRCNN_REQUIRE_TORCHVISION") == "1":
    import torchvision as tv
else:
    tv = pytest.importorskip("torchvision")
from torchvision.models.detection.backbone_utils import mobilenet_backbone as tv_mobilenet_backbone
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7 as TVLastLevelP6P7

from fasterrcnn import fasterrcnn_resnet50_fpn_v2
from fasterrcnn.model import LastLevelP6P7, mobilenet_backbone, resnet_fpn_backbone
from tests.model.test_torchvision_parity import matched_over_batches, structured_images


def torchvision_v2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tv.models.detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            with torch.no_grad():
                m.weight.uniform_(0.6, 1.4)
                m.bias.uniform_(-0.2, 0.2)
    calibration = [model.transform([im])[0].tensors for im in structured_images(seed + 100)[:2]]
    model.eval()
    with torch.no_grad():
        model.backbone.train()
        for x in calibration:
            model.backbone(x)
        model.backbone.eval()
        model.roi_heads.box_head.train()  # its statistics on the RoIs of the calibrated backbone
        for im in structured_images(seed + 100)[:2]:
            model([im])
        model.roi_heads.box_head.eval()
        model.rpn.head.cls_logits.weight.mul_(7.0)
        model.rpn.head.bbox_pred.weight.mul_(3.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(6.0)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = torchvision_v2()
    path = tmp_path_factory.mktemp("tv") / "tv_fasterrcnn_resnet50_fpn_v2.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_v2_state_dict_keys_and_shapes_equal_torchvisions(checkpoint):
    ref, path = checkpoint
    ours = fasterrcnn_resnet50_fpn_v2(weights=str(path))
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    for trainable in range(6):
        # torchvision freezes like this when weights are given (it ignores the count without them)
        tv_backbone = tv.models.detection.backbone_utils._resnet_fpn_extractor(
            tv.models.resnet50(), trainable, norm_layer=torch.nn.BatchNorm2d
        )
        ours_t = fasterrcnn_resnet50_fpn_v2(weights=str(path), trainable_backbone_layers=trainable)
        expected = {k for k, p in tv_backbone.named_parameters() if p.requires_grad}
        assert {k for k, p in ours_t.backbone.named_parameters() if p.requires_grad} == expected, trainable


@pytest.mark.parametrize("optimised", [False, True], ids=["plain", "optimised"])
def test_v2_detections_match_torchvision(checkpoint, optimised):
    ref, path = checkpoint
    ours = fasterrcnn_resnet50_fpn_v2(weights=str(path)).eval()
    if optimised:
        ours.optimize_for_inference()
    label = f"v2 {'optimised' if optimised else 'plain'}: "
    share, _ = matched_over_batches(ref, ours, structured_images(seed=1)[:2], label)
    assert share >= 0.98


def _same_layout(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert {k for k, p in theirs.named_parameters() if p.requires_grad} == {
        k for k, p in ours.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("returned", [None, [2, 3]])
def test_resnet_fpn_backbone_is_torchvisions_call_and_layout(name, returned):
    kwargs = dict(backbone_name=name, weights=None, trainable_layers=2, returned_layers=returned)
    _same_layout(resnet_fpn_backbone(**kwargs), tv_resnet_fpn_backbone(**kwargs))
    p6p7 = dict(backbone_name=name, weights=None, extra_blocks=None)
    ours = resnet_fpn_backbone(**{**p6p7, "extra_blocks": LastLevelP6P7(256, 256)})
    theirs = tv_resnet_fpn_backbone(**{**p6p7, "extra_blocks": TVLastLevelP6P7(256, 256)})
    _same_layout(ours, theirs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    assert list(a) == list(b) == ["0", "1", "2", "3", "p6", "p7"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fpn", [True, False])
def test_mobilenet_backbone_is_torchvisions_call_and_layout(fpn):
    kwargs = dict(backbone_name="mobilenet_v3_large", weights=None, fpn=fpn, trainable_layers=3)
    ours, theirs = mobilenet_backbone(**kwargs), tv_mobilenet_backbone(**kwargs)
    if not fpn:  # torchvision's trunk: Sequential(features, 1x1 conv), keys "0.<block>...", "1.weight"
        _same_layout(ours, theirs)
        return
    _same_layout(ours, theirs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 160, 224)
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
