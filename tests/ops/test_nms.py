import importlib

import numpy as np
import pytest
import torch

from fasterrcnn.ops import batched_nms, nms

# the module, not the function `nms` that fasterrcnn.ops re-exports under the same name
nms_module = importlib.import_module("fasterrcnn.ops.nms")


def ref_iou(p, q, dt):
    """IoU of two boxes with every operation rounded in numpy dtype ``dt`` (as the tensor op does)."""
    p = [dt(v) for v in p]
    q = [dt(v) for v in q]
    zero = dt(0)
    iw = max(zero, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(zero, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    if not union > 0:
        return 0.0
    return float(inter / union)


def ref_nms(boxes, scores, thr):
    """Plain greedy NMS: highest score first (ties: input order); drop boxes with IoU > thr with a kept one."""
    dt = np.float64 if boxes.dtype == torch.float64 else np.float32
    b = boxes.tolist()
    s = scores.tolist()
    order = sorted(range(len(s)), key=lambda i: -s[i])  # Python's sort is stable
    kept = []
    for i in order:
        if all(ref_iou(b[j], b[i], dt) <= thr for j in kept):
            kept.append(i)
    return kept


def random_boxes(n, seed, dtype=torch.float32, spread=100.0, size=40.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * spread
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * size + 1
    boxes = torch.cat((xy, xy + wh), 1).to(dtype)
    scores = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    return boxes, scores


@pytest.mark.parametrize("n", [1, 2, 17, 300, 700])
@pytest.mark.parametrize("thr", [0.3, 0.7])
def test_nms_matches_greedy_reference(n, thr):
    boxes, scores = random_boxes(n, seed=n)
    keep = nms(boxes, scores, thr)
    assert keep.dtype == torch.int64
    assert keep.tolist() == ref_nms(boxes, scores, thr)


def test_nms_float64_and_small_blocks(monkeypatch):
    monkeypatch.setattr(nms_module, "_BLOCK", 5)
    for seed in range(4):
        boxes, scores = random_boxes(60, seed=seed, dtype=torch.float64, spread=60.0)
        assert nms(boxes, scores, 0.5).tolist() == ref_nms(boxes, scores, 0.5)


def test_nms_chain_across_blocks():
    # a chain of boxes, each overlapping its neighbour above the threshold but not the next one:
    # greedy keeps every other box, which needs the exact sequential resolution inside and across blocks.
    n = 600
    x = torch.arange(n, dtype=torch.float32) * 4.0
    boxes = torch.stack((x, torch.zeros(n), x + 10.0, torch.full((n,), 10.0)), 1)  # IoU(i, i+1) = 6/14
    scores = torch.linspace(1.0, 0.1, n)
    keep = nms(boxes, scores, 0.4)
    assert keep.tolist() == ref_nms(boxes, scores, 0.4)
    assert keep.tolist() == list(range(0, n, 2))


def test_nms_iou_exactly_at_threshold_is_kept():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # IoU = 1 / 2 exactly
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    above = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.01, 1.0]])  # IoU = 0.505
    assert nms(above, scores, 0.5).tolist() == [0]
    # a threshold that float32 cannot represent is still compared as the float64 number it is
    assert nms(boxes, scores, 0.49999999).tolist() == [0]


def test_nms_ties_keep_input_order():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
            [20.0, 20.0, 30.0, 30.0],
            [20.0, 20.0, 30.0, 30.0],
            [50.0, 50.0, 60.0, 60.0],
        ]
    )
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.9])
    assert nms(boxes, scores, 0.5).tolist() == [4, 0, 2]
    assert nms(boxes[[1, 0, 3, 2, 4]], scores, 0.5).tolist() == [4, 0, 2]
    assert nms(boxes, torch.zeros(5), 0.5).tolist() == [0, 2, 4]


def test_nms_empty_and_degenerate():
    keep = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.dtype == torch.int64 and keep.shape == (0,)
    # zero-area boxes never suppress (IoU 0)
    boxes = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert nms(boxes, torch.tensor([0.2, 0.1]), 0.5).tolist() == [0, 1]


def merged_per_class(boxes, scores, idxs, thr):
    kept = []
    for c in idxs.unique().tolist():
        members = torch.nonzero(idxs == c).flatten()
        kept += members[nms(boxes[members], scores[members], thr)].tolist()
    return sorted(kept, key=lambda i: (-scores[i].item(), i))


@pytest.mark.parametrize("n,classes", [(1, 1), (40, 3), (500, 5), (900, 40)])
def test_batched_nms_equals_per_class_nms(n, classes):
    boxes, scores = random_boxes(n, seed=100 + n)
    idxs = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(n))
    keep = batched_nms(boxes, scores, idxs, 0.5)
    assert keep.dtype == torch.int64
    assert keep.tolist() == merged_per_class(boxes, scores, idxs, 0.5)
    # and per class it is the plain greedy reference
    for c in range(classes):
        members = torch.nonzero(idxs == c).flatten()
        got = [i for i in keep.tolist() if idxs[i] == c]
        assert got == members[ref_nms(boxes[members], scores[members], 0.5)].tolist()


def test_batched_nms_small_blocks_and_large_coordinates(monkeypatch):
    monkeypatch.setattr(nms_module, "_BLOCK", 7)
    boxes, scores = random_boxes(200, seed=3, spread=50.0)
    boxes = boxes + 1.0e6  # a coordinate-offset trick would lose precision here
    idxs = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(3))
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == merged_per_class(boxes, scores, idxs, 0.5)


def test_batched_nms_ties_and_sorted_by_score():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4)
    scores = torch.tensor([0.5, 0.5, 0.7, 0.5])
    idxs = torch.tensor([1, 0, 1, 2])
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [2, 1, 3]


def test_batched_nms_empty():
    keep = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
    assert keep.dtype == torch.int64 and keep.shape == (0,)


def test_nms_negative_threshold_suppresses_everything_below_the_best():
    # IoU 0 > -0.1: every box is suppressed by the best one, as in the plain greedy definition
    boxes, scores = random_boxes(20, seed=5)
    assert nms(boxes, scores, -0.1).tolist() == ref_nms(boxes, scores, -0.1)
    assert nms(boxes, scores, -0.1).numel() == 1


def test_batched_nms_negative_threshold_and_sparse_group_ids():
    # groups are compared through dense ranks: huge or negative ids behave like small ones
    boxes, scores = random_boxes(60, seed=6)
    idxs = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(6))
    expected = batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(batched_nms(boxes, scores, idxs * 1_000_003 - 7, 0.5), expected)
    # threshold below 0: only the best box of each group survives, groups never suppress each other
    keep = batched_nms(boxes, scores, idxs, -0.1)
    assert keep.tolist() == merged_per_class(boxes, scores, idxs, -0.1)
    assert sorted(idxs[keep].tolist()) == sorted(idxs.unique().tolist())


def test_batched_nms_small_groups_path_equals_block_path(monkeypatch):
    # many small groups go through one batched [G, G_max, G_max] pass; it must agree with the block walk
    boxes, scores = random_boxes(700, seed=8, spread=80.0)
    idxs = torch.randint(0, 30, (700,), generator=torch.Generator().manual_seed(8))
    fast = batched_nms(boxes, scores, idxs, 0.4)
    assert fast.tolist() == merged_per_class(boxes, scores, idxs, 0.4)
    monkeypatch.setattr(nms_module, "_SMALL_GROUPS_BUDGET", 0)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.4), fast)
    # a group larger than a block always takes the block walk
    idxs[:300] = 0
    assert batched_nms(boxes, scores, idxs, 0.4).tolist() == merged_per_class(boxes, scores, idxs, 0.4)
