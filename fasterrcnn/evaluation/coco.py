"""COCO box evaluation: model-format detections -> COCO results -> pycocotools' COCOeval.

The twelve summary numbers are exactly ``COCOeval.stats`` (we call pycocotools, we do not re-derive
them). Per-class AP (IoU .50:.95) and AP50 are read from the same run's ``eval['precision']`` array
(shape ``[T IoUs, R recall thresholds, K categories, A area ranges, M maxDets]``) the way
``COCOeval.summarize`` averages it, restricted to one category, area ``all`` and maxDets 100.

The ``-1`` convention is pycocotools' own and is kept as is: a number whose slice holds no ground
truth (a category without annotations in the evaluated images, an area range with no object of that
size) is ``-1.0``; such categories are left out of every mean, as COCOeval leaves them out. The
per-class table prints them as ``n/a``.

No detections at all: pycocotools' ``loadRes`` cannot take an empty list, so we hand COCOeval an
empty results set built by hand (the ground truth's images and categories, no annotations). COCOeval
then gives what it gives any method that finds nothing: ``0.0`` where there is ground truth, ``-1.0``
where there is none. ``CocoMetrics.message`` says that there were no detections.

Only the image ids passed to ``CocoEvaluator.update`` are evaluated (``params.imgIds``), so
evaluating a subset of a split gives the honest number for that subset, not one diluted by the
ground truth of images that were never run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..files import atomic_open
from ._io import write_json

__all__ = [
    "COCO_STAT_NAMES",
    "CocoClassAP",
    "CocoEvaluator",
    "CocoMetrics",
    "detections_to_coco_results",
]

# The order of COCOeval.stats for iouType="bbox".
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

_STAT_DESCRIPTIONS = {
    "AP": "IoU=0.50:0.95 area=all    maxDets=100",
    "AP50": "IoU=0.50      area=all    maxDets=100",
    "AP75": "IoU=0.75      area=all    maxDets=100",
    "APs": "IoU=0.50:0.95 area=small  maxDets=100",
    "APm": "IoU=0.50:0.95 area=medium maxDets=100",
    "APl": "IoU=0.50:0.95 area=large  maxDets=100",
    "AR1": "IoU=0.50:0.95 area=all    maxDets=1",
    "AR10": "IoU=0.50:0.95 area=all    maxDets=10",
    "AR100": "IoU=0.50:0.95 area=all    maxDets=100",
    "ARs": "IoU=0.50:0.95 area=small  maxDets=100",
    "ARm": "IoU=0.50:0.95 area=medium maxDets=100",
    "ARl": "IoU=0.50:0.95 area=large  maxDets=100",
}

_NO_POLYGON: list = []
_ADDED_BY_LOADRES = ("segmentation", "area", "id", "iscrowd")
NO_DETECTIONS = "no detections: every image evaluated had none; metrics are 0.0 where there is ground truth"


def _as_tensor(value, name: str, image_id) -> torch.Tensor:
    try:
        return torch.as_tensor(value).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"detections for image id {image_id}: field {name!r} is not array-like ({err})") from None


def detections_to_coco_results(
    image_ids: Sequence[int], detections: Sequence[Mapping], label_to_cat_id: Mapping[int, int]
) -> list[dict]:
    """Model-format detections -> COCO results (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).

    ``detections[i]`` belongs to ``image_ids[i]`` and holds ``boxes`` ``[D, 4]`` xyxy absolute pixels,
    ``labels`` ``[D]`` (contiguous 1..C) and ``scores`` ``[D]``; ``label_to_cat_id`` maps each label back
    to its dataset category id (``CocoDetection.label_to_cat_id``). Numbers come out as Python floats.
    """
    image_ids = _image_id_list(image_ids)
    if len(image_ids) != len(detections):
        raise ValueError(
            f"got {len(image_ids)} image ids but {len(detections)} detection dicts; "
            "expected one detection dict per image id"
        )
    results: list[dict] = []
    for image_id, det in zip(image_ids, detections):
        for key in ("boxes", "labels", "scores"):
            if key not in det:
                raise ValueError(
                    f"detections for image id {image_id}: missing field {key!r} (expected 'boxes', 'labels', 'scores')"
                )
        boxes = _as_tensor(det["boxes"], "boxes", image_id).to(torch.float64)
        labels = _as_tensor(det["labels"], "labels", image_id).reshape(-1)
        scores = _as_tensor(det["scores"], "scores", image_id).to(torch.float64).reshape(-1)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"detections for image id {image_id}: field 'boxes' has shape {tuple(boxes.shape)}, "
                "expected [D, 4] (x1, y1, x2, y2)"
            )
        if not (len(labels) == len(scores) == len(boxes)):
            raise ValueError(
                f"detections for image id {image_id}: {len(boxes)} boxes, {len(labels)} labels, "
                f"{len(scores)} scores; expected the same count D for all three"
            )
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise ValueError(f"detections for image id {image_id}: field 'labels' holds non-integer values")
        # xyxy -> xywh, in float64 so the width is not rounded twice
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        for box, label, score in zip(xywh.tolist(), labels.long().tolist(), scores.tolist()):
            if label not in label_to_cat_id:
                raise ValueError(
                    f"detections for image id {image_id}: label {label} has no category id in "
                    f"label_to_cat_id (known labels: {sorted(label_to_cat_id)})"
                )
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label_to_cat_id[label]),
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    return results


def _image_id_list(image_ids) -> list[int]:
    if isinstance(image_ids, torch.Tensor):
        image_ids = image_ids.reshape(-1).tolist()
    out = []
    for i in image_ids:
        if isinstance(i, torch.Tensor):
            i = i.item()
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"image id {i!r} is not an integer; expected the COCO image ids of the images")
        out.append(int(i))
    return out


@dataclass(frozen=True)
class CocoClassAP:
    """One category's AP over IoU .50:.95 and AP50 (area all, maxDets 100); ``-1.0`` without ground truth."""

    category_id: int
    name: str
    label: int | None  # the model's label for this category, None if label_to_cat_id has none
    num_gt: int  # non-crowd ground-truth boxes in the evaluated images
    num_detections: int
    AP: float
    AP50: float

    @property
    def has_gt(self) -> bool:
        return self.AP != -1.0


