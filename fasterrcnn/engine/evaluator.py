"""Run a detector over a dataset and score it: COCO's 12 numbers (pycocotools) and Pascal VOC mAP@0.5.

The ground truth of a COCO-format set is its own json (crowd regions and all, as pycocotools
expects); any other set (VOC) is turned into an in-memory COCO ground truth from its targets.
"""

import contextlib
import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from pycocotools.coco import COCO

from ..data import make_data_loader
from ..data.annotations import targets_in_model_labels
from ..data.report import DataError
from ..evaluation import COCO_STAT_NAMES, CocoEvaluator, CocoMetrics, VocMetrics, evaluate_voc
from ..files import atomic_open
from ..model.input_checks import image_problem
from ..model.tta import TestTimeAugmentation
from .progress import Progress

if TYPE_CHECKING:
    from ..model.faster_rcnn import FasterRCNN

log = logging.getLogger("fasterrcnn")


@dataclass
class Evaluation:
    coco: CocoMetrics
    voc: VocMetrics
    results: list[dict]  # COCO results format
    seconds: float
    num_images: int
    # each image's detections in the model's labels (boxes, scores, labels, on the CPU), in ``image_ids`` order:
    # what the error analysis (engine/diagnostics.py) and the TensorBoard pictures use
    image_ids: list[int] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            **{name: float(getattr(self.coco, name)) for name in COCO_STAT_NAMES},
            "VOC07_mAP50": float(self.voc.map_11point),
            "VOC_mAP50": float(self.voc.map_area),
        }

    def format_table(self) -> str:
        return self.coco.format_table() + "\n\n" + self.voc.format_table()


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def predict_dataset(
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int = 4,
    device: torch.device = torch.device("cpu"),
    amp: str = "none",
    num_workers: int = 0,
    show_progress: bool = True,
):
    """-> (image ids, detections on the CPU in float32), in dataset order."""
    was_training = model.training
    model.eval()
    loader = make_data_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, aspect_grouping=False)
    ids, dets, skipped = [], [], []
    progress = Progress(total=len(dataset), desc="evaluate", unit="img", enabled=show_progress)
    for images, targets in loader:
        usable = [i for i, im in enumerate(images) if image_problem(im) is None]
        with autocast(device, amp):
            found = model([images[i].to(device, non_blocking=True) for i in usable]) if usable else []
        out = dict(zip(usable, found))
        for i, t in enumerate(targets):
            ids.append(int(t["image_id"]))
            if i not in out:  # an image the model cannot use: scored with no detections, named and counted
                skipped.append(f"image id {int(t['image_id'])}: {image_problem(images[i])}")
                out[i] = {
                    "boxes": torch.zeros(0, 4),
                    "scores": torch.zeros(0),
                    "labels": torch.zeros(0, dtype=torch.int64),
                }
            dets.append({k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out[i].items()})
        progress.update(len(images))
    progress.close()
    model.train(was_training)
    if skipped:
        log.warning(
            "evaluate: %d image(s) the model cannot use were scored with no detections: %s",
            len(skipped),
            "; ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
        )
    return ids, dets


def coco_from_targets(image_ids, targets, sizes, class_names) -> COCO:
    """An in-memory COCO ground truth (category id = label) from our targets."""
    images: list[dict] = []
    anns: list[dict] = []
    for image_id, t, (h, w) in zip(image_ids, targets, sizes):
        images.append({"id": int(image_id), "height": int(h), "width": int(w)})
        crowd = t.get("iscrowd", torch.zeros(len(t["labels"]), dtype=torch.int64))
        difficult = t.get("difficult", torch.zeros(len(t["labels"]), dtype=torch.bool))
        for box, label, c, dif in zip(t["boxes"].tolist(), t["labels"].tolist(), crowd.tolist(), difficult.tolist()):
            x1, y1, x2, y2 = box
            # a difficult VOC object is neither required nor penalised: COCO's "ignore" is a crowd region
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": int(image_id),
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(c or dif),
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n} for i, n in enumerate(class_names) if i > 0],
    }
    with contextlib.redirect_stdout(None):
        gt.createIndex()
    return gt


