"""Evaluating a large result set takes memory in proportion to it: the same cost per detection at
two sizes (a quadratic step, or a copy per image of everything, would make the larger set's cost
per detection grow), and no more than a few KB per detection in all."""

import contextlib
import io
import json
import tracemalloc

import torch
from pycocotools.coco import COCO

from fasterrcnn.evaluation import CocoEvaluator, evaluate_voc
from fasterrcnn.files import atomic_open

PER_IMAGE = 100  # the model's default detections per image


def _ground_truth(n):
    g = torch.Generator().manual_seed(0)
    images = [{"id": i, "width": 640, "height": 480} for i in range(1, n + 1)]
    anns, targets = [], []
    for i in range(1, n + 1):
        xy, wh = torch.rand(5, 2, generator=g) * 400, torch.rand(5, 2, generator=g) * 200 + 10
        labels = torch.arange(5) % 3 + 1
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
        anns += [
            {
                "id": len(anns) + k + 1,
                "image_id": i,
                "category_id": int(labels[k]),
                "bbox": [*xy[k].tolist(), *wh[k].tolist()],
                "area": float(wh[k].prod()),
                "iscrowd": 0,
            }
            for k in range(5)
        ]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, targets


def _detections(n):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        xy, wh = torch.rand(PER_IMAGE, 2, generator=g) * 400, torch.rand(PER_IMAGE, 2, generator=g) * 200 + 1
        out.append(
            {
                "boxes": torch.cat([xy, xy + wh], 1),
                "labels": torch.randint(1, 4, (PER_IMAGE,), generator=g),
                "scores": torch.rand(PER_IMAGE, generator=g),
            }
        )
    return out


def _peak_bytes(n_images, tmp_path) -> int:
    coco, targets = _ground_truth(n_images)
    detections = _detections(n_images)
    tracemalloc.start()
    try:
        evaluator = CocoEvaluator(coco, {1: 1, 2: 2, 3: 3})
        evaluator.update(list(range(1, n_images + 1)), detections)
        evaluator.evaluate()
        evaluate_voc(detections, targets, num_classes=3)
        with atomic_open(tmp_path / "predictions.json", "w") as f:  # streamed, as evaluate_model writes it
            json.dump(evaluator.results, f)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_evaluation_memory_grows_linearly_with_the_detections(tmp_path):
    small, large = 6, 18
    peak_small, peak_large = _peak_bytes(small, tmp_path), _peak_bytes(large, tmp_path)
    per_detection = (peak_large - peak_small) / ((large - small) * PER_IMAGE)
    assert per_detection < 3000, f"{per_detection:.0f} bytes per detection"
    assert peak_large < 3000 * large * PER_IMAGE + peak_small
