"""What the model gets wrong on a dataset, as files: the confusion matrix, F1 against score threshold, the worst images.

    paths = write_diagnostics(evaluation, dataset, class_names=names, out_dir=run_dir)

Writes, from one evaluation's detections (``Evaluation.detections``, in the model's labels) and the dataset's
ground truth:
    confusion_matrix.png / .csv   rows: ground truth, columns: predicted, background last (missed objects and
                                  false detections), row-normalised in the figure, counts and shares in the CSV;
                                  detections scoring >= ``score_threshold``, matched at IoU >= ``iou_threshold``
                                  (the rule is printed under the figure)
    f1_curve.png                  F1 against score threshold, per class and all classes together, the best
                                  threshold marked: the ``--score-threshold`` to give ``fasterrcnn predict``
    val_predictions.jpg           a grid of images with ground truth (dashed) and predictions (solid): the
                                  ``worst`` ones (most missed, false and confused boxes) and ``random`` others
Used at every evaluation of a training run (into the run folder) and by ``fasterrcnn evaluate --out``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.annotations import targets_in_model_labels
from ..evaluation.confusion import ConfusionMatrix, F1Curve, ImageMatch, confusion_matrix, f1_curve, match_image
from ..viz.confusion import plot_confusion_matrix, plot_f1_curve
from ..viz.error_grid import draw_truth_and_predictions, save_grid


@dataclass
class ImageResult:
    """One image's ground truth (model labels, crowd flags) and detections, for the error analysis."""

    index: int  # in the dataset
    image_id: int
    gt: dict  # boxes, labels, iscrowd
    det: dict  # boxes, labels, scores

    def as_confusion_input(self) -> dict:
        return {
            "gt_boxes": self.gt["boxes"],
            "gt_labels": self.gt["labels"],
            "gt_crowd": self.gt["iscrowd"].bool(),
            "det_boxes": self.det["boxes"],
            "det_labels": self.det["labels"],
            "det_scores": self.det["scores"],
        }


@dataclass
class Diagnostics:
    confusion: ConfusionMatrix
    f1: F1Curve
    results: list[ImageResult]
    matches: list[ImageMatch]
    paths: dict[str, Path]


def image_results(dataset, image_ids: list[int], detections: list[dict], label_to_cat_id) -> list[ImageResult]:
    """Each image's ground truth in the model's labels (classes the model lacks left out) beside its detections."""
    targets = targets_in_model_labels(dataset, label_to_cat_id)
    index_of = {int(i): k for k, i in enumerate(dataset.image_ids)}
    out = []
    for image_id, det in zip(image_ids, detections):
        k = index_of[int(image_id)]
        t = targets[k]
        crowd = t.get("iscrowd")
        difficult = t.get("difficult")
        ignore = crowd.bool() if crowd is not None else None
        if difficult is not None:  # VOC's difficult objects are neither required nor penalised, as in the metrics
            ignore = difficult.bool() if ignore is None else ignore | difficult.bool()
        if ignore is None:
            ignore = t["labels"].new_zeros(len(t["labels"]), dtype=bool)
        gt = {"boxes": t["boxes"], "labels": t["labels"], "iscrowd": ignore.long()}
        out.append(ImageResult(k, int(image_id), gt, det))
    return out


def image_confusion(result: ImageResult, *, class_names, score_threshold: float, iou_threshold: float):
    """One image's confusion matrix (its counts sum over the images to the dataset's)."""
    return confusion_matrix(
        images=[result.as_confusion_input()],
        class_names=class_names,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
    )


def _errors(counts: np.ndarray) -> tuple[int, int, int]:
    """(missed, false, confused) boxes of one image's confusion counts."""
    missed, false = int(counts[:-1, -1].sum()), int(counts[-1, :-1].sum())
    confused = int(counts[:-1, :-1].sum() - np.trace(counts[:-1, :-1]))
    return missed, false, confused


