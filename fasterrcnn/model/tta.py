"""Test-time augmentation: the detector run on each image at several sizes and mirrored, the detections merged.

    tta = TestTimeAugmentation(model, scales=(0.8, 1.0, 1.2), hflip=True, merge="nms")
    detections = tta(images)          # like model(images): B x {boxes, scores, labels}, in the images' pixels

Shape legend: B images ``Tensor[3, H, W]``; P passes (len(scales) x (2 if hflip else 1)); per image D_p detections
of each pass, D <= detections_per_img after merging.

A pass at scale s runs the model with its resize targets (``transform.min_size``, ``max_size``) multiplied by s,
so the network sees the image s times as large as usual; a mirrored pass runs on the image flipped left-right
and mirrors its boxes back (``x1, x2 -> W - x2, W - x1``). The detections of all passes (each already
post-processed: score threshold, per-class NMS, its best ``detections_per_img``) are merged per image and class:
``merge="nms"`` keeps the best-scoring box of each overlapping group (IoU > ``iou_threshold``); ``"voting"``
(Gidaris and Komodakis, ICCV 2015) keeps the same boxes but moves each to the score-weighted mean of the boxes of
its class overlapping it at IoU >= ``iou_threshold``, from every pass. The image's ``detections_per_img`` best
are returned. With ``scales=(1.0,)`` and no flip this is the model itself.

Wraps our ``FasterRCNN`` (it changes the transform's sizes during a pass and restores them); the model is shared,
not copied, so wrap an optimised model to run the fast path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops import batched_nms, box_iou

MERGES = ("nms", "voting")


class TestTimeAugmentation(nn.Module):
    __test__ = False  # not a pytest test class

    def __init__(
        self,
        model: nn.Module,
        *,
        scales: tuple[float, ...] = (0.8, 1.0, 1.2),
        hflip: bool = True,
        merge: str = "nms",
        iou_threshold: float = 0.5,
        detections_per_img: int | None = None,
    ):
        super().__init__()
        transform = getattr(model, "transform", None)
        if transform is None or not hasattr(transform, "min_size") or not hasattr(transform, "max_size"):
            raise ValueError(
                "test-time augmentation needs a fasterrcnn FasterRCNN (it resizes through the model's transform); "
                f"got {type(model).__name__}: an exported model runs without it"
            )
        scales = tuple(float(s) for s in scales)
        if not scales or any(not 0.1 <= s <= 4.0 for s in scales):
            raise ValueError(f"tta scales must be numbers in [0.1, 4], at least one, got {list(scales)}")
        if merge not in MERGES:
            raise ValueError(f"tta merge must be one of {', '.join(MERGES)}, got {merge!r}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"tta iou_threshold must lie in (0, 1], got {iou_threshold}")
        self.model = model
        self.scales, self.hflip, self.merge, self.iou_threshold = scales, bool(hflip), merge, float(iou_threshold)
        heads = getattr(model, "roi_heads", None)
        per_image: Any = detections_per_img or getattr(heads, "detections_per_img", 100)
        self.detections_per_img = int(per_image)
        self.training = bool(model.training)  # the wrapper's mode is the model's (eval for an optimised model)

    def passes(self) -> list[tuple[float, bool]]:
        return [(s, f) for s in self.scales for f in ((False, True) if self.hflip else (False,))]

    @torch.inference_mode()
    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        if self.model.training:
            raise RuntimeError("test-time augmentation is for inference: call .eval() first")
        transform: Any = self.model.transform  # a DetectionTransform: min_size (a tuple), max_size
        min_size, max_size = tuple(transform.min_size), transform.max_size
        found: list[list[dict]] = [[] for _ in images]
        try:
            for scale, flip in self.passes():
                transform.min_size = tuple(max(1, round(m * scale)) for m in min_size)
                transform.max_size = max(1, round(max_size * scale))
                batch = [im.flip(-1) if flip else im for im in images]
                for i, (image, det) in enumerate(zip(images, self.model(batch))):
                    boxes = det["boxes"]
                    if flip:
                        width = image.shape[-1]
                        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
                    found[i].append({**det, "boxes": boxes})
        finally:
            transform.min_size, transform.max_size = min_size, max_size
        return [self._merge(per_pass) for per_pass in found]

    def _merge(self, per_pass: list[dict]) -> dict:
        boxes = torch.cat([d["boxes"].float() for d in per_pass])
        scores = torch.cat([d["scores"].float() for d in per_pass])
        labels = torch.cat([d["labels"] for d in per_pass])
        keep = batched_nms(boxes, scores, labels, self.iou_threshold)[: self.detections_per_img]  # by score
        kept = boxes[keep]
        if self.merge == "voting" and len(keep):
            iou = box_iou(kept, boxes)  # [K, N]
            voters = (iou >= self.iou_threshold) & (labels[keep][:, None] == labels[None, :])
            weights = voters.float() * scores[None, :]  # each kept box votes for itself too
            kept = (weights @ boxes) / weights.sum(dim=1, keepdim=True)
        return {"boxes": kept, "scores": scores[keep], "labels": labels[keep]}
