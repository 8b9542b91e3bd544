"""Pascal VOC detection AP at one IoU threshold (0.5 by default), in both of VOC's forms.

- ``"11point"`` (VOC2007): the mean, over recall thresholds t = 0, 0.1, ..., 1, of the highest
  precision reached at any recall >= t (0 when recall never reaches t). The thresholds are the exact
  fractions k/10, so a recall of exactly 0.3 (3 of 10 objects) counts for t = 0.3.
- ``"area"`` (VOC2010 onwards): precision is first made monotonically non-increasing (each point takes
  the highest precision at its recall or beyond), then summed over the recall steps:
  ``sum_i (r_i - r_{i-1}) * p_envelope_i`` with ``r_0 = 0``.

Matching, per class, over the whole set of images:

- detections are taken in descending score order (stable: ties keep image order, then the order within
  an image); each is compared with the ground truth of its class in its image and goes to the one it
  overlaps most. IoU >= ``iou_threshold`` with that object makes it a true positive if the object is not
  yet claimed, a false positive (duplicate) if a higher-scored detection claimed it. As in the VOC
  protocol, a detection whose best object is already claimed does not fall back to its second best.
- ``difficult`` objects: a detection whose best object is difficult is ignored (neither TP nor FP), and
  difficult objects do not count among the positives. ``iscrowd`` is not used by VOC evaluation.
- IoU is the project's continuous-coordinate IoU (``fasterrcnn.ops.box_iou``: xyxy, width = x2 - x1),
  not the VOC2007 devkit's inclusive-pixel convention (width = x2 - x1 + 1). Numbers can differ
  slightly from the devkit's on small boxes; they agree with how the model and the COCO path see boxes.

A class without (non-difficult) ground truth has no defined AP: it is NaN and left out of the mean
(its detections are false positives that no AP can register). A class with ground truth but no
detections has AP 0. With no detections at all, every class with ground truth has AP 0 and
``VocMetrics.message`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..ops import box_iou
from ._io import write_json

__all__ = ["VocClassResult", "VocMetrics", "average_precision", "evaluate_voc"]

AP_METHODS = ("11point", "area")
NO_DETECTIONS = "no detections: every class with ground truth has AP 0"
NO_GROUND_TRUTH = "no class has (non-difficult) ground truth: mAP is undefined (NaN)"


def average_precision(recall, precision, method: str = "11point") -> float:
    """AP of one precision/recall curve (points in detection order, recall non-decreasing).

    ``method="11point"`` is VOC2007's interpolated AP, ``"area"`` the VOC2010+ area under the
    monotone precision envelope. An empty curve (no detections) has AP 0.
    """
    if method not in AP_METHODS:
        raise ValueError(f"method {method!r}: expected one of {AP_METHODS}")
    r = np.asarray(recall, dtype=np.float64).reshape(-1)
    p = np.asarray(precision, dtype=np.float64).reshape(-1)
    if r.shape != p.shape:
        raise ValueError(f"recall has {r.size} points and precision {p.size}; expected the same number")
    if r.size == 0:
        return 0.0
    if np.any(np.diff(r) < 0):
        raise ValueError("recall must be non-decreasing (points in descending score order)")
    # envelope[i] = max(p[i:]): the best precision at recall r[i] or beyond
    envelope = np.maximum.accumulate(p[::-1])[::-1]
    if method == "11point":
        thresholds = np.arange(11) / 10.0
        first = np.searchsorted(r, thresholds, side="left")  # first point with recall >= t
        reached = first < r.size
        best = np.where(reached, envelope[np.minimum(first, r.size - 1)], 0.0)
        return float(best.mean())
    widths = np.diff(r, prepend=0.0)  # 0 where recall does not move (a false positive)
    return float(np.sum(widths * envelope))


@dataclass(frozen=True)
class VocClassResult:
    """One class: AP both ways (NaN without ground truth), counts, and its precision/recall curve."""

    label: int
    name: str
    num_gt: int  # non-difficult ground-truth objects (the positives)
    num_difficult: int
    num_detections: int
    num_tp: int
    num_fp: int
    num_ignored: int  # detections whose best object is difficult
    ap_11point: float
    ap_area: float
    recall: np.ndarray = field(repr=False)
    precision: np.ndarray = field(repr=False)


@dataclass
class VocMetrics:
    """Per-class VOC AP and the two mAPs (means over classes with ground truth)."""

    map_11point: float
    map_area: float
    iou_threshold: float
    per_class: list[VocClassResult]
    num_images: int
    num_detections: int
    message: str | None = None

    @property
    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Class name -> (recall, precision), for the classes with ground truth."""
        return {c.name: (c.recall, c.precision) for c in self.per_class if c.num_gt > 0}

    def as_dict(self) -> dict:
        """JSON-ready numbers (NaN becomes None); curves are left out."""

        def num(v: float):
            return None if math.isnan(v) else v

        return {
            "map_11point": num(self.map_11point),
            "map_area": num(self.map_area),
            "iou_threshold": self.iou_threshold,
            "per_class": [
                {
                    "label": c.label,
                    "name": c.name,
                    "num_gt": c.num_gt,
                    "num_difficult": c.num_difficult,
                    "num_detections": c.num_detections,
                    "num_tp": c.num_tp,
                    "num_fp": c.num_fp,
                    "num_ignored": c.num_ignored,
                    "ap_11point": num(c.ap_11point),
                    "ap_area": num(c.ap_area),
                }
                for c in self.per_class
            ],
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "message": self.message,
        }

    def to_json(self, path) -> Path:
        return write_json(path, self.as_dict())

    def format_table(self) -> str:
        def num(v: float) -> str:
            return "n/a" if math.isnan(v) else f"{v:.4f}"

        width = max([len("class")] + [len(c.name) for c in self.per_class])
        lines = [
            f"VOC evaluation at IoU {self.iou_threshold:g}: {self.num_images} images, {self.num_detections} detections",
            f"  mAP (VOC2007 11-point) {num(self.map_11point)}",
            f"  mAP (area, VOC2010+)   {num(self.map_area)}",
        ]
        if self.message:
            lines.append(f"note: {self.message}")
        lines.append("")
        lines.append(
            f"  {'label':>5}  {'class':<{width}}  {'gt':>5}  {'diff':>5}  {'dets':>6}  {'tp':>5}  {'fp':>6}"
            f"  {'11point':>7}  {'area':>7}"
        )
        for c in self.per_class:
            lines.append(
                f"  {c.label:>5}  {c.name:<{width}}  {c.num_gt:>5}  {c.num_difficult:>5}  "
                f"{c.num_detections:>6}  {c.num_tp:>5}  {c.num_fp:>6}  {num(c.ap_11point):>7}  "
                f"{num(c.ap_area):>7}"
            )
        return "\n".join(lines)


