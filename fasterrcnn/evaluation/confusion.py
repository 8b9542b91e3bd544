"""Detection error analysis at one IoU threshold: per-image matching, F1 against score threshold, confusion matrix.

- ``match_image``: one image's detections marked true positive, ignored (on a crowd region) or neither
  (false positive), by COCO's greedy class-aware rule. Matching in descending score order means a
  detection's outcome never depends on lower-scoring ones, so one match per image serves every score threshold.
- ``f1_curve``: precision, recall and F1 of all classes together (and F1 per class) over score thresholds,
  and the threshold of the best F1: the ``--score-threshold`` to pass to ``fasterrcnn predict``.
- ``confusion_matrix``: at one score threshold, which class each object was detected as (background: missed)
  and what each false detection was (background row), as a ``ConfusionMatrix`` with a CSV writer.

Boxes are xyxy absolute pixels; labels are the model's class indices 1..C (0 is background, never a label).
Inputs may be tensors or NumPy arrays. Scores are compared with thresholds in float32, as the detector compares
its float32 scores with ``--score-threshold``: a score of 0.42 counts at threshold 0.42.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_open
from ..ops import box_iou

__all__ = [
    "ConfusionMatrix",
    "F1Curve",
    "ImageMatch",
    "PRCounts",
    "confusion_matrix",
    "f1_curve",
    "match_image",
    "pr_counts",
]

BACKGROUND = "background"
CSV_CORNER = "ground truth \\ predicted"
_IMAGE_KEYS = ("gt_boxes", "gt_labels", "gt_crowd", "det_boxes", "det_labels", "det_scores")


@dataclass
class ImageMatch:
    """One image's detections matched to its ground truth (class-aware, COCO's greedy rule)."""

    det_scores: np.ndarray  # [D] float32
    det_labels: np.ndarray  # [D] int64
    det_tp: np.ndarray  # [D] bool: matched to an object of its own class
    det_ignored: np.ndarray  # [D] bool: unmatched, but on a crowd region (neither TP nor FP)
    gt_labels: np.ndarray  # [G'] int64, non-crowd objects only


@dataclass
class F1Curve:
    """Precision, recall and F1 over score thresholds; F1 per class; the threshold of the best all-class F1."""

    thresholds: np.ndarray  # [T] score thresholds
    precision: np.ndarray  # [T] all classes together (micro: counts summed over classes)
    recall: np.ndarray  # [T]
    f1: np.ndarray  # [T]
    per_class_f1: np.ndarray  # [C, T]: row k-1 is class k; NaN for a class without ground truth
    best_threshold: float  # the lowest threshold reaching the highest all-class F1
    best_f1: float


@dataclass
class ConfusionMatrix:
    """Counts of ground-truth class (rows) against predicted class (columns); background is the last row/column.

    ``counts[k-1, j-1]``: objects of class k detected as class j (k == j: correct). Last column: objects missed.
    Last row: false detections (nothing there, or a duplicate of an object already matched). The background
    cell (last, last) is always 0.
    """

    counts: np.ndarray  # [C+1, C+1] int64
    class_names: list[str]  # C+1 names, classes 1..C then "background"
    iou_threshold: float
    score_threshold: float

    def normalized(self) -> np.ndarray:
        """Each row divided by its sum (the share of a class's objects per prediction); a zero row stays 0."""
        totals = self.counts.sum(axis=1, keepdims=True).astype(np.float64)
        return np.divide(self.counts, totals, out=np.zeros(self.counts.shape, dtype=np.float64), where=totals > 0)

    @property
    def rule(self) -> str:
        """The matching rule in one sentence, thresholds included (for a figure's caption)."""
        return (
            f"Per image, detections with score >= {self.score_threshold:g} are matched to non-crowd objects "
            f"at IoU >= {self.iou_threshold:g}: same class first (COCO's greedy rule, by descending score), "
            "then other classes by descending IoU; objects left over are missed (background column), detections "
            "left over are false (background row) unless they lie on a crowd region."
        )

    def to_csv(self, path: str | Path) -> None:
        """Write the counts, a blank line, then the row-normalised shares (4 decimals); replaced atomically."""
        header = [CSV_CORNER, *self.class_names]
        with atomic_open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for name, row in zip(self.class_names, self.counts):
                writer.writerow([name, *(int(v) for v in row)])
            writer.writerow([])
            writer.writerow(header)
            for name, row in zip(self.class_names, self.normalized()):
                writer.writerow([name, *(f"{v:.4f}" for v in row)])


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _image_arrays(*, gt_boxes, gt_labels, gt_crowd, det_boxes, det_labels, det_scores):
    """The six inputs as NumPy arrays of fixed dtypes and shapes; ValueError when their lengths disagree."""
    gb = _numpy(gt_boxes).astype(np.float64).reshape(-1, 4)
    gl = _numpy(gt_labels).astype(np.int64).reshape(-1)
    gc = _numpy(gt_crowd).astype(bool).reshape(-1)
    db = _numpy(det_boxes).astype(np.float64).reshape(-1, 4)
    dl = _numpy(det_labels).astype(np.int64).reshape(-1)
    ds = _numpy(det_scores).astype(np.float32).reshape(-1)
    if not len(gb) == len(gl) == len(gc):
        raise ValueError(f"ground truth: {len(gb)} boxes, {len(gl)} labels, {len(gc)} crowd flags; expected the same")
    if not len(db) == len(dl) == len(ds):
        raise ValueError(f"detections: {len(db)} boxes, {len(dl)} labels, {len(ds)} scores; expected the same")
    return gb, gl, gc, db, dl, ds


def _iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    return box_iou(torch.from_numpy(boxes1), torch.from_numpy(boxes2)).numpy()


def _on_crowd(det_boxes: np.ndarray, crowd_boxes: np.ndarray, threshold: float) -> np.ndarray:
    """[D] bool: the detection's intersection with some crowd box, over the detection's own area, >= threshold."""
    if len(det_boxes) == 0 or len(crowd_boxes) == 0:
        return np.zeros(len(det_boxes), dtype=bool)
    lt = np.maximum(det_boxes[:, None, :2], crowd_boxes[None, :, :2])
    rb = np.minimum(det_boxes[:, None, 2:], crowd_boxes[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]  # [D, K]
    area = (det_boxes[:, 2] - det_boxes[:, 0]) * (det_boxes[:, 3] - det_boxes[:, 1])
    share = np.divide(inter, area[:, None], out=np.zeros_like(inter), where=area[:, None] > 0)
    return (share >= threshold).any(axis=1)


def _match_same_class(
    *, iou: np.ndarray, det_labels: np.ndarray, gt_labels: np.ndarray, order: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """COCO's greedy rule: detections in ``order`` each take the free object of their class with the highest IoU
    (the first such object on ties), if it is >= ``iou_threshold``. Returns [D] int64: the object's index, or -1."""
    det_to_gt = np.full(len(det_labels), -1, dtype=np.int64)
    taken = np.zeros(len(gt_labels), dtype=bool)
    for d in order:
        candidates = (gt_labels == det_labels[d]) & ~taken
        if not candidates.any():
            continue
        overlaps = np.where(candidates, iou[d], -1.0)
        g = int(np.argmax(overlaps))
        if overlaps[g] >= iou_threshold:
            det_to_gt[d] = g
            taken[g] = True
    return det_to_gt


def _score_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties keep the original order."""
    return np.argsort(-scores, kind="stable")


def match_image(
    *, gt_boxes, gt_labels, gt_crowd, det_boxes, det_labels, det_scores, iou_threshold: float = 0.5
) -> ImageMatch:
    """Mark one image's detections TP / ignored / FP (see ``ImageMatch``), in their original order.

    Per class, detections by descending score (ties: original order) each take the unmatched non-crowd object of
    their class with the highest IoU, if that IoU >= ``iou_threshold``: a true positive. A detection left
    unmatched whose intersection with any crowd box (of any class), over its own area, is >= ``iou_threshold``
    is ignored; any other is a false positive.
    """
    gb, gl, gc, db, dl, ds = _image_arrays(
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        gt_crowd=gt_crowd,
        det_boxes=det_boxes,
        det_labels=det_labels,
        det_scores=det_scores,
    )
    objects = ~gc
    det_to_gt = _match_same_class(
        iou=_iou(db, gb[objects]),
        det_labels=dl,
        gt_labels=gl[objects],
        order=_score_order(ds),
        iou_threshold=iou_threshold,
    )
    tp = det_to_gt >= 0
    ignored = ~tp & _on_crowd(db, gb[gc], iou_threshold)
    return ImageMatch(det_scores=ds, det_labels=dl, det_tp=tp, det_ignored=ignored, gt_labels=gl[objects])


def _count_at_or_above(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[T] int64: how many of ``scores`` are >= each threshold."""
    ordered = np.sort(scores)
    return (len(ordered) - np.searchsorted(ordered, thresholds, side="left")).astype(np.int64)


def _precision_recall_f1(tp: np.ndarray, fp: np.ndarray, num_gt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision 1 where nothing is counted (TP + FP == 0); recall 0 without ground truth; F1 0 where P + R == 0."""
    tp = tp.astype(np.float64)
    counted = tp + fp
    precision = np.divide(tp, counted, out=np.ones_like(tp), where=counted > 0)
    recall = tp / num_gt if num_gt > 0 else np.zeros_like(tp)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    return precision, recall, f1


def f1_curve(matches: list[ImageMatch], *, num_classes: int, thresholds=None) -> F1Curve:
    """Precision, recall and F1 at each score threshold (default ``np.linspace(0, 1, 101)``), from per-image matches.

    At threshold t a detection counts when its score >= t. TP: counted detections marked TP; FP: counted, neither
    TP nor ignored; G: non-crowd objects. precision = TP / (TP + FP), taken as 1 when nothing is counted so that the
    curve is defined at high thresholds; recall = TP / G (0 when G == 0); F1 = 2PR / (P + R) (0 when P + R == 0).
    All-class numbers sum the counts over classes (micro). ``num_classes`` counts background (C + 1).
    """
    grid = np.linspace(0.0, 1.0, 101) if thresholds is None else np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if grid.size == 0 or np.any(np.diff(grid) <= 0):
        raise ValueError("thresholds must be a non-empty, strictly increasing sequence")
    grid32 = grid.astype(np.float32)
    num_real = num_classes - 1

    def joined(name: str, dtype) -> np.ndarray:
        parts = [np.asarray(getattr(m, name)).reshape(-1) for m in matches]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    scores = joined("det_scores", np.float32)
    labels = joined("det_labels", np.int64)
    tp = joined("det_tp", bool)
    fp = ~tp & ~joined("det_ignored", bool)
    gt_labels = joined("gt_labels", np.int64)
    for what, values in (("detection", labels), ("ground-truth", gt_labels)):
        if values.size and (values.min() < 1 or values.max() > num_real):
            raise ValueError(f"{what} labels must be in 1..{num_real} (num_classes={num_classes} with background)")

    precision, recall, f1 = _precision_recall_f1(
        _count_at_or_above(scores[tp], grid32), _count_at_or_above(scores[fp], grid32), len(gt_labels)
    )
    per_class = np.full((num_real, grid.size), np.nan)
    for k in range(1, num_classes):
        num_gt = int((gt_labels == k).sum())
        if num_gt == 0:
            continue
        mine = labels == k
        per_class[k - 1] = _precision_recall_f1(
            _count_at_or_above(scores[tp & mine], grid32), _count_at_or_above(scores[fp & mine], grid32), num_gt
        )[2]
    best = int(np.argmax(f1))  # the first (lowest) threshold on ties
    return F1Curve(
        thresholds=grid,
        precision=precision,
        recall=recall,
        f1=f1,
        per_class_f1=per_class,
        best_threshold=float(grid[best]),
        best_f1=float(f1[best]),
    )


@dataclass
class PRCounts:
    """Per class and score threshold: true and false positives among the detections counted, and the objects."""

    thresholds: np.ndarray  # [T]
    tp: np.ndarray  # [C, T] int64: row k-1 is class k
    fp: np.ndarray  # [C, T] int64
    num_gt: np.ndarray  # [C] int64

    def precision_recall(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Class ``k``'s precision (1 where nothing is counted) and recall (0 without objects) at each threshold."""
        p, r, _ = _precision_recall_f1(self.tp[k - 1], self.fp[k - 1].astype(np.float64), int(self.num_gt[k - 1]))
        return p, r


def pr_counts(matches: list[ImageMatch], *, num_classes: int, thresholds=None) -> PRCounts:
    """The counts behind ``f1_curve``, per class (TensorBoard's PR curves take them raw)."""
    grid = np.linspace(0.0, 1.0, 101) if thresholds is None else np.asarray(thresholds, dtype=np.float64).reshape(-1)
    grid32 = grid.astype(np.float32)
    num_real = num_classes - 1
    parts = {name: [np.asarray(getattr(m, name)).reshape(-1) for m in matches] for name in ImageMatch.__annotations__}
    joined = {
        name: np.concatenate(parts[name]) if parts[name] else np.zeros(0)
        for name in ("det_scores", "det_labels", "det_tp", "det_ignored", "gt_labels")
    }
    scores = joined["det_scores"].astype(np.float32)
    labels = joined["det_labels"].astype(np.int64)
    gt_labels = joined["gt_labels"].astype(np.int64)
    tp_mask: np.ndarray = joined["det_tp"].astype(bool)
    fp_mask: np.ndarray = ~tp_mask & ~joined["det_ignored"].astype(bool)
    out_tp = np.zeros((num_real, grid.size), dtype=np.int64)
    out_fp = np.zeros((num_real, grid.size), dtype=np.int64)
    for k in range(1, num_classes):
        mine = labels == k
        out_tp[k - 1] = _count_at_or_above(scores[tp_mask & mine], grid32)
        out_fp[k - 1] = _count_at_or_above(scores[fp_mask & mine], grid32)
    num_gt = np.array([int((gt_labels == k).sum()) for k in range(1, num_classes)], dtype=np.int64)
    return PRCounts(thresholds=grid, tp=out_tp, fp=out_fp, num_gt=num_gt)


def _match_other_classes(
    *, iou: np.ndarray, det_labels: np.ndarray, gt_labels: np.ndarray, rank: np.ndarray, iou_threshold: float
) -> list[tuple[int, int]]:
    """Pairs (detection, object) of different classes, greedily by descending IoU (>= ``iou_threshold``), each
    detection and each object used once; IoU ties go to the higher-scoring detection, then the first object."""
    d_idx, g_idx = np.nonzero((iou >= iou_threshold) & (det_labels[:, None] != gt_labels[None, :]))
    order = np.lexsort((g_idx, rank[d_idx], -iou[d_idx, g_idx]))
    used_d: set[int] = set()
    used_g: set[int] = set()
    pairs = []
    for d, g in zip(d_idx[order].tolist(), g_idx[order].tolist()):
        if d not in used_d and g not in used_g:
            used_d.add(d)
            used_g.add(g)
            pairs.append((d, g))
    return pairs


def _add_image(counts: np.ndarray, image: dict, *, score_threshold: float, iou_threshold: float) -> None:
    gb, gl, gc, db, dl, ds = _image_arrays(**{k: image[k] for k in _IMAGE_KEYS})
    num_real = counts.shape[0] - 1
    for what, values in (("detection", dl), ("ground-truth", gl)):
        if values.size and (values.min() < 1 or values.max() > num_real):
            raise ValueError(f"{what} labels must be in 1..{num_real} (the classes named after __background__)")
    kept = ds >= np.float32(score_threshold)
    db, dl, ds = db[kept], dl[kept], ds[kept]
    objects = ~gc
    ob, ol = gb[objects], gl[objects]
    iou = _iou(db, ob)
    order = _score_order(ds)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    background = num_real  # the last row / column; class k sits at k - 1

    # 1. same class first (COCO's greedy rule)
    det_to_gt = _match_same_class(iou=iou, det_labels=dl, gt_labels=ol, order=order, iou_threshold=iou_threshold)
    det_done = det_to_gt >= 0
    gt_done = np.zeros(len(ol), dtype=bool)
    gt_done[det_to_gt[det_done]] = True
    for g in det_to_gt[det_done]:
        counts[ol[g] - 1, ol[g] - 1] += 1
    # 2. class confusions among what is left
    free_d, free_g = np.flatnonzero(~det_done), np.flatnonzero(~gt_done)
    pairs = _match_other_classes(
        iou=iou[np.ix_(free_d, free_g)],
        det_labels=dl[free_d],
        gt_labels=ol[free_g],
        rank=rank[free_d],
        iou_threshold=iou_threshold,
    )
    for d, g in pairs:
        det_done[free_d[d]] = True
        gt_done[free_g[g]] = True
        counts[ol[free_g[g]] - 1, dl[free_d[d]] - 1] += 1
    # 3. objects missed
    for k in ol[~gt_done]:
        counts[k - 1, background] += 1
    # 4. false detections, unless on a crowd region
    left = ~det_done & ~_on_crowd(db, gb[gc], iou_threshold)
    for k in dl[left]:
        counts[background, k - 1] += 1


def confusion_matrix(
    *, images: list[dict], class_names: list[str], score_threshold: float = 0.5, iou_threshold: float = 0.5
) -> ConfusionMatrix:
    """Count, over ``images``, what each non-crowd object was detected as and what each false detection was.

    ``class_names``: the model's list, ``"__background__"`` first; the matrix puts classes 1..C at rows/columns
    0..C-1 and background last. Each image is a dict with ``gt_boxes, gt_labels, gt_crowd, det_boxes, det_labels,
    det_scores``. Per image, with the detections scoring >= ``score_threshold`` and the non-crowd objects:
    (1) same-class matches by COCO's greedy rule; (2) among what is left, pairs of different classes by descending
    IoU (>= ``iou_threshold``): class confusions; (3) objects left: missed (background column); (4) detections
    left: ignored when on a crowd region (intersection over the detection's area >= ``iou_threshold``), otherwise
    false detections (background row) -- a duplicate detection of a matched object lands here.
    """
    if len(class_names) < 2:
        raise ValueError(f"class_names: expected '__background__' then at least one class, got {class_names!r}")
    num_real = len(class_names) - 1
    counts = np.zeros((num_real + 1, num_real + 1), dtype=np.int64)
    for i, image in enumerate(images):
        missing = [k for k in _IMAGE_KEYS if k not in image]
        if missing:
            raise ValueError(f"image {i}: missing {', '.join(missing)}")
        _add_image(counts, image, score_threshold=score_threshold, iou_threshold=iou_threshold)
    return ConfusionMatrix(
        counts=counts,
        class_names=[str(n) for n in class_names[1:]] + [BACKGROUND],
        iou_threshold=float(iou_threshold),
        score_threshold=float(score_threshold),
    )
