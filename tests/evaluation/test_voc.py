"""VOC AP against curves and AP values worked out by hand (in the comments)."""

import json
import math

import pytest
import torch

from fasterrcnn.evaluation import average_precision, evaluate_voc


def det(boxes, labels, scores):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


def gt(boxes, labels, difficult=None):
    out = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if difficult is not None:
        out["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return out


# Case A: 3 objects, 5 detections whose outcomes in score order are TP FP TP FP TP.
#   cumulative TP 1 1 2 2 3, FP 0 1 1 2 2
#   recall    1/3 1/3 2/3 2/3 1
#   precision 1   1/2 2/3 1/2 3/5
#   envelope (max to the right): 1 2/3 2/3 3/5 3/5
#   area: 1/3*1 + 0 + 1/3*2/3 + 0 + 1/3*3/5 = 15/45 + 10/45 + 9/45 = 34/45
#   11-point: t=0..0.3 -> 1 (4 thresholds), t=0.4..0.6 -> 2/3 (3), t=0.7..1.0 -> 3/5 (4)
#             (4 + 2 + 2.4) / 11 = 8.4/11
RECALL_A = [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0]
PRECISION_A = [1.0, 1 / 2, 2 / 3, 1 / 2, 3 / 5]
AP_A_AREA = 34 / 45  # 0.7555...
AP_A_11 = 8.4 / 11  # 0.7636...


def case_a_images(with_difficult=False, difficult_flag=True):
    """Two images; class 1. The 0.6 detection duplicates object a (IoU 0.9) and is a FP."""
    gt_boxes_1 = [[0, 0, 10, 10], [20, 20, 30, 30]]  # a, b
    gt_boxes_2 = [[0, 0, 20, 20]]  # c
    dets_1 = det(
        [
            [0, 0, 10, 10],  # 0.9 on a: TP
            [50, 50, 60, 60],  # 0.8 on nothing: FP
            [0, 0, 10, 9],  # 0.6 on a again (IoU 0.9): duplicate, FP
            [20, 20, 30, 30],
        ],  # 0.5 on b: TP
        [1, 1, 1, 1],
        [0.9, 0.8, 0.6, 0.5],
    )
    d2_boxes, d2_labels, d2_scores = [[1, 1, 20, 20]], [1], [0.7]  # 0.7 on c (IoU 361/400): TP
    g2_boxes, g2_labels, g2_diff = gt_boxes_2, [1], [False]
    if with_difficult:
        g2_boxes = gt_boxes_2 + [[40, 40, 60, 60]]  # d, difficult
        g2_labels, g2_diff = [1, 1], [False, difficult_flag]
        d2_boxes, d2_labels, d2_scores = d2_boxes + [[40, 40, 60, 61]], [1, 1], [0.7, 0.65]  # 0.65 on d
    dets = [dets_1, det(d2_boxes, d2_labels, d2_scores)]
    gts = [gt(gt_boxes_1, [1, 1], [False, False]), gt(g2_boxes, g2_labels, g2_diff)]
    return dets, gts


def test_average_precision_hand_curve():
    assert average_precision(RECALL_A, PRECISION_A, "area") == pytest.approx(AP_A_AREA, abs=1e-12)
    assert average_precision(RECALL_A, PRECISION_A, "11point") == pytest.approx(AP_A_11, abs=1e-12)
    assert average_precision(RECALL_A, PRECISION_A) == pytest.approx(AP_A_11, abs=1e-12)  # default 11point


def test_eleven_point_counts_exact_threshold():
    # 10 objects, 3 TPs first: recall 0.1 0.2 0.3, precision 1 1 1.
    # t = 0, 0.1, 0.2, 0.3 -> 1; t >= 0.4 never reached -> 0. AP = 4/11 (0.3 counts for t = 0.3).
    assert average_precision([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], "11point") == pytest.approx(4 / 11, abs=1e-12)
    # area: 0.3 * 1
    assert average_precision([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], "area") == pytest.approx(0.3, abs=1e-12)


def test_average_precision_edge_cases():
    assert average_precision([], [], "area") == 0.0
    assert average_precision([], [], "11point") == 0.0
    # all FPs: recall stays 0 -> area 0; 11-point: only t=0 is reached, best precision 0 -> 0
    assert average_precision([0.0, 0.0], [0.0, 0.0], "area") == 0.0
    assert average_precision([0.0, 0.0], [0.0, 0.0], "11point") == 0.0
    with pytest.raises(ValueError, match="method"):
        average_precision([0.5], [1.0], "voc2012")
    with pytest.raises(ValueError, match="same number"):
        average_precision([0.5, 1.0], [1.0], "area")
    with pytest.raises(ValueError, match="non-decreasing"):
        average_precision([0.5, 0.2], [1.0, 1.0], "area")


def test_evaluate_voc_case_a():
    dets, gts = case_a_images()
    m = evaluate_voc(dets, gts, num_classes=1, class_names=["thing"])
    (c,) = m.per_class
    assert (c.name, c.num_gt, c.num_detections, c.num_tp, c.num_fp, c.num_ignored) == ("thing", 3, 5, 3, 2, 0)
    assert c.recall.tolist() == pytest.approx(RECALL_A, abs=1e-12)
    assert c.precision.tolist() == pytest.approx(PRECISION_A, abs=1e-12)
    assert c.ap_area == pytest.approx(AP_A_AREA, abs=1e-12)
    assert c.ap_11point == pytest.approx(AP_A_11, abs=1e-12)
    assert m.map_area == pytest.approx(AP_A_AREA, abs=1e-12)
    assert m.map_11point == pytest.approx(AP_A_11, abs=1e-12)
    assert m.message is None
    assert (m.num_images, m.num_detections) == (2, 5)


def test_difficult_object_is_ignored():
    # Adds difficult object d and a 0.65 detection on it: that detection is neither TP nor FP and d is
    # not a positive, so the curve and the APs are exactly case A's.
    dets, gts = case_a_images(with_difficult=True)
    (c,) = evaluate_voc(dets, gts, num_classes=1).per_class
    assert (c.num_gt, c.num_difficult, c.num_detections, c.num_tp, c.num_fp, c.num_ignored) == (3, 1, 6, 3, 2, 1)
    assert c.recall.tolist() == pytest.approx(RECALL_A, abs=1e-12)
    assert c.ap_area == pytest.approx(AP_A_AREA, abs=1e-12)
    assert c.ap_11point == pytest.approx(AP_A_11, abs=1e-12)


def test_same_object_not_difficult_counts():
    # The same images with d not difficult: 4 positives, outcomes (.9 .8 .7 .65 .6 .5) TP FP TP TP FP TP
    #   cum TP 1 1 2 3 3 4; recall 1/4 1/4 2/4 3/4 3/4 1
    #   precision 1 1/2 2/3 3/4 3/5 2/3; envelope 1 3/4 3/4 3/4 2/3 2/3
    #   area: 1/4*1 + 1/4*3/4 + 1/4*3/4 + 1/4*2/3 = 1/4 + 3/8 + 1/6 = 19/24
    #   11-point: t=0..0.2 -> 1 (3), t=0.3..0.7 -> 3/4 (5), t=0.8..1 -> 2/3 (3): (3 + 3.75 + 2)/11 = 8.75/11
    dets, gts = case_a_images(with_difficult=True, difficult_flag=False)
    (c,) = evaluate_voc(dets, gts, num_classes=1).per_class
    assert (c.num_gt, c.num_tp, c.num_fp) == (4, 4, 2)
    assert c.precision.tolist() == pytest.approx([1, 1 / 2, 2 / 3, 3 / 4, 3 / 5, 2 / 3], abs=1e-12)
    assert c.ap_area == pytest.approx(19 / 24, abs=1e-12)
    assert c.ap_11point == pytest.approx(8.75 / 11, abs=1e-12)


def test_best_object_already_claimed_is_a_false_positive():
    # a = [0,0,10,10], b = [5,0,15,10]. 0.9 is a exactly: TP. 0.8 = [2,0,12,10]:
    #   IoU with a = 80/120 = 0.667, with b = 70/130 = 0.538; its best object a is claimed -> FP
    #   (VOC does not fall back to b). recall 1/2 1/2, precision 1 1/2
    #   area 1/2; 11-point t=0..0.5 -> 1 (6 thresholds) -> 6/11
    dets = [det([[0, 0, 10, 10], [2, 0, 12, 10]], [1, 1], [0.9, 0.8])]
    gts = [gt([[0, 0, 10, 10], [5, 0, 15, 10]], [1, 1])]
    (c,) = evaluate_voc(dets, gts, num_classes=1).per_class
    assert (c.num_tp, c.num_fp) == (1, 1)
    assert c.ap_area == pytest.approx(0.5, abs=1e-12)
    assert c.ap_11point == pytest.approx(6 / 11, abs=1e-12)


def test_iou_exactly_at_threshold_matches_and_no_plus_one():
    # gt [0,0,10,10] (area 100), det [0,0,10,5] (area 50): continuous IoU = 50/100 = 0.5 -> TP (IoU >= 0.5).
    # With the devkit's +1 pixel convention it would be 66/121 = 0.545; we use the continuous one.
    dets = [det([[0, 0, 10, 5]], [1], [0.5])]
    gts = [gt([[0, 0, 10, 10]], [1])]
    (c,) = evaluate_voc(dets, gts, num_classes=1).per_class
    assert c.num_tp == 1 and c.ap_area == 1.0 and c.ap_11point == 1.0
    # just under: [0,0,10,4.9] -> IoU 0.49 -> FP
    (c,) = evaluate_voc([det([[0, 0, 10, 4.9]], [1], [0.5])], gts, num_classes=1).per_class
    assert c.num_tp == 0 and c.ap_area == 0.0


def test_class_without_ground_truth_and_class_without_detections():
    # 3 classes: 1 is case A; 2 has a detection but no object (AP undefined, NaN, out of the mean);
    # 3 has an object but no detection (AP 0). mAP = (AP_A + 0) / 2.
    dets, gts = case_a_images()
    dets[0] = det(
        dets[0]["boxes"].tolist() + [[70, 70, 80, 80]],
        dets[0]["labels"].tolist() + [2],
        dets[0]["scores"].tolist() + [0.95],
    )
    gts[1] = gt(gts[1]["boxes"].tolist() + [[60, 60, 90, 90]], [1, 3])
    m = evaluate_voc(dets, gts, num_classes=3, class_names=["__background__", "a", "b", "c"])
    c1, c2, c3 = m.per_class
    assert [c.name for c in m.per_class] == ["a", "b", "c"]
    assert c1.ap_area == pytest.approx(AP_A_AREA, abs=1e-12)
    assert math.isnan(c2.ap_area) and math.isnan(c2.ap_11point)
    assert (c2.num_gt, c2.num_detections, c2.num_fp) == (0, 1, 1)
    assert c3.ap_area == 0.0 and c3.ap_11point == 0.0 and c3.num_gt == 1
    assert m.map_area == pytest.approx(AP_A_AREA / 2, abs=1e-12)
    assert m.map_11point == pytest.approx(AP_A_11 / 2, abs=1e-12)
    assert set(m.curves) == {"a", "c"}
    d = m.as_dict()
    assert d["per_class"][1]["ap_area"] is None
    json.dumps(d)  # JSON-safe
    table = m.format_table()
    assert "n/a" in table and "0.7556" in table


def test_detection_of_other_class_does_not_match():
    # A class-2 detection sitting exactly on a class-1 object is a FP for class 2, and class 1 stays unmatched.
    dets = [det([[0, 0, 10, 10]], [2], [0.9])]
    gts = [gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2])]
    m = evaluate_voc(dets, gts, num_classes=2)
    assert [c.num_tp for c in m.per_class] == [0, 0]
    assert [c.ap_area for c in m.per_class] == [0.0, 0.0]