def pick_grid_images(
    results: list[ImageResult],
    *,
    class_names,
    score_threshold: float,
    iou_threshold: float,
    worst: int = 8,
    random_count: int = 4,
    seed: int = 0,
    confusions: list[ConfusionMatrix] | None = None,
) -> list[tuple[ImageResult, str]]:
    """The ``worst`` images by missed + false + confused boxes (ties: dataset order; only images with an
    error), then ``random_count`` of the others drawn with ``seed``; each with its caption. ``confusions``:
    each image's confusion matrix when the caller has them (``image_confusion``), else computed here."""
    if confusions is None:
        confusions = [
            image_confusion(r, class_names=class_names, score_threshold=score_threshold, iou_threshold=iou_threshold)
            for r in results
        ]
    errors = [_errors(c.counts) for c in confusions]
    order = sorted(range(len(results)), key=lambda i: (-sum(errors[i]), i))
    bad = [i for i in order if sum(errors[i]) > 0][:worst]
    rest = [i for i in range(len(results)) if i not in set(bad)]
    picked_random = sorted(random.Random(seed).sample(rest, min(random_count, len(rest))))

    def caption(kind: str, i: int) -> str:
        missed, false, confused = errors[i]
        return f"{kind}: id {results[i].image_id}, {missed} missed, {false} false, {confused} confused"

    return [(results[i], caption(f"worst {n + 1}", i)) for n, i in enumerate(bad)] + [
        (results[i], caption("random", i)) for i in picked_random
    ]


def draw_result(dataset, result: ImageResult, *, class_names, score_threshold: float) -> Image.Image:
    """The image with its ground truth and the detections scoring >= ``score_threshold``."""
    image = dataset.load_image(result.index)
    pil = Image.fromarray(image.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    keep = result.det["scores"] >= score_threshold
    gt_keep = ~result.gt["iscrowd"].bool()
    return draw_truth_and_predictions(
        pil,
        gt_boxes=result.gt["boxes"][gt_keep],
        gt_labels=result.gt["labels"][gt_keep],
        det_boxes=result.det["boxes"][keep],
        det_labels=result.det["labels"][keep],
        det_scores=result.det["scores"][keep],
        class_names=class_names,
    )


def write_diagnostics(
    evaluation,
    dataset,
    *,
    class_names: list[str],
    label_to_cat_id: dict[int, int],
    out_dir: str | Path,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    title: str = "",
    grid: bool = True,
) -> Diagnostics:
    """The three files of the module docstring in ``out_dir``, from ``evaluation`` (an ``Evaluation`` with its
    ``image_ids`` and ``detections``) on ``dataset``."""
    out_dir = Path(out_dir)
    results = image_results(dataset, evaluation.image_ids, evaluation.detections, label_to_cat_id)
    # each image matched once: the dataset's matrix is the sum, the grid ranks the images by theirs
    per_image = [
        image_confusion(r, class_names=class_names, score_threshold=score_threshold, iou_threshold=iou_threshold)
        for r in results
    ]
    cm = confusion_matrix(
        images=[], class_names=class_names, score_threshold=score_threshold, iou_threshold=iou_threshold
    )
    cm.counts = sum((c.counts for c in per_image), cm.counts)
    matches = [
        match_image(
            gt_boxes=r.gt["boxes"],
            gt_labels=r.gt["labels"],
            gt_crowd=r.gt["iscrowd"].bool(),
            det_boxes=r.det["boxes"],
            det_labels=r.det["labels"],
            det_scores=r.det["scores"],
            iou_threshold=iou_threshold,
        )
        for r in results
    ]
    curve = f1_curve(matches, num_classes=len(class_names))
    suffix = f" ({title})" if title else ""
    paths = {
        "confusion_matrix": plot_confusion_matrix(
            cm, out_dir / "confusion_matrix.png", title=f"Confusion matrix{suffix}"
        ),
        "f1_curve": plot_f1_curve(
            curve, class_names, out_dir / "f1_curve.png", title=f"F1 against score threshold{suffix}"
        ),
    }
    cm.to_csv(out_dir / "confusion_matrix.csv")
    paths["confusion_csv"] = out_dir / "confusion_matrix.csv"
    if grid and results:
        picks = pick_grid_images(
            results,
            class_names=class_names,
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
            confusions=per_image,
        )
        tiles = [
            (draw_result(dataset, r, class_names=class_names, score_threshold=score_threshold), c) for r, c in picks
        ]
        paths["val_predictions"] = save_grid(tiles, out_dir / "val_predictions.jpg")
    return Diagnostics(cm, curve, results, matches, paths)
