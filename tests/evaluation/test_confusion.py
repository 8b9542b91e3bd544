"""Error analysis (fasterrcnn.evaluation.confusion) against counts and curves worked out by hand in the comments."""

import csv

import numpy as np
import pytest
import torch

from fasterrcnn.evaluation.confusion import ImageMatch, confusion_matrix, f1_curve, match_image

NAMES = ["__background__", "cat", "dog", "bird"]
CAT, DOG, BIRD = 1, 2, 3
# matrix rows / columns: cat 0, dog 1, bird 2, background 3
C_CAT, C_DOG, C_BIRD, C_BG = 0, 1, 2, 3


def image(gt=(), crowd=(), dets=()):
    """gt: [(box, label)] non-crowd objects; crowd: [(box, label)] crowd regions; dets: [(box, label, score)]."""
    objects = list(gt) + list(crowd)
    return {
        "gt_boxes": torch.tensor([b for b, _ in objects], dtype=torch.float32).reshape(-1, 4),
        "gt_labels": torch.tensor([lab for _, lab in objects], dtype=torch.int64),
        "gt_crowd": torch.tensor([False] * len(gt) + [True] * len(crowd)),
        "det_boxes": torch.tensor([b for b, _, _ in dets], dtype=torch.float32).reshape(-1, 4),
        "det_labels": torch.tensor([lab for _, lab, _ in dets], dtype=torch.int64),
        "det_scores": torch.tensor([s for _, _, s in dets], dtype=torch.float32),
    }


def cells(*entries):
    """A 4 x 4 expected matrix from (row, column, count) entries."""
    out = np.zeros((4, 4), dtype=np.int64)
    for row, col, n in entries:
        out[row, col] += n
    return out


A = [0, 0, 10, 10]
A_TALL = [0, 0, 10, 11]  # IoU with A: 100 / 110 = 0.91
A_LOW = [0, 1, 10, 11]  # IoU with A: 90 / 110 = 0.82
FAR = [50, 50, 60, 60]  # overlaps nothing

