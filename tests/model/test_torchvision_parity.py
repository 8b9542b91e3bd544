"""Our R50-FPN against torchvision's, with the same weights, on COCO-sized images.

Runs where torchvision is importable (it is never a dependency of the project):
    REF=$(../shared/tools/reference-env.sh) && "$REF/bin/pip" install -q pytest
    PYTHONPATH=. "$REF/bin/python" -m pytest -s tests/model/test_torchvision_parity.py

There are no published weights on this offline machine, so the test makes a torchvision checkpoint that
behaves like a trained one: torchvision's own model, built as its ``weights=`` path builds it
(FrozenBatchNorm2d, eps 0), with BatchNorm statistics calibrated on images so features are well scaled,
and heads scaled up so the RPN ranks anchors decisively and the classifier is confident: every stage
(resize, backbone, FPN, anchors, proposals, NMS, RoIAlign, box head, per-class NMS) shapes the output.
"""

import os

import pytest
import torch

if os.environ.get("FASTERRCNN_REQUIRE_TORCHVISION") == "1":  # `make test-parity` (CI): missing is a failure
    import torchvision as tv
else:
    tv = pytest.importorskip("torchvision")
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import misc as tv_misc

from fasterrcnn import fasterrcnn_resnet50_fpn
from fasterrcnn.ops import box_iou

SIZES = [(480, 640), (427, 640), (640, 480), (375, 500)]


def structured_images(seed: int):
    """Smooth colour fields with rectangles and discs: natural-ish statistics, COCO-like sizes."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for h, w in SIZES:
        low = torch.rand(1, 3, h // 32 + 1, w // 32 + 1, generator=g)
        im = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        for _ in range(8):
            cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
            r = int(torch.randint(10, min(h, w) // 3, (1,), generator=g))
            colour = torch.rand(3, 1, 1, generator=g)
            mask = (
                ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
                if torch.rand(1, generator=g) < 0.5
                else ((yy - cy).abs() < r) & ((xx - cx).abs() < r * 0.6)
            )
            im = torch.where(mask, colour, im)
        images.append((im + 0.03 * torch.randn(im.shape, generator=g)).clamp(0, 1))
    return images


def make_trained_like_torchvision_model(seed: int = 0):
    torch.manual_seed(seed)
    # 1) calibrate BatchNorm statistics with torchvision's from-scratch model (BatchNorm2d)
    calib = tv.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    for m in calib.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
            with torch.no_grad():
                m.weight.uniform_(0.6, 1.4)
                m.bias.uniform_(-0.2, 0.2)
    calib.backbone.train()
    with torch.no_grad():
        for im in structured_images(seed + 100)[:2]:
            x = calib.transform([im])[0].tensors
            calib.backbone(x)
    # 2) torchvision's "weights=" layout: FrozenBatchNorm2d, eps 0.0
    body = tv.models.resnet50(norm_layer=tv_misc.FrozenBatchNorm2d)
    model = TVFasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=91)
    sd = {k: v for k, v in calib.state_dict().items() if "num_batches_tracked" not in k}
    model.load_state_dict(sd)
    for m in model.modules():
        if isinstance(m, tv_misc.FrozenBatchNorm2d):
            m.eps = 0.0
    # 3) decisive heads
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.mul_(7.0)
        model.rpn.head.bbox_pred.weight.mul_(3.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(6.0)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(3.0)
    return model.eval()


def match_rate(ref: dict, ours: dict, iou_min=0.99, score_tol=1e-3) -> tuple[float, int]:
    """Share of the reference's detections with one of ours of the same label, IoU >= iou_min and
    score within score_tol."""
    n = ref["boxes"].shape[0]
    if n == 0:
        return 1.0, 0
    if ours["boxes"].shape[0] == 0:
        return 0.0, n
    iou = box_iou(ref["boxes"], ours["boxes"])
    ok = (
        (iou >= iou_min)
        & (ref["labels"][:, None] == ours["labels"][None, :])
        & ((ref["scores"][:, None] - ours["scores"][None, :]).abs() <= score_tol)
    )
    return float(ok.any(dim=1).float().mean()), n


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_trained_like_torchvision_model()
    path = tmp_path_factory.mktemp("tv") / "tv_fasterrcnn_resnet50_fpn.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_state_dict_keys_and_shapes_equal_torchvisions(checkpoint):
    ref, path = checkpoint
    ours = fasterrcnn_resnet50_fpn(weights=str(path))
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    # torchvision's from-scratch layout (BatchNorm2d with step counters) is ours from scratch too
    scratch_tv = tv.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    with torch.device("meta"):
        scratch = fasterrcnn_resnet50_fpn().state_dict()
    assert list(scratch_tv) == list(scratch)
    assert all(scratch_tv[k].shape == scratch[k].shape for k in scratch)


def matched_over_batches(ref, ours, images, label: str = "") -> tuple[float, int]:
    """(share of torchvision's detections that ours matches, their count) over ``images`` one at a time and the
    first two in a padded batch; prints each image's counts."""
    total = matched = 0.0
    with torch.inference_mode():
        for batch in [[im] for im in images] + [images[:2]]:  # one at a time, and a padded batch of two
            for r, o in zip(ref(batch), ours(batch)):
                rate, n = match_rate(r, o)
                print(f"{label}torchvision {n:3d} detections, ours {o['boxes'].shape[0]:3d}, matched {rate:.3f}")
                total += n
                matched += rate * n
    assert total >= 200, "the reference model must really detect for the comparison to mean anything"
    print(f"{label}overall: {matched / total:.4f} of {int(total)} torchvision detections matched")
    return matched / total, int(total)


def test_detections_match_torchvision(checkpoint):
    ref, path = checkpoint
    ours = fasterrcnn_resnet50_fpn(weights=str(path)).eval()
    share, _ = matched_over_batches(ref, ours, structured_images(seed=1))
    assert share >= 0.98


def test_legacy_key_names_load(checkpoint):
    ref, path = checkpoint
    legacy = {}
    for k, v in ref.state_dict().items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for kind in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                k = k.replace(f"fpn.{kind}.{i}.0.", f"fpn.{kind}.{i}.")
        legacy[k] = v
    assert "rpn.head.conv.weight" in legacy and "backbone.fpn.inner_blocks.0.weight" in legacy
    legacy_path = path.parent / "legacy.pth"
    torch.save({"model": legacy}, legacy_path)
    ours = fasterrcnn_resnet50_fpn(weights=str(legacy_path))
    assert torch.equal(ours.rpn.head.conv[0][0].weight, ref.rpn.head.conv[0][0].weight)