def test_no_detections():
    empty = det([], [], [])
    _, gts = case_a_images()
    m = evaluate_voc([empty, empty], gts, num_classes=2)
    assert m.per_class[0].ap_11point == 0.0 and m.per_class[0].ap_area == 0.0
    assert math.isnan(m.per_class[1].ap_area)
    assert m.map_11point == 0.0 and m.map_area == 0.0
    assert "no detections" in m.message
    assert m.num_detections == 0


def test_no_ground_truth_at_all():
    m = evaluate_voc([det([[0, 0, 5, 5]], [1], [0.3])], [gt([], [])], num_classes=1)
    assert math.isnan(m.map_area) and math.isnan(m.map_11point)
    assert "undefined" in m.message
    assert m.as_dict()["map_area"] is None


def test_score_order_not_input_order():
    # Same detections as case A image 1, shuffled within the image: the result must not change.
    dets, gts = case_a_images()
    perm = torch.tensor([3, 1, 0, 2])
    dets[0] = {k: v[perm] for k, v in dets[0].items()}
    m = evaluate_voc(dets, gts, num_classes=1)
    assert m.map_area == pytest.approx(AP_A_AREA, abs=1e-12)


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="one of each per image"):
        evaluate_voc([det([], [], [])], [], num_classes=1)
    with pytest.raises(ValueError, match="label 5 is outside 1..2"):
        evaluate_voc([det([[0, 0, 1, 1]], [5], [0.5])], [gt([], [])], num_classes=2)
    with pytest.raises(ValueError, match="'boxes' has shape"):
        evaluate_voc(
            [{"boxes": torch.zeros(2, 3), "labels": torch.ones(2), "scores": torch.ones(2)}],
            [gt([], [])],
            num_classes=1,
        )
    with pytest.raises(ValueError, match="missing field 'scores'"):
        evaluate_voc([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], [gt([], [])], num_classes=1)
    with pytest.raises(ValueError, match="class_names"):
        evaluate_voc([det([], [], [])], [gt([], [])], num_classes=2, class_names=["x"])


