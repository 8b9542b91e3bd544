"""Our MobileNetV3-Large FPN detectors against torchvision's, with the same weights, on COCO-sized images.

Runs where torchvision is importable (never a dependency of the project); `make test-parity` runs it in the
reference environment. As for the R50-FPN (test_torchvision_parity.py): torchvision's own model, built as its
``weights=`` path builds it (FrozenBatchNorm2d, eps 1e-5), with BatchNorm statistics calibrated on images and
heads scaled so the RPN and the classifier decide, so that every stage shapes the detections.
"""

import os

import pytest
import torch

if os.environ.get("FASTERRCNN_REQUIRE_TORCHVISION") == "1":
    import torchvision as tv
else:
    tv = pytest.importorskip("torchvision")
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor
from torchvision.ops import misc as tv_misc

from fasterrcnn.model import BUILDERS
from tests.model.test_torchvision_parity import matched_over_batches, structured_images

TV_DEFAULTS = {
    "fasterrcnn_mobilenet_v3_large_fpn": {"rpn_score_thresh": 0.05},
    "fasterrcnn_mobilenet_v3_large_320_fpn": {
        "min_size": 320,
        "max_size": 640,
        "rpn_pre_nms_top_n_test": 150,
        "rpn_post_nms_top_n_test": 150,
        "rpn_score_thresh": 0.05,
    },
}


def torchvision_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 1) BatchNorm statistics from torchvision's from-scratch model, run in training mode on images
    calib = getattr(tv.models.detection, name)(weights=None, weights_backbone=None, num_classes=91)
    for m in calib.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            with torch.no_grad():
                m.weight.uniform_(0.6, 1.4)
                m.bias.uniform_(-0.2, 0.2)
    calib.backbone.train()
    with torch.no_grad():
        for im in structured_images(seed + 100)[:2]:
            calib.backbone(calib.transform([im])[0].tensors)
    # 2) the "weights=" layout: FrozenBatchNorm2d, three trainable stages
    trunk = tv.models.mobilenet_v3_large(norm_layer=tv_misc.FrozenBatchNorm2d)
    sizes = ((32, 64, 128, 256, 512),) * 3
    model = TVFasterRCNN(
        _mobilenet_extractor(trunk, True, 3),
        num_classes=91,
        rpn_anchor_generator=TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 3),
        **TV_DEFAULTS[name],
    )
    model.load_state_dict({k: v for k, v in calib.state_dict().items() if "num_batches_tracked" not in k})
    # 3) decisive heads
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.mul_(7.0)
        model.rpn.head.bbox_pred.weight.mul_(3.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(6.0)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(TV_DEFAULTS))
def pair(request, tmp_path_factory):
    name = request.param
    ref = torchvision_model(name)
    path = tmp_path_factory.mktemp("tv") / f"tv_{name}.pth"
    torch.save(ref.state_dict(), path)
    return name, ref, path


def test_state_dict_keys_and_shapes_equal_torchvisions(pair):
    name, ref, path = pair
    ours = BUILDERS[name](weights=str(path))
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    scratch_tv = getattr(tv.models.detection, name)(weights=None, weights_backbone=None).state_dict()
    with torch.device("meta"):
        scratch = BUILDERS[name]().state_dict()
    assert list(scratch_tv) == list(scratch)
    assert all(scratch_tv[k].shape == scratch[k].shape for k in scratch)


def test_trainable_layers_as_torchvisions(pair):
    name, _, path = pair
    for trainable in range(7):
        # torchvision's freezing as its weights= path applies it
        trunk = tv.models.mobilenet_v3_large(norm_layer=tv_misc.FrozenBatchNorm2d)
        tv_backbone = _mobilenet_extractor(trunk, True, trainable)
        ours = BUILDERS[name](weights=str(path), trainable_backbone_layers=trainable)
        expected = {k for k, p in tv_backbone.named_parameters() if p.requires_grad}
        got = {k for k, p in ours.backbone.named_parameters() if p.requires_grad}
        assert got == expected, trainable


@pytest.mark.parametrize("optimised", [False, True], ids=["plain", "optimised"])
def test_detections_match_torchvision(pair, optimised):
    name, ref, path = pair
    ours = BUILDERS[name](weights=str(path)).eval()
    if optimised:
        ours.optimize_for_inference()
    label = f"{name} {'optimised' if optimised else 'plain'}: "
    share, _ = matched_over_batches(ref, ours, structured_images(seed=1), label)
    assert share >= 0.98
