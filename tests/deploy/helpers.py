"""What the deploy tests share: a small detector that really detects, images of the synthetic data's kind,
and the agreement criterion of issue 15 (same label, IoU >= 0.99, score within 1e-3)."""

import numpy as np
import torch

from fasterrcnn.data.synth import SynthParams, draw_image
from fasterrcnn.model.builders import fasterrcnn_resnet18_fpn
from fasterrcnn.ops import box_iou

NAMES = ["__background__", "circle", "square", "triangle", "star"]
# none of these is the export example's size (2 x 3 x 96 x 128 in the tests)
SIZES = {"portrait": (120, 90), "landscape": (72, 112), "small": (40, 56)}


def decisive_model(seed: int = 0, **options) -> torch.nn.Module:
    """A from-scratch ResNet-18 FPN, small, whose RPN and classifier weights are scaled up so that a random
    network gives tens of detections well above the score threshold (as bench_inference.py does for R50)."""
    torch.manual_seed(seed)
    settings = dict(
        min_size=96,
        max_size=128,
        fpn_channels=16,
        representation_size=32,
        rpn_pre_nms_top_n_test=60,
        rpn_post_nms_top_n_test=40,
    )
    settings.update(options)
    model = fasterrcnn_resnet18_fpn(num_classes=len(NAMES), **settings).eval()
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.mul_(8.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(6.0)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(3.0)
    return model


def images(size: tuple[int, int], count: int = 2, seed: int = 3) -> list[torch.Tensor]:
    """Synthetic shapes, float [3, H, W] in [0, 1] (rounded from uint8, as the files take uint8)."""
    params = SynthParams(image_size=size, seed=seed, min_object_size=8)
    return [
        torch.from_numpy(np.ascontiguousarray(draw_image(params, i)[0])).permute(2, 0, 1).float() / 255
        for i in range(count)
    ]


def matched(ref: list[dict], other: list[dict]) -> tuple[int, int]:
    """(detections of ``ref`` that ``other`` has with the same label, IoU >= 0.99 and score within 1e-3, all)."""
    hit = total = 0
    for r, o in zip(ref, other, strict=True):
        total += len(r["scores"])
        if len(r["scores"]) == 0 or len(o["scores"]) == 0:
            continue
        ok = (box_iou(r["boxes"].float(), o["boxes"].float()) >= 0.99) & (r["labels"][:, None] == o["labels"][None, :])
        ok &= (r["scores"][:, None].float() - o["scores"][None, :].float()).abs() <= 1e-3
        hit += int(ok.any(dim=1).sum())
    return hit, total


def assert_same_detections(eager: list[dict], other: list[dict], share: float = 0.98) -> None:
    for ref, out, way in ((eager, other, "eager in exported"), (other, eager, "exported in eager")):
        hit, total = matched(ref, out)
        assert total > 0, "no detections to compare: the test model does not detect"
        assert hit >= share * total, f"{way}: {hit} of {total} detections matched"


def graph_results(outputs) -> list[dict]:
    boxes, scores, labels, counts = outputs
    return [
        {"boxes": boxes[i, : int(n)], "scores": scores[i, : int(n)], "labels": labels[i, : int(n)]}
        for i, n in enumerate(counts)
    ]