def _plain_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _plain_greedy_curve(dets, gts, label):
    """The VOC assignment written as the protocol reads: one detection at a time, in score order."""
    items = [
        (s, i, k)
        for i, d in enumerate(dets)
        for k, (s, lab) in enumerate(zip(d["scores"].tolist(), d["labels"].tolist()))
        if lab == label
    ]
    items.sort(key=lambda t: -t[0])  # stable: ties keep image, then in-image order
    claimed, outcomes = set(), []
    num_pos = sum(
        1 for g in gts for lab, dif in zip(g["labels"].tolist(), g["difficult"].tolist()) if lab == label and not dif
    )
    for _, i, k in items:
        box = dets[i]["boxes"][k].tolist()
        best, best_j = -1.0, None
        for j, (gbox, lab) in enumerate(zip(gts[i]["boxes"].tolist(), gts[i]["labels"].tolist())):
            if lab == label and _plain_iou(box, gbox) > best:
                best, best_j = _plain_iou(box, gbox), j
        if best_j is not None and best >= 0.5:
            if gts[i]["difficult"][best_j]:
                continue  # ignored
            outcomes.append((i, best_j) not in claimed)
            claimed.add((i, best_j))
        else:
            outcomes.append(False)
    tp = fp = 0
    recall, precision = [], []
    for hit in outcomes:
        tp, fp = tp + hit, fp + (not hit)
        recall.append(tp / num_pos)
        precision.append(tp / (tp + fp))
    return recall, precision