@dataclass
class CocoMetrics:
    """The 12 COCOeval.stats numbers by name, per-class AP / AP50, and what was evaluated.

    ``log`` is pycocotools' captured stdout; ``curves`` maps class name -> (recall thresholds,
    precision) at IoU 0.5 (area all, maxDets 100) for classes with ground truth, for plotting.
    Neither is part of ``as_dict()``.
    """

    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    AR1: float
    AR10: float
    AR100: float
    ARs: float
    ARm: float
    ARl: float
    per_class: list[CocoClassAP]
    num_images: int
    num_detections: int
    message: str | None = None
    log: str = field(default="", repr=False)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def stats(self) -> list[float]:
        """The 12 numbers in COCOeval.stats order."""
        return [getattr(self, name) for name in COCO_STAT_NAMES]

    def as_dict(self) -> dict:
        out = {name: getattr(self, name) for name in COCO_STAT_NAMES}
        out["per_class"] = [
            {
                "category_id": c.category_id,
                "name": c.name,
                "label": c.label,
                "num_gt": c.num_gt,
                "num_detections": c.num_detections,
                "AP": c.AP,
                "AP50": c.AP50,
            }
            for c in self.per_class
        ]
        out["num_images"] = self.num_images
        out["num_detections"] = self.num_detections
        out["message"] = self.message
        return out

    def to_json(self, path) -> Path:
        return write_json(path, self.as_dict())

    def format_table(self) -> str:
        def num(v: float) -> str:
            return "n/a" if v == -1.0 else f"{v:.3f}"

        lines = [f"COCO bbox evaluation: {self.num_images} images, {self.num_detections} detections"]
        if self.message:
            lines.append(f"note: {self.message}")
        for name in COCO_STAT_NAMES:
            lines.append(f"  {name:<6} {num(getattr(self, name)):>6}   {_STAT_DESCRIPTIONS[name]}")
        name_width = max([len("category (id)")] + [len(f"{c.name} ({c.category_id})") for c in self.per_class])
        lines.append("")
        lines.append(f"  {'category (id)':<{name_width}}  {'label':>5}  {'gt':>6}  {'dets':>6}  {'AP':>6}  {'AP50':>6}")
        for c in self.per_class:
            label = "-" if c.label is None else str(c.label)
            lines.append(
                f"  {f'{c.name} ({c.category_id})':<{name_width}}  {label:>5}  {c.num_gt:>6}  "
                f"{c.num_detections:>6}  {num(c.AP):>6}  {num(c.AP50):>6}"
            )
        return "\n".join(lines)