CASES = {
    # (a) a cat nobody detected: missed -> [cat, background]
    "miss": (image(gt=[(A, CAT)]), cells((C_CAT, C_BG, 1))),
    # (b) a dog detection on nothing: false detection -> [background, dog]
    "false_detection": (image(dets=[(FAR, DOG, 0.9)]), cells((C_BG, C_DOG, 1))),
    # (c) a cat detected as a dog (IoU 1): no same-class match, then the class confusion -> [cat, dog]
    "class_swap": (image(gt=[(A, CAT)], dets=[(A, DOG, 0.9)]), cells((C_CAT, C_DOG, 1))),
    # (d) one dog, two dog detections (IoU 1 and 0.91): the 0.9 one matches -> [dog, dog]; the 0.8 one finds the
    #     dog taken and no other object -> false detection [background, dog]
    "duplicate": (
        image(gt=[(A, DOG)], dets=[(A, DOG, 0.9), (A_TALL, DOG, 0.8)]),
        cells((C_DOG, C_DOG, 1), (C_BG, C_DOG, 1)),
    ),
    # (e) two crowd regions (a bird crowd, a cat crowd) with no detection of their own: not missed. A cat detection
    #     wholly inside the bird crowd (intersection / its area = 1): ignored, whatever the classes. A bird
    #     detection [95, 0, 115, 10] only a quarter on the bird crowd (50 / 200 = 0.25 < 0.5): false detection.
    "crowd": (
        image(
            crowd=[([0, 0, 100, 100], BIRD), ([200, 200, 300, 300], CAT)],
            dets=[([10, 10, 20, 20], CAT, 0.9), ([95, 0, 115, 10], BIRD, 0.9)],
        ),
        cells((C_BG, C_BIRD, 1)),
    ),
    # (f) a bird detected at score 0.3 (threshold 0.5): the detection does not count, so the bird is missed; a
    #     0.2 detection on nothing is no false detection either
    "below_score_threshold": (
        image(gt=[(A, BIRD)], dets=[(A, BIRD, 0.3), (FAR, DOG, 0.2)]),
        cells((C_BIRD, C_BG, 1)),
    ),
    # (g) a cat with a dog detection at 0.95 (IoU 1) and a cat detection at 0.6 (IoU 0.91): same class first,
    #     so the cat detection matches -> [cat, cat]; the dog detection has nothing left -> [background, dog]
    "same_class_first": (
        image(gt=[(A, CAT)], dets=[(A, DOG, 0.95), (A_TALL, CAT, 0.6)]),
        cells((C_CAT, C_CAT, 1), (C_BG, C_DOG, 1)),
    ),
    # (g') as (g), with a bird [0, 1, 10, 11] next to the cat (IoU 0.82 with the dog detection): the cat detection
    #      still takes the cat -> [cat, cat]; the dog detection then pairs with the bird -> [bird, dog]
    "same_class_first_then_swap": (
        image(gt=[(A, CAT), (A_LOW, BIRD)], dets=[(A, DOG, 0.95), (A, CAT, 0.6)]),
        cells((C_CAT, C_CAT, 1), (C_BIRD, C_DOG, 1)),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_confusion_matrix_case(name):
    img, expected = CASES[name]
    cm = confusion_matrix(images=[img], class_names=NAMES, score_threshold=0.5, iou_threshold=0.5)
    np.testing.assert_array_equal(cm.counts, expected)
    assert cm.counts[C_BG, C_BG] == 0


# All the cases together, by row (ground truth) and column (predicted: cat, dog, bird, background):
#   cat:  (g) + (g') same class 2, (c) as dog 1, (a) missed 1
#   dog:  (d) 1 correct
#   bird: (g') as dog 1, (f) missed 1
#   background (false detections): dog from (b), (d), (g) = 3; bird from (e) = 1
ALL_COUNTS = np.array([[2, 1, 0, 1], [0, 1, 0, 0], [0, 1, 0, 1], [0, 3, 1, 0]])


@pytest.fixture
def all_cases():
    return confusion_matrix(images=[img for img, _ in CASES.values()], class_names=NAMES, iou_threshold=0.5)


def test_confusion_matrix_all_cases_and_normalized(all_cases):
    cm = all_cases
    assert cm.class_names == ["cat", "dog", "bird", "background"]
    np.testing.assert_array_equal(cm.counts, ALL_COUNTS)
    assert cm.counts.dtype == np.int64
    # each row over its total: cat 4, dog 1, bird 2, background 4
    expected = np.array([[0.5, 0.25, 0, 0.25], [0, 1, 0, 0], [0, 0.5, 0, 0.5], [0, 0.75, 0.25, 0]])
    np.testing.assert_allclose(cm.normalized(), expected)
    # a row summing to 0 stays 0
    empty = confusion_matrix(images=[], class_names=NAMES)
    np.testing.assert_array_equal(empty.normalized(), np.zeros((4, 4)))


def test_confusion_matrix_csv(all_cases, tmp_path):
    path = tmp_path / "confusion.csv"
    all_cases.to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = ["ground truth \\ predicted", "cat", "dog", "bird", "background"]
    assert rows[0] == header
    assert rows[1:5] == [
        ["cat", "2", "1", "0", "1"],
        ["dog", "0", "1", "0", "0"],
        ["bird", "0", "1", "0", "1"],
        ["background", "0", "3", "1", "0"],
    ]
    assert rows[5] == []
    assert rows[6] == header
    assert rows[7] == ["cat", "0.5000", "0.2500", "0.0000", "0.2500"]
    assert rows[10] == ["background", "0.0000", "0.7500", "0.2500", "0.0000"]
    assert len(rows) == 11


def test_confusion_matrix_thresholds_and_rule():
    # the swap of case (c) at IoU 0.82 (cat A, dog detection A_LOW): a confusion at IoU 0.6, at 0.9 a miss and a
    # false detection
    img = image(gt=[(A, CAT)], dets=[(A_LOW, DOG, 0.9)])
    loose = confusion_matrix(images=[img], class_names=NAMES, iou_threshold=0.6, score_threshold=0.25)
    np.testing.assert_array_equal(loose.counts, cells((C_CAT, C_DOG, 1)))
    strict = confusion_matrix(images=[img], class_names=NAMES, iou_threshold=0.9)
    np.testing.assert_array_equal(strict.counts, cells((C_CAT, C_BG, 1), (C_BG, C_DOG, 1)))
    assert "IoU >= 0.6" in loose.rule and "score >= 0.25" in loose.rule
    assert "IoU >= 0.9" in strict.rule


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="labels must be in 1..3"):
        confusion_matrix(images=[image(dets=[(A, 4, 0.9)])], class_names=NAMES)
    bad = image(gt=[(A, CAT)])
    bad["gt_crowd"] = torch.tensor([False, False])
    with pytest.raises(ValueError, match="1 boxes, 1 labels, 2 crowd flags"):
        confusion_matrix(images=[bad], class_names=NAMES)


def test_match_image_greedy_by_score():
    # two cats, A = [0, 0, 10, 10] and B = [0, 4, 10, 14]. Detections (input order):
    #   0: cat [0, 4, 10, 14] score 0.5 -- IoU 1 with B, 60 / 140 = 0.43 with A
    #   1: cat [0, 3, 10, 13] score 0.9 -- IoU 90 / 110 = 0.82 with B, 70 / 130 = 0.54 with A
    #   2: dog [0, 0, 10, 10] score 0.8 -- IoU 1 with A, but of another class
    # By score: 1 takes its best, B (TP); 2 finds no dog (FP); 0 finds B taken and A under 0.5 (FP), although
    # taking 0 first would have matched both cats.
    m = match_image(
        gt_boxes=np.array([A, [0, 4, 10, 14]], dtype=np.float32),
        gt_labels=np.array([CAT, CAT]),
        gt_crowd=np.array([False, False]),
        det_boxes=np.array([[0, 4, 10, 14], [0, 3, 10, 13], A], dtype=np.float32),
        det_labels=np.array([CAT, CAT, DOG]),
        det_scores=np.array([0.5, 0.9, 0.8], dtype=np.float32),
    )
    np.testing.assert_array_equal(m.det_tp, [False, True, False])
    np.testing.assert_array_equal(m.det_ignored, [False, False, False])
    np.testing.assert_array_equal(m.det_labels, [CAT, CAT, DOG])
    np.testing.assert_allclose(m.det_scores, [0.5, 0.9, 0.8])
    np.testing.assert_array_equal(m.gt_labels, [CAT, CAT])


def test_match_image_ties_and_crowd():
    # two equal-score cat detections on one cat: the first in input order wins the tie. A third on a crowd
    # region is ignored; the crowd object is not among gt_labels.
    m = match_image(
        **image(
            gt=[(A, CAT)],
            crowd=[([100, 100, 200, 200], DOG)],
            dets=[(A_TALL, CAT, 0.7), (A, CAT, 0.7), ([120, 120, 130, 130], CAT, 0.9)],
        )
    )
    np.testing.assert_array_equal(m.det_tp, [True, False, False])
    np.testing.assert_array_equal(m.det_ignored, [False, False, True])
    np.testing.assert_array_equal(m.gt_labels, [CAT])


# F1: one image, cats A, B and dog D; no bird; a crowd region. Detections, by score:
#   0.95 dog on the crowd region      ignored
#   0.9  cat on A                     TP
#   0.8  dog on D                     TP
#   0.7  cat on nothing               FP
#   0.6  bird on nothing              FP (bird has no ground truth)
#   0.4  cat on B                     TP
#   0.3  cat on A again (duplicate)   FP
# G = 3. Counted at threshold t (score >= t), all classes:
#   t = 0     TP 3 FP 3: P 1/2  R 1    F1 2/3
#   t = 0.35  TP 3 FP 2: P 3/5  R 1    F1 3/4
#   t = 0.5   TP 2 FP 2: P 1/2  R 2/3  F1 4/7
#   t = 0.75  TP 2 FP 0: P 1    R 2/3  F1 4/5   <- the best, first reached at t = 0.71
#   t = 0.95  TP 0 FP 0: P 1 (nothing counted)  R 0  F1 0 (the ignored 0.95 is no FP)
# Per class: cat (G 2): t = 0 TP 2 FP 2 -> F1 2/3; t = 0.5 TP 1 FP 1 -> 1/2; t = 0.75 TP 1 FP 0 -> 2/3.
#            dog (G 1): t = 0 -> F1 1; t = 0.95 -> 0.   bird: no ground truth -> NaN.
B = [20, 0, 30, 10]
D = [40, 0, 50, 10]
F1_IMAGE = image(
    gt=[(A, CAT), (B, CAT), (D, DOG)],
    crowd=[([100, 0, 200, 100], CAT)],
    dets=[
        ([110, 10, 120, 20], DOG, 0.95),
        (A, CAT, 0.9),
        (D, DOG, 0.8),
        ([60, 0, 70, 10], CAT, 0.7),
        ([60, 20, 70, 30], BIRD, 0.6),
        (B, CAT, 0.4),
        (A, CAT, 0.3),
    ],
)


def test_f1_curve_hand_computed():
    match = match_image(**F1_IMAGE)
    np.testing.assert_array_equal(match.det_tp, [False, True, True, False, False, True, False])
    np.testing.assert_array_equal(match.det_ignored, [True, False, False, False, False, False, False])
    curve = f1_curve([match], num_classes=4)
    np.testing.assert_allclose(curve.thresholds, np.linspace(0, 1, 101))
    at = {0.0: 0, 0.35: 35, 0.5: 50, 0.75: 75, 0.95: 95}
    expected = {  # threshold: (precision, recall, f1)
        0.0: (1 / 2, 1, 2 / 3),
        0.35: (3 / 5, 1, 3 / 4),
        0.5: (1 / 2, 2 / 3, 4 / 7),
        0.75: (1, 2 / 3, 4 / 5),
        0.95: (1, 0, 0),
    }
    for t, (p, r, f) in expected.items():
        i = at[t]
        assert (curve.precision[i], curve.recall[i], curve.f1[i]) == pytest.approx((p, r, f)), f"t = {t}"
    assert curve.best_f1 == pytest.approx(0.8)
    assert curve.best_threshold == pytest.approx(0.71)  # t = 0.70 still counts the 0.7 FP: F1 2/3
    assert curve.f1[70] == pytest.approx(2 / 3)
    assert curve.per_class_f1.shape == (3, 101)
    assert curve.per_class_f1[0, [0, 50, 75]] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert curve.per_class_f1[1, [0, 95]] == pytest.approx([1, 0])
    assert np.isnan(curve.per_class_f1[2]).all()


def test_f1_curve_custom_thresholds_and_empty():
    curve = f1_curve([match_image(**F1_IMAGE)], num_classes=4, thresholds=[0.2, 0.85])
    # t = 0.2: TP 3 FP 3 -> F1 2/3; t = 0.85: TP 1 FP 0 -> P 1, R 1/3, F1 1/2
    assert curve.f1 == pytest.approx([2 / 3, 1 / 2])
    assert curve.best_threshold == pytest.approx(0.2)
    empty = ImageMatch(
        det_scores=np.zeros(0, np.float32),
        det_labels=np.zeros(0, np.int64),
        det_tp=np.zeros(0, bool),
        det_ignored=np.zeros(0, bool),
        gt_labels=np.zeros(0, np.int64),
    )
    curve = f1_curve([empty], num_classes=3)
    assert (curve.f1 == 0).all() and (curve.precision == 1).all() and np.isnan(curve.per_class_f1).all()
    assert curve.best_threshold == 0.0
    with pytest.raises(ValueError, match="strictly increasing"):
        f1_curve([empty], num_classes=3, thresholds=[0.5, 0.2])
