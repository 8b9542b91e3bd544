"""Soft-NMS (fasterrcnn.ops.soft_nms) against a plain loop, on hand-computed cases, per group, and on bad input."""

import math

import pytest
import torch

from fasterrcnn.ops.soft_nms import batched_soft_nms, soft_nms


def ref_iou(p, q):
    """IoU of two boxes in Python floats (float64); a zero union gives 0, as box_iou."""
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_soft_nms(boxes, scores, method, sigma, iou_threshold, score_threshold):
    """The paper's loop, one box at a time in float64: pick the highest current score (ties: lowest index), keep it,
    decay every remaining box by its IoU with the pick, drop the boxes below the score threshold."""
    b = boxes.double().tolist()
    cur = scores.double().tolist()
    remaining = [i for i in range(len(cur)) if cur[i] >= score_threshold]
    keep, kept_scores = [], []
    while remaining:
        best = remaining[0]
        for i in remaining:
            if cur[i] > cur[best]:
                best = i
        keep.append(best)
        kept_scores.append(cur[best])
        remaining.remove(best)
        for j in remaining:
            iou = ref_iou(b[best], b[j])
            if method == "gaussian":
                cur[j] *= math.exp(-(iou**2) / sigma)
            elif iou > iou_threshold:  # linear
                cur[j] *= 1.0 - iou
        remaining = [j for j in remaining if cur[j] >= score_threshold]
    return keep, kept_scores


