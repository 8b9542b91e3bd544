"""COCO evaluation against pycocotools called directly in the test on small hand-made cases."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fasterrcnn.evaluation import COCO_STAT_NAMES, CocoEvaluator, detections_to_coco_results

# Non-contiguous category ids; "fish" (9) has no annotation at all.
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}, {"id": 9, "name": "fish"}]
LABEL_TO_CAT = {1: 1, 2: 3, 3: 7, 4: 9}
CAT_TO_LABEL = {c: label for label, c in LABEL_TO_CAT.items()}

# (image_id, category_id, xywh, iscrowd): small (< 32^2), medium and large objects, crowd regions,
# image 4 without any annotation.
ANNOTATIONS = [
    (1, 1, [10, 10, 20, 20], 0),  # small cat
    (1, 1, [50, 40, 60, 50], 0),  # medium cat
    (1, 3, [100, 100, 90, 95], 0),  # large dog
    (1, 3, [0, 150, 40, 40], 1),  # dog crowd
    (2, 7, [30, 30, 15, 12], 0),  # small bird
    (2, 7, [60, 60, 28, 30], 0),  # small bird
    (2, 1, [80, 20, 110, 120], 0),  # large cat
    (2, 7, [0, 120, 80, 70], 1),  # bird crowd
    (3, 3, [20, 20, 40, 60], 0),  # medium dog
    (3, 3, [90, 90, 50, 45], 0),  # medium dog
    (3, 7, [150, 10, 30, 25], 0),  # small bird (750)
    (3, 1, [5, 140, 150, 55], 0),  # medium cat (8250 < 96^2)
    (5, 1, [10, 10, 30, 30], 0),  # small cat
    (5, 3, [60, 60, 100, 100], 0),  # large dog
]


def gt_dataset():
    images = [{"id": i, "width": 200, "height": 200, "file_name": f"{i:06d}.jpg"} for i in (1, 2, 3, 4, 5)]
    anns = [
        {
            "id": k + 1,
            "image_id": img,
            "category_id": cat,
            "bbox": [float(v) for v in box],
            "area": float(box[2] * box[3]),
            "iscrowd": crowd,
        }
        for k, (img, cat, box, crowd) in enumerate(ANNOTATIONS)
    ]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def coco_from(dataset):
    coco = COCO()
    coco.dataset = json.loads(json.dumps(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def make_detections():
    """Per image id: xyxy boxes, labels, scores (all multiples of 0.5, exact in float32).

    Each non-crowd object gets a jittered detection (some with the wrong class or poorly placed), plus
    false positives, a detection on each crowd region, a duplicate, and a fish detection (no fish gt).
    """
    rng = np.random.default_rng(0)
    per_image = {i: [] for i in (1, 2, 3, 4, 5)}
    for img, cat, (x, y, w, h), crowd in ANNOTATIONS:
        jitter = rng.integers(-4, 5, size=4) * 0.5 * (1 + (w > 50))
        box = [x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]]
        score = float(rng.integers(10, 200)) / 200
        label = CAT_TO_LABEL[cat]
        per_image[img].append((box, label, score))
        if not crowd and rng.random() < 0.4:  # a lower-scored duplicate
            per_image[img].append(([b + 1.5 for b in box], label, score / 2))
    per_image[1].append(([150.0, 10.0, 190.0, 40.0], 1, 0.9))  # FP cat
    per_image[1].append(([12.0, 11.0, 31.0, 29.5], 2, 0.55))  # dog on the small cat: wrong class
    per_image[2].append(([81.0, 22.0, 188.0, 141.0], 1, 0.35))  # second cat on the large cat
    per_image[3].append(([100.0, 100.0, 180.0, 190.0], 4, 0.8))  # fish (no fish ground truth)
    per_image[4].append(([10.0, 10.0, 60.0, 60.0], 3, 0.7))  # bird on the empty image
    per_image[4].append(([100.0, 120.0, 104.0, 126.0], 1, 0.2))  # tiny cat on the empty image
    dets = {}
    for img, items in per_image.items():
        boxes = torch.tensor([b for b, _, _ in items], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([lab for _, lab, _ in items], dtype=torch.int64)
        scores = torch.tensor([s for _, _, s in items], dtype=torch.float32)
        dets[img] = {"boxes": boxes, "labels": labels, "scores": scores}
    return dets


def reference_results(image_ids, dets):
    """The COCO results written plainly: xyxy -> xywh, label -> category id."""
    out = []
    for img in image_ids:
        d = dets[img]
        for (x1, y1, x2, y2), label, score in zip(d["boxes"].tolist(), d["labels"].tolist(), d["scores"].tolist()):
            out.append(
                {
                    "image_id": img,
                    "category_id": LABEL_TO_CAT[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    return out


def reference_stats(coco_gt, results, image_ids, cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        e = COCOeval(coco_gt, coco_dt, iouType="bbox")
        e.params.imgIds = sorted(image_ids)
        if cat_ids is not None:
            e.params.catIds = cat_ids
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [float(s) for s in e.stats]


@pytest.fixture
def gt_json(tmp_path):
    path = tmp_path / "instances_test.json"
    path.write_text(json.dumps(gt_dataset()))
    return path


def run_ours(coco_gt, image_ids, dets, batch=2):
    ev = CocoEvaluator(coco_gt, LABEL_TO_CAT)
    for start in range(0, len(image_ids), batch):
        ids = image_ids[start : start + batch]
        ev.update(ids, [dets[i] for i in ids])
    return ev, ev.evaluate()


def test_detections_to_coco_results_mapping_and_xywh():
    dets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 70.0], [0.5, 1.5, 2.0, 3.0]]),
            "labels": torch.tensor([2, 4]),
            "scores": torch.tensor([0.75, 0.25]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)},
    ]
    res = detections_to_coco_results([42, 43], dets, LABEL_TO_CAT)
    assert res == [
        {"image_id": 42, "category_id": 3, "bbox": [10.0, 20.0, 30.0, 50.0], "score": 0.75},
        {"image_id": 42, "category_id": 9, "bbox": [0.5, 1.5, 1.5, 1.5], "score": 0.25},
    ]
    assert all(isinstance(v, float) for r in res for v in r["bbox"] + [r["score"]])
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in res)
    with pytest.raises(ValueError, match="label 5 has no category id"):
        detections_to_coco_results(
            [1], [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([5]), "scores": torch.ones(1)}], LABEL_TO_CAT
        )
    with pytest.raises(ValueError, match="one detection dict per image id"):
        detections_to_coco_results([1, 2], dets[:1], LABEL_TO_CAT)


def test_twelve_numbers_equal_pycocotools(gt_json):
    dets = make_detections()
    ids = [1, 2, 3, 4, 5]
    _, m = run_ours(gt_json, ids, dets)  # ground truth given as a json path
    expected = reference_stats(coco_from(gt_dataset()), reference_results(ids, dets), ids)
    assert m.stats == pytest.approx(expected, abs=1e-12)
    assert [getattr(m, n) for n in COCO_STAT_NAMES] == m.stats
    # the case is not trivial: a real mix of hits and misses, every area range populated
    assert 0.2 < m.AP < 0.9 and all(v > 0 for v in m.stats)
    assert m.message is None
    assert (m.num_images, m.num_detections) == (5, sum(len(d["scores"]) for d in dets.values()))
    assert "Accumulating evaluation results" in m.log  # pycocotools' output kept, not printed


def test_per_class_ap_matches_single_category_cocoeval():
    coco_gt = coco_from(gt_dataset())
    dets = make_detections()
    ids = [1, 2, 3, 4, 5]
    _, m = run_ours(coco_gt, ids, dets)
    results = reference_results(ids, dets)
    assert [c.category_id for c in m.per_class] == [1, 3, 7, 9]
    assert [c.name for c in m.per_class] == ["cat", "dog", "bird", "fish"]
    assert [c.label for c in m.per_class] == [1, 2, 3, 4]
    assert [c.num_gt for c in m.per_class] == [5, 4, 3, 0]  # crowd objects are not counted
    for c in m.per_class[:3]:
        alone = reference_stats(coco_gt, results, ids, cat_ids=[c.category_id])
        assert pytest.approx(alone[0], abs=1e-12) == c.AP
        assert pytest.approx(alone[1], abs=1e-12) == c.AP50
    fish = m.per_class[3]
    assert fish.AP == -1.0 and fish.AP50 == -1.0 and not fish.has_gt and fish.num_detections == 1
    # COCOeval leaves the category without ground truth out of its mean, and so do we
    assert pytest.approx(np.mean([c.AP for c in m.per_class[:3]]), abs=1e-12) == m.AP
    assert pytest.approx(np.mean([c.AP50 for c in m.per_class[:3]]), abs=1e-12) == m.AP50
    table = m.format_table()
    assert "fish (9)" in table and "n/a" in table and "AR100" in table
    fish_row = next(line for line in table.splitlines() if "fish (9)" in line)
    assert fish_row.split()[-2:] == ["n/a", "n/a"]
    assert set(m.curves) == {"cat", "dog", "bird"}
    recall, precision = m.curves["cat"]
    assert recall.shape == precision.shape == (101,)


def test_subset_of_images_is_evaluated_alone():
    coco_gt = coco_from(gt_dataset())
    dets = make_detections()
    subset = [3, 1]
    _, m = run_ours(coco_gt, subset, dets, batch=1)
    expected = reference_stats(coco_gt, reference_results(subset, dets), subset)
    assert m.stats == pytest.approx(expected, abs=1e-12)
    # the ground truth of the images never run (2, 4, 5) does not count against the subset
    assert m.num_images == 2
    assert [c.num_gt for c in m.per_class] == [3, 3, 1, 0]
    all_ids = [1, 2, 3, 4, 5]
    _, full = run_ours(coco_gt, all_ids, dets)
    assert m.stats != full.stats


def test_no_detections_gives_what_cocoeval_gives_a_method_that_finds_nothing():
    coco_gt = coco_from(gt_dataset())
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    ids = [1, 2, 3]
    ev = CocoEvaluator(coco_gt, LABEL_TO_CAT)
    ev.update(ids, [empty] * 3)
    m = ev.evaluate()
    assert ev.results == [] and m.num_detections == 0
    assert "no detections" in m.message
    # pycocotools on the same images with a single false positive somewhere harmless: it finds nothing either
    fp = [{"image_id": 1, "category_id": 7, "bbox": [150.0, 150.0, 10.0, 10.0], "score": 0.5}]
    expected = reference_stats(coco_gt, fp, ids)
    assert m.stats == expected
    assert set(m.stats) <= {0.0, -1.0}
    # images 1..3 have small objects, and all area ranges have ground truth: everything is 0, not -1
    assert m.stats == [0.0] * 12
    assert [c.AP for c in m.per_class] == [0.0, 0.0, 0.0, -1.0]


def test_no_detections_where_an_area_range_has_no_ground_truth():
    coco_gt = coco_from(gt_dataset())
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    ev = CocoEvaluator(coco_gt, LABEL_TO_CAT)
    ev.update([3, 4], [empty, empty])  # image 3 has small and medium objects only, image 4 none
    m = ev.evaluate()
    fp = [{"image_id": 4, "category_id": 1, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.5}]
    assert m.stats == reference_stats(coco_gt, fp, [3, 4])
    assert m.APl == -1.0 and m.ARl == -1.0 and m.APs == 0.0 and m.APm == 0.0 and m.AP == 0.0


def test_results_json_loads_with_pycocotools(gt_json, tmp_path):
    dets = make_detections()
    ev, _ = run_ours(gt_json, [1, 2, 3, 4, 5], dets)
    path = ev.write_results(tmp_path / "out" / "detections.json")
    coco_gt = coco_from(gt_dataset())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(str(path))
    assert len(coco_dt.anns) == len(ev.results)
    assert json.loads(path.read_text()) == ev.results
    # evaluate() handed pycocotools copies: our results did not grow pycocotools' fields
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in ev.results)
    ann = coco_dt.anns[1]
    assert ann["bbox"] == ev.results[0]["bbox"] and ann["area"] == ann["bbox"][2] * ann["bbox"][3]


def test_metrics_json_round_trip(tmp_path):
    coco_gt = coco_from(gt_dataset())
    _, m = run_ours(coco_gt, [1, 2, 3, 4, 5], make_detections())
    d = json.loads(m.to_json(tmp_path / "metrics.json").read_text())
    assert d == m.as_dict()
    assert [d[n] for n in COCO_STAT_NAMES] == m.stats
    assert d["per_class"][3] == {
        "category_id": 9,
        "name": "fish",
        "label": 4,
        "num_gt": 0,
        "num_detections": 1,
        "AP": -1.0,
        "AP50": -1.0,
    }


def test_evaluator_rejects_bad_input(gt_json, tmp_path):
    coco_gt = coco_from(gt_dataset())
    dets = make_detections()
    ev = CocoEvaluator(coco_gt, LABEL_TO_CAT)
    with pytest.raises(ValueError, match="never called"):
        ev.evaluate()
    with pytest.raises(ValueError, match=r"image ids \[99\] are not in the COCO ground truth"):
        ev.update([99], [dets[1]])
    ev.update([1], [dets[1]])
    with pytest.raises(ValueError, match="more than once"):
        ev.update([1], [dets[1]])
    with pytest.raises(ValueError, match="more than once"):
        ev.update([2, 2], [dets[2], dets[2]])
    bad = {"boxes": torch.zeros(1, 4), "labels": torch.tensor([7]), "scores": torch.ones(1)}
    with pytest.raises(ValueError, match="label 7"):
        ev.update([2, 3], [dets[2], bad])
    assert ev.image_ids == [1]  # a rejected update leaves nothing behind
    with pytest.raises(ValueError, match="category ids \\[5\\]"):
        CocoEvaluator(coco_gt, {1: 1, 2: 5})
    with pytest.raises(FileNotFoundError, match="no such file"):
        CocoEvaluator(tmp_path / "missing.json", LABEL_TO_CAT)
    ev2 = CocoEvaluator(coco_gt, LABEL_TO_CAT)
    ev2.update(torch.tensor([2, 3]), [dets[2], dets[3]])  # a tensor of ids, as a collate may give
    assert ev2.image_ids == [2, 3]