class CocoEvaluator:
    """Accumulate detections image by image, then evaluate them with pycocotools.

        evaluator = CocoEvaluator("annotations/instances_val2017.json", dataset.label_to_cat_id)
        evaluator.update(image_ids, model(images))
        metrics = evaluator.evaluate(); print(metrics.format_table())

    ``coco_gt`` is a ``pycocotools.coco.COCO`` or the path of an instances json. Each image id may be
    updated once (a second update would count its detections twice); ids must exist in ``coco_gt``.
    """

    def __init__(self, coco_gt: COCO | str | os.PathLike, label_to_cat_id: Mapping[int, int]):
        self._log = io.StringIO()
        if isinstance(coco_gt, (str, os.PathLike)):
            path = Path(coco_gt)
            if not path.is_file():
                raise FileNotFoundError(f"COCO ground truth {str(path)!r}: no such file (expected an instances json)")
            with contextlib.redirect_stdout(self._log):
                coco_gt = COCO(str(path))
        if not isinstance(coco_gt, COCO):
            raise TypeError(f"coco_gt is a {type(coco_gt).__name__}; expected a pycocotools COCO or a json path")
        self.coco_gt = coco_gt
        self.label_to_cat_id = {int(k): int(v) for k, v in label_to_cat_id.items()}
        unknown = sorted(c for c in self.label_to_cat_id.values() if c not in coco_gt.cats)
        if unknown:
            raise ValueError(
                f"label_to_cat_id maps to category ids {unknown} that the ground truth does not have "
                f"(its categories: {sorted(coco_gt.cats)})"
            )
        self._results: list[dict] = []
        self._image_ids: list[int] = []
        self._seen: set[int] = set()

    @property
    def image_ids(self) -> list[int]:
        """The image ids updated so far, in update order."""
        return list(self._image_ids)

    @property
    def results(self) -> list[dict]:
        """The accumulated COCO results (a new list; the dicts are the evaluator's own)."""
        return list(self._results)

    def update(self, image_ids: Sequence[int], detections: Sequence[Mapping]) -> None:
        """Add the detections of some images (one model-format dict per image id)."""
        ids = _image_id_list(image_ids)
        missing = [i for i in ids if i not in self.coco_gt.imgs]
        if missing:
            raise ValueError(f"image ids {missing[:10]} are not in the COCO ground truth")
        repeated = sorted({i for i, n in Counter(ids).items() if n > 1 or i in self._seen})
        if repeated:
            raise ValueError(f"image ids {repeated[:10]} were given more than once; each image is evaluated once")
        results = detections_to_coco_results(ids, detections, self.label_to_cat_id)  # validates before we commit
        self._results.extend(results)
        self._image_ids.extend(ids)
        self._seen.update(ids)

    def write_results(self, path) -> Path:
        """Write the COCO results json (loadable with ``COCO.loadRes``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w", encoding="utf-8") as f:
            json.dump(self._results, f)
        return path

    def evaluate(self) -> CocoMetrics:
        if not self._image_ids:
            raise ValueError("nothing to evaluate: update() was never called with any image id")
        log = io.StringIO()
        log.write(self._log.getvalue())
        try:
            with contextlib.redirect_stdout(log):
                if self._results:
                    # loadRes adds area/id/iscrowd to the dicts it gets, and a polygon per box unless one is
                    # there. Box evaluation needs no polygon: a shared empty one saves it, and lending
                    # loadRes our own dicts (cleaned below) saves a copy of every result.
                    for r in self._results:
                        r["segmentation"] = _NO_POLYGON
                    coco_dt = self.coco_gt.loadRes(self._results)
                else:
                    coco_dt = _empty_results(self.coco_gt)
                coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
                coco_eval.params.imgIds = sorted(self._image_ids)
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
        finally:
            for r in self._results:
                for key in _ADDED_BY_LOADRES:
                    r.pop(key, None)
        stats = [float(s) for s in coco_eval.stats]
        per_class, curves = self._per_class(coco_eval)
        return CocoMetrics(
            **dict(zip(COCO_STAT_NAMES, stats)),
            per_class=per_class,
            num_images=len(self._image_ids),
            num_detections=len(self._results),
            message=None if self._results else NO_DETECTIONS,
            log=log.getvalue(),
            curves=curves,
        )

    def _per_class(self, coco_eval: COCOeval) -> tuple[list[CocoClassAP], dict]:
        params = coco_eval.params
        precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
        t50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
        a_all = params.areaRngLbl.index("all")
        m100 = list(params.maxDets).index(100)
        cat_to_label = {c: label for label, c in self.label_to_cat_id.items()}
        image_set = set(params.imgIds)
        num_gt: dict[int, int] = {}
        for ann in self.coco_gt.dataset.get("annotations", []):
            if ann["image_id"] in image_set and not ann.get("iscrowd", 0):
                num_gt[ann["category_id"]] = num_gt.get(ann["category_id"], 0) + 1
        num_dets: dict[int, int] = {}
        for r in self._results:
            num_dets[r["category_id"]] = num_dets.get(r["category_id"], 0) + 1

        def mean_valid(s: np.ndarray) -> float:  # COCOeval.summarize's rule: -1 entries do not count
            valid = s[s > -1]
            return -1.0 if valid.size == 0 else float(np.mean(valid))

        per_class, curves = [], {}
        for k, cat_id in enumerate(params.catIds):
            name = str(self.coco_gt.cats[cat_id].get("name", cat_id))
            ap = mean_valid(precision[:, :, k, a_all, m100])
            ap50 = mean_valid(precision[t50, :, k, a_all, m100])
            per_class.append(
                CocoClassAP(
                    category_id=int(cat_id),
                    name=name,
                    label=cat_to_label.get(cat_id),
                    num_gt=num_gt.get(cat_id, 0),
                    num_detections=num_dets.get(cat_id, 0),
                    AP=ap,
                    AP50=ap50,
                )
            )
            if ap50 != -1.0:
                key = name if name not in curves else f"{name} ({cat_id})"
                curves[key] = (
                    np.asarray(params.recThrs, dtype=np.float64).copy(),
                    precision[t50, :, k, a_all, m100].astype(np.float64),
                )
        return per_class, curves


def _empty_results(coco_gt: COCO) -> COCO:
    """A results COCO with no annotations (what ``loadRes([])`` would be if it did not crash)."""
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    empty.createIndex()
    return empty