def test_vectorised_matching_equals_plain_greedy_loop():
    g = torch.Generator().manual_seed(0)
    dets, gts = [], []
    for _ in range(30):
        n = int(torch.randint(0, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 80
        gbox = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 30], 1)
        glab = torch.randint(1, 4, (n,), generator=g)
        gts.append({"boxes": gbox, "labels": glab, "difficult": torch.rand(n, generator=g) < 0.2})
        # detections near the objects (some duplicates, some with the wrong class) and random boxes
        near = gbox.repeat(2, 1) + torch.randn(2 * n, 4, generator=g) * 4
        xy = torch.rand(4, 2, generator=g) * 80
        far = torch.cat([xy, xy + 15], 1)
        boxes = torch.cat([near, far])
        labels = torch.cat([glab.repeat(2), torch.randint(1, 4, (4,), generator=g)])
        flip = torch.rand(len(labels), generator=g) < 0.15
        labels = torch.where(flip, torch.randint(1, 4, (len(labels),), generator=g), labels)
        # scores on a coarse grid, so ties happen and the tie rule is exercised
        scores = torch.randint(1, 20, (len(labels),), generator=g).float() / 20
        dets.append({"boxes": boxes, "labels": labels, "scores": scores})
    m = evaluate_voc(dets, gts, num_classes=3)
    assert sum(c.num_ignored for c in m.per_class) > 0  # difficult objects were hit
    for c in m.per_class:
        recall, precision = _plain_greedy_curve(dets, gts, c.label)
        assert c.num_gt > 0 and len(recall) > 0
        assert c.recall.tolist() == pytest.approx(recall, abs=1e-6)
        assert c.precision.tolist() == pytest.approx(precision, abs=1e-6)