def _field(d: Mapping, key: str, where: str, default=None) -> torch.Tensor:
    if key not in d:
        if default is None:
            raise ValueError(f"{where}: missing field {key!r}")
        return default
    try:
        return torch.as_tensor(d[key]).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{where}: field {key!r} is not array-like ({err})") from None


def _boxes(d: Mapping, where: str) -> torch.Tensor:
    boxes = _field(d, "boxes", where).to(torch.float64)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: field 'boxes' has shape {tuple(boxes.shape)}, expected [N, 4] (x1, y1, x2, y2)")
    return boxes


def _labels(d: Mapping, n: int, num_classes: int, where: str) -> torch.Tensor:
    labels = _field(d, "labels", where).reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"{where}: {n} boxes but {labels.numel()} labels; expected one label per box")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError(f"{where}: field 'labels' holds non-integer values")
    labels = labels.long()
    bad = labels[(labels < 1) | (labels > num_classes)]
    if bad.numel():
        raise ValueError(f"{where}: label {int(bad[0])} is outside 1..{num_classes} (0 is background)")
    return labels


def _class_names(class_names, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(label) for label in range(1, num_classes + 1)]
    names = [str(n) for n in class_names]
    if len(names) == num_classes + 1:  # a dataset's class_names, background first
        names = names[1:]
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} names; expected {num_classes} "
            f"(labels 1..{num_classes}) or {num_classes + 1} with the background first"
        )
    return names