def random_boxes(n, seed, dtype=torch.float32, spread=60.0, size=40.0):
    """Random boxes crowded enough to overlap a lot, and scores in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * spread
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * size + 1
    boxes = torch.cat((xy, xy + wh), 1).to(dtype)
    scores = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    return boxes, scores


SETTINGS = [
    dict(method="gaussian", sigma=0.5, iou_threshold=0.3, score_threshold=0.001),
    dict(method="gaussian", sigma=0.1, iou_threshold=0.3, score_threshold=0.05),
    dict(method="linear", sigma=0.5, iou_threshold=0.3, score_threshold=0.001),
    dict(method="linear", sigma=0.5, iou_threshold=0.1, score_threshold=0.1),
]


def assert_matches_reference(keep, new_scores, ref_keep, ref_scores, dtype):
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    assert keep.dtype == torch.int64 and new_scores.dtype == dtype
    assert keep.tolist() == ref_keep
    assert torch.allclose(new_scores.double(), torch.tensor(ref_scores, dtype=torch.float64), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
@pytest.mark.parametrize("n, seed", [(1, 0), (7, 1), (60, 2), (200, 3)])
def test_soft_nms_matches_the_reference_loop(n, seed, setting, dtype):
    kwargs = SETTINGS[setting]
    boxes, scores = random_boxes(n, seed, dtype)
    keep, new_scores = soft_nms(boxes, scores, **kwargs)
    ref_keep, ref_scores = ref_soft_nms(boxes, scores, **kwargs)
    assert_matches_reference(keep, new_scores, ref_keep, ref_scores, dtype)
    assert torch.all(new_scores[1:] <= new_scores[:-1])  # picked by decayed score descending


# Three boxes of known IoUs: IoU(A, B) = 50 / 100 = 0.5, IoU(A, C) = 20 / 100 = 0.2, IoU(B, C) = 20 / 50 = 0.4
THREE = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 2]], dtype=torch.float64)  # A, B, C
THREE_SCORES = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)


def test_linear_hand_computed():
    keep, new_scores = soft_nms(THREE, THREE_SCORES, method="linear", iou_threshold=0.3)
    # pick A (0.9); B: IoU 0.5 > 0.3 -> 0.8 * (1 - 0.5) = 0.4; C: IoU 0.2 <= 0.3 -> 0.7 unchanged
    # pick C (0.7 > 0.4); B: IoU 0.4 > 0.3 -> 0.4 * (1 - 0.4) = 0.24
    # pick B (0.24)
    assert keep.tolist() == [0, 2, 1]
    assert torch.allclose(new_scores, torch.tensor([0.9, 0.7, 0.24], dtype=torch.float64))


def test_gaussian_hand_computed():
    keep, new_scores = soft_nms(THREE, THREE_SCORES, method="gaussian", sigma=0.5)
    # pick A (0.9); B: 0.8 * exp(-0.5^2 / 0.5) = 0.8 * exp(-0.5) = 0.48522;
    # C: 0.7 * exp(-0.2^2 / 0.5) = 0.7 * exp(-0.08) = 0.64618; pick C (0.64618 > 0.48522);
    # B: 0.8 * exp(-0.5) * exp(-0.4^2 / 0.5) = 0.8 * exp(-0.82) = 0.35235; pick B
    assert keep.tolist() == [0, 2, 1]
    expected = [0.9, 0.7 * math.exp(-0.08), 0.8 * math.exp(-0.82)]
    assert torch.allclose(new_scores, torch.tensor(expected, dtype=torch.float64))
    assert abs(expected[1] - 0.64618) < 1e-5 and abs(expected[2] - 0.35235) < 1e-5


def test_score_threshold_drops_boxes():
    # linear: B ends at 0.24 < 0.3; gaussian: B ends at 0.35235 < 0.4
    keep, new_scores = soft_nms(THREE, THREE_SCORES, method="linear", iou_threshold=0.3, score_threshold=0.3)
    assert keep.tolist() == [0, 2] and torch.allclose(new_scores, torch.tensor([0.9, 0.7], dtype=torch.float64))
    keep, _ = soft_nms(THREE, THREE_SCORES, method="gaussian", sigma=0.5, score_threshold=0.4)
    assert keep.tolist() == [0, 2]
    # below the threshold from the start: never kept (A), even when nothing would decay it
    low_a = torch.tensor([0.05, 0.8, 0.7], dtype=torch.float64)
    keep, _ = soft_nms(THREE, low_a, method="gaussian", score_threshold=0.1)
    assert keep.tolist() == [1, 2]
    # a duplicate (IoU 1) decays to 0 with the linear method: dropped
    dup = torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 4]])
    keep, _ = soft_nms(dup, torch.tensor([0.9, 0.8]), method="linear")
    assert keep.tolist() == [0]
    keep, _ = soft_nms(THREE, THREE_SCORES, score_threshold=0.95)
    assert keep.tolist() == []


def test_ties_go_to_the_lowest_index_and_inputs_are_untouched():
    boxes = torch.tensor([[0.0, 0, 1, 1], [5, 5, 6, 6], [10, 10, 11, 11]])
    scores = torch.tensor([0.5, 0.7, 0.7], requires_grad=True)
    before = scores.detach().clone()
    keep, new_scores = soft_nms(boxes, scores)
    assert keep.tolist() == [1, 2, 0] and not new_scores.requires_grad
    assert torch.equal(scores.detach(), before)


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_batched_groups_are_independent(method):
    boxes, scores = random_boxes(80, seed=5, dtype=torch.float64)
    idxs = torch.tensor([7, 3] * 40)  # interleaved, and the same region for both groups
    keep, new_scores = batched_soft_nms(boxes, scores, idxs, method=method)
    merged = []
    for group in (3, 7):
        members = torch.nonzero(idxs == group).flatten()
        k, s = soft_nms(boxes[members], scores[members], method=method)
        merged += list(zip(s.tolist(), members[k].tolist()))
    merged.sort(key=lambda pair: -pair[0])
    assert keep.tolist() == [i for _, i in merged]
    assert torch.allclose(new_scores, torch.tensor([s for s, _ in merged], dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_many_groups_match_the_reference(dtype):
    # uneven groups (one large, several tiny, one empty id in between): finished groups leave the layout early
    boxes, scores = random_boxes(150, seed=11, dtype=dtype)
    idxs = torch.cat((torch.zeros(100, dtype=torch.int64), torch.arange(1, 51) % 6 + 2))
    idxs = idxs[torch.randperm(150, generator=torch.Generator().manual_seed(0))]
    keep, new_scores = batched_soft_nms(boxes, scores, idxs, method="linear", score_threshold=0.01)
    ref = []
    for group in idxs.unique().tolist():
        members = torch.nonzero(idxs == group).flatten()
        k, s = ref_soft_nms(boxes[members], scores[members], "linear", 0.5, 0.3, 0.01)
        ref += [(score, members[i].item()) for i, score in zip(k, s)]
    ref.sort(key=lambda pair: -pair[0])
    assert_matches_reference(keep, new_scores, [i for _, i in ref], [s for s, _ in ref], dtype)


def test_batched_with_one_group_equals_soft_nms():
    boxes, scores = random_boxes(50, seed=4)
    keep, new_scores = batched_soft_nms(boxes, scores, torch.full((50,), 3))
    keep1, new_scores1 = soft_nms(boxes, scores)
    assert torch.equal(keep, keep1) and torch.equal(new_scores, new_scores1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_input(dtype):
    boxes, scores = torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype)
    for keep, new_scores in (
        soft_nms(boxes, scores),
        batched_soft_nms(boxes, scores, torch.zeros(0, dtype=torch.int64), method="linear"),
    ):
        assert keep.shape == (0,) and keep.dtype == torch.int64
        assert new_scores.shape == (0,) and new_scores.dtype == dtype


def test_bad_arguments_raise():
    boxes, scores = random_boxes(4, seed=0)
    with pytest.raises(ValueError, match="boxes: expected Tensor"):
        soft_nms(boxes[:, :3], scores)
    with pytest.raises(ValueError, match="scores: expected Tensor"):
        soft_nms(boxes, scores[:3])
    with pytest.raises(ValueError, match="idxs: expected Tensor"):
        batched_soft_nms(boxes, scores, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="method"):
        soft_nms(boxes, scores, method="hard")
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            batched_soft_nms(boxes, scores, torch.zeros(4, dtype=torch.int64), sigma=sigma)