def match_categories_by_name(
    class_names: list[str],
    label_to_cat_id: dict[int, int],
    data_names: list[str],
    data_label_to_cat_id: dict[int, int],
    *,
    data_source,
    model_source,
) -> tuple[dict[int, int], list[str]]:
    """The model's labels mapped to the data's category ids through the class names.

    ``class_names``/``label_to_cat_id``: the model's (``class_names[label]``, label 1..C); ``data_names``/
    ``data_label_to_cat_id``: the dataset's. Every category of the data must be a class of the model,
    under the same name: else a ``DataError`` naming both lists, before any inference. Where the ids
    differ (the json numbered its categories in another order), the names decide, and a note says so;
    a class of the model the data does not have is left out of the map (its detections are not scored).
    -> (model label -> data category id, notes)."""
    counts: dict[str, int] = {}
    for name in class_names[1:]:
        counts[name] = counts.get(name, 0) + 1
    model_label = {name: label for label, name in enumerate(class_names) if label > 0 and counts[name] == 1}
    data = [(data_label_to_cat_id.get(label, label), name) for label, name in enumerate(data_names) if label > 0]
    missing = [f"{name!r} (id {cid})" for cid, name in data if name not in model_label]
    if missing:
        theirs = ", ".join(f"{name!r}" for name in class_names[1:])
        raise DataError(
            f"{data_source}: categories {', '.join(missing)} are not classes of the model in "
            f"{model_source} (its classes: {theirs}). Evaluation matches categories by name: evaluate "
            "on data with the model's class names, or with the checkpoint trained on this data"
        )
    mapping = {model_label[name]: cid for cid, name in data}
    notes = []
    moved = [
        f"{name!r} (model id {label_to_cat_id.get(model_label[name], model_label[name])}, data id {cid})"
        for cid, name in data
        if label_to_cat_id.get(model_label[name], model_label[name]) != cid
    ]
    if moved:
        notes.append(
            f"categories matched by name, their ids differ between the model and {data_source}: " + ", ".join(moved)
        )
    unused = [class_names[label] for label in range(1, len(class_names)) if label not in mapping]
    if unused:
        notes.append(
            f"{len(unused)} class(es) of the model are not categories of {data_source}; their "
            "detections are not scored: " + ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else "")
        )
    return mapping, notes


def _known_labels(detections: list[dict], labels: set[int]) -> list[dict]:
    """Each image's detections without those whose label ``labels`` does not hold."""
    out = []
    for d in detections:
        keep = torch.tensor([int(lb) in labels for lb in d["labels"].tolist()], dtype=torch.bool)
        out.append(
            {
                k: (v[keep] if isinstance(v, torch.Tensor) and v.dim() and len(v) == len(keep) else v)
                for k, v in d.items()
            }
        )
    return out


def evaluate_detections(
    dataset, image_ids, detections, *, class_names, label_to_cat_id, ann_file=None
) -> tuple[CocoMetrics, VocMetrics, list[dict]]:
    """Score detections (labels in the model's space, mapped to category ids by ``label_to_cat_id``)."""
    targets = targets_in_model_labels(dataset, label_to_cat_id)
    if any(label not in label_to_cat_id for label in range(1, len(class_names))):
        detections = _known_labels(detections, set(label_to_cat_id))  # classes the data does not have
    if ann_file:
        evaluator = CocoEvaluator(ann_file, label_to_cat_id)
    else:
        sizes = [(r.height, r.width) for r in dataset.records]
        evaluator = CocoEvaluator(
            coco_from_targets(dataset.image_ids, targets, sizes, class_names),
            {i: i for i in range(1, len(class_names))},
        )
    evaluator.update(image_ids, detections)
    coco = evaluator.evaluate()
    by_id = dict(zip(image_ids, detections))
    ordered = [by_id[i] for i in dataset.image_ids]
    voc = evaluate_voc(ordered, targets, num_classes=len(class_names) - 1, class_names=class_names[1:])
    return coco, voc, evaluator.results


AMP_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def optimized_for_inference(model: torch.nn.Module, amp: str = "none") -> tuple[torch.nn.Module, str]:
    """-> (a copy of ``model`` prepared by ``optimize_for_inference`` in the dtype ``amp`` names, "none"):
    BatchNorm folded, channels-last, and for bf16/fp16 the network cast instead of autocast; the model
    passed in stays trainable. A model prepared already comes back as it is (its dtype stands, no
    autocast on top); one without that method comes back as it is, with ``amp`` unchanged."""
    if getattr(model, "inference_only", False):
        return model, "none"
    if not hasattr(model, "optimize_for_inference"):
        return model, amp
    # a detector with the method (FasterRCNN, or a model like it)
    prepared = cast("FasterRCNN", copy.deepcopy(model)).optimize_for_inference(dtype=AMP_DTYPES[amp])
    return prepared, "none"


def evaluate_model(
    model,
    dataset,
    *,
    class_names,
    label_to_cat_id,
    ann_file=None,
    batch_size=4,
    device=torch.device("cpu"),
    amp="none",
    num_workers=0,
    show_progress=True,
    results_path: str | Path | None = None,
    optimize: bool = False,
    tta: dict | None = None,
) -> Evaluation:
    """Predict over ``dataset`` and score. With ``optimize``, the predictions come from an optimised
    copy of ``model`` (:func:`optimized_for_inference`); the model passed in is left as it was. ``tta``: the
    arguments of ``TestTimeAugmentation`` (model/tta.py), which then wraps the (optimised) model."""
    start = time.perf_counter()
    if optimize:
        model, amp = optimized_for_inference(model, amp)
    if tta is not None:
        model = TestTimeAugmentation(model.eval(), **tta)
    ids, dets = predict_dataset(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        amp=amp,
        num_workers=num_workers,
        show_progress=show_progress,
    )
    coco, voc, results = evaluate_detections(
        dataset, ids, dets, class_names=class_names, label_to_cat_id=label_to_cat_id, ann_file=ann_file
    )
    if results_path is not None:  # streamed, not built as one string; atomic: a kill leaves the old file whole
        with atomic_open(results_path, "w", encoding="utf-8") as f:
            json.dump(results, f)
    return Evaluation(coco, voc, results, time.perf_counter() - start, len(ids), image_ids=ids, detections=dets)