def evaluate_voc(
    detections: Sequence[Mapping],
    ground_truths: Sequence[Mapping],
    num_classes: int,
    iou_threshold: float = 0.5,
    class_names: Sequence[str] | None = None,
) -> VocMetrics:
    """VOC AP per class (11-point and area) and the two mAPs over a set of images.

    ``detections[i]`` (``boxes`` xyxy, ``labels`` 1..C, ``scores``) and ``ground_truths[i]`` (``boxes``,
    ``labels``, optional ``difficult`` bool) describe the same image. ``class_names`` names labels
    1..C (a dataset's list with ``"__background__"`` first is accepted too).
    """
    if len(detections) != len(ground_truths):
        raise ValueError(
            f"got {len(detections)} detection dicts and {len(ground_truths)} ground-truth dicts; "
            "expected one of each per image"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes is {num_classes}; expected at least 1")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold is {iou_threshold}; expected a value in (0, 1]")
    names = _class_names(class_names, num_classes)

    # Flatten every image into one table of detections and one of ground truth. For each detection we
    # keep the ground-truth object (global index) of its class in its image that it overlaps most.
    det_labels, det_scores, det_best_gt, det_best_iou = [], [], [], []
    gt_labels, gt_difficult = [], []
    num_gt_before = 0
    for i, (det, gt) in enumerate(zip(detections, ground_truths)):
        g_boxes = _boxes(gt, f"ground truth of image {i}")
        g_labels = _labels(gt, len(g_boxes), num_classes, f"ground truth of image {i}")
        g_diff = (
            _field(gt, "difficult", f"ground truth of image {i}", default=torch.zeros(len(g_boxes), dtype=torch.bool))
            .reshape(-1)
            .bool()
        )
        if g_diff.numel() != len(g_boxes):
            raise ValueError(f"ground truth of image {i}: {len(g_boxes)} boxes but {g_diff.numel()} difficult flags")
        d_boxes = _boxes(det, f"detections of image {i}")
        d_labels = _labels(det, len(d_boxes), num_classes, f"detections of image {i}")
        d_scores = _field(det, "scores", f"detections of image {i}").to(torch.float64).reshape(-1)
        if d_scores.numel() != len(d_boxes):
            raise ValueError(f"detections of image {i}: {len(d_boxes)} boxes but {d_scores.numel()} scores")

        d_labels_np = d_labels.numpy()
        g_labels_np = g_labels.numpy()
        best_iou = np.full(len(d_boxes), -1.0)
        best_gt = np.full(len(d_boxes), -1, dtype=np.int64)
        if len(d_boxes) and len(g_boxes):
            iou = box_iou(d_boxes, g_boxes).numpy()  # [D, N]
            iou = np.where(d_labels_np[:, None] == g_labels_np[None, :], iou, -1.0)  # other classes never match
            # (numpy, not torch: torch's float64 max over a dim is very slow on CPU for small matrices)
            idx = iou.argmax(axis=1)  # the first of equal overlaps wins
            best_iou = iou[np.arange(len(idx)), idx]
            best_gt = np.where(best_iou >= 0, idx + num_gt_before, -1)
        det_labels.append(d_labels_np)
        det_scores.append(d_scores.numpy())
        det_best_gt.append(best_gt)
        det_best_iou.append(best_iou)
        gt_labels.append(g_labels_np)
        gt_difficult.append(g_diff.numpy())
        num_gt_before += len(g_boxes)

    det_labels_np = np.concatenate(det_labels) if det_labels else np.zeros(0, np.int64)
    det_scores_np = np.concatenate(det_scores) if det_scores else np.zeros(0)
    det_best_gt_np = np.concatenate(det_best_gt) if det_best_gt else np.zeros(0, np.int64)
    det_best_iou_np = np.concatenate(det_best_iou) if det_best_iou else np.zeros(0)
    gt_labels_np = np.concatenate(gt_labels) if gt_labels else np.zeros(0, np.int64)
    gt_difficult_np = np.concatenate(gt_difficult) if gt_difficult else np.zeros(0, bool)

    per_class = []
    for label, name in zip(range(1, num_classes + 1), names):
        in_class = gt_labels_np == label
        num_pos = int(np.count_nonzero(in_class & ~gt_difficult_np))
        num_difficult = int(np.count_nonzero(in_class & gt_difficult_np))
        (det_idx,) = np.nonzero(det_labels_np == label)
        order = det_idx[np.argsort(-det_scores_np[det_idx], kind="stable")]  # descending score
        best_gt = det_best_gt_np[order]
        hit = det_best_iou_np[order] >= iou_threshold  # best_iou is -1 where there is nothing to hit
        ignored = np.zeros(len(order), dtype=bool)
        ignored[hit] = gt_difficult_np[best_gt[hit]]  # a hit always has an object (best_gt >= 0)
        claims = np.flatnonzero(hit & ~ignored)
        # greedy in score order == the first (highest-scored) claim on each object wins; later ones are duplicates
        _, first = np.unique(best_gt[claims], return_index=True)
        tp = np.zeros(len(order), dtype=bool)
        tp[claims[first]] = True
        counted = ~ignored
        tp = tp[counted]
        cum_tp = np.cumsum(tp)
        precision = cum_tp / np.arange(1, len(tp) + 1)  # TP / (TP + FP) after each counted detection
        if num_pos > 0:
            recall = cum_tp / num_pos
            ap11 = average_precision(recall, precision, "11point")
            ap_area = average_precision(recall, precision, "area")
        else:
            recall = np.full(len(tp), np.nan)
            ap11 = ap_area = float("nan")
        num_tp = int(tp.sum())
        per_class.append(
            VocClassResult(
                label=label,
                name=name,
                num_gt=num_pos,
                num_difficult=num_difficult,
                num_detections=len(order),
                num_tp=num_tp,
                num_fp=len(tp) - num_tp,
                num_ignored=int(ignored.sum()),
                ap_11point=ap11,
                ap_area=ap_area,
                recall=recall.astype(np.float64),
                precision=precision.astype(np.float64),
            )
        )

    defined = [c for c in per_class if c.num_gt > 0]
    messages = []
    if len(det_scores_np) == 0:
        messages.append(NO_DETECTIONS)
    if not defined:
        messages.append(NO_GROUND_TRUTH)
    map11 = float(np.mean([c.ap_11point for c in defined])) if defined else float("nan")
    map_area = float(np.mean([c.ap_area for c in defined])) if defined else float("nan")
    return VocMetrics(
        map_11point=map11,
        map_area=map_area,
        iou_threshold=float(iou_threshold),
        per_class=per_class,
        num_images=len(detections),
        num_detections=int(len(det_scores_np)),
        message="; ".join(messages) or None,
    )
