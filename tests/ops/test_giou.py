"""Generalized IoU of paired boxes and the GIoU loss (fasterrcnn.ops.giou): values, gradients, degenerate boxes."""

import pytest
import torch

from fasterrcnn.ops.giou import generalized_box_iou_pairs, giou_loss


def ref_giou(p, q):
    """GIoU of two proper boxes, the paper's formula in Python floats (float64)."""
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    area_c = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
    return inter / union - (area_c - union) / area_c


def random_boxes(n, seed, dtype=torch.float64):
    """Proper boxes (width and height >= 1), overlapping, nested or disjoint."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 30
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 20 + 1
    return torch.cat((xy, xy + wh), 1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_reference(dtype):
    a, b = random_boxes(300, seed=0, dtype=dtype), random_boxes(300, seed=1, dtype=dtype)
    giou = generalized_box_iou_pairs(a, b)
    ref = torch.tensor([ref_giou(p, q) for p, q in zip(a.double().tolist(), b.double().tolist())], dtype=torch.float64)
    assert giou.shape == (300,) and giou.dtype == dtype
    assert torch.allclose(giou.double(), ref, atol=1e-6 if dtype == torch.float32 else 1e-12)
    assert (ref < 0).any() and (ref > 0).any()  # both kinds of pairs were drawn


def test_hand_computed():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 4, 4], [0, 0, 2, 2]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0, 2, 2], [2, 0, 3, 1], [1, 1, 3, 3], [1, 1, 3, 3]], dtype=torch.float64)
    expected = [
        1.0,  # identical: IoU 1, C is the box itself
        -1 / 3,  # disjoint: inter 0, union 1 + 1 = 2, C = [0, 0, 3, 1] of area 3 -> 0 - (3 - 2) / 3
        0.25,  # inside: inter 4, union 16, IoU 4 / 16, C = the outer box (16) -> 0.25 - 0
        1 / 7 - 2 / 9,  # partial: inter 1, union 4 + 4 - 1 = 7, C = [0, 0, 3, 3] of area 9 -> 1/7 - (9 - 7)/9
    ]
    assert torch.allclose(generalized_box_iou_pairs(a, b), torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(giou_loss(a, b, reduction="none"), 1 - torch.tensor(expected, dtype=torch.float64))
    # symmetric
    assert torch.allclose(generalized_box_iou_pairs(b, a), torch.tensor(expected, dtype=torch.float64))


def test_gradcheck_sum():
    pred = random_boxes(12, seed=2).requires_grad_(True)
    target = random_boxes(12, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, t: giou_loss(p, t, reduction="sum"), (pred, target))


def test_degenerate_predictions_give_finite_loss_and_gradients():
    pred = torch.tensor(
        [
            [3.0, 3, 1, 1],  # x2 < x1 and y2 < y1, corners inside the target
            [5.0, 0, 4, 2],  # x2 < x1 only, x1 outside the target
            [1.0, 1, 1, 1],  # a point
            [-5.0, 8, 9, -2],  # y2 < y1, far out
            [2.0, 2, 1, 1],  # degenerate against a degenerate target
        ],
        requires_grad=True,
    )
    target = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [3, 3, 1, 1]])
    loss = giou_loss(pred, target, reduction="none")
    assert torch.isfinite(loss).all() and (loss >= 1).all() and (loss <= 2).all()
    # row 0: zero area, C = [min(3, 0), min(3, 0), max(1, 2), max(1, 2)] = the target -> GIoU -(4 - 4) / 4 = 0
    # row 1: C = [0, 0, 4, 2] of area 8 -> GIoU -(8 - 4) / 8 = -0.5
    assert torch.allclose(loss[:2], torch.tensor([1.0, 1.5]))
    loss.sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    # row 1: x2 = 4 sticks out of the target (x2 = 2): moving it left shrinks C, so the loss grows with x2; row 0's
    # corners are inside the target: C is the target, no gradient (documented)
    assert pred.grad[1, 2] > 0 and torch.equal(pred.grad[0], torch.zeros(4))
    # float64 and tiny eps: still finite
    p64 = pred.detach().double().requires_grad_(True)
    giou_loss(p64, target.double(), reduction="mean", eps=1e-12).backward()
    assert p64.grad is not None and torch.isfinite(p64.grad).all()


def test_reductions():
    a, b = random_boxes(10, seed=4), random_boxes(10, seed=5)
    per_pair = giou_loss(a, b, reduction="none")
    assert per_pair.shape == (10,)
    assert torch.allclose(per_pair, 1 - generalized_box_iou_pairs(a, b))
    assert torch.allclose(giou_loss(a, b), per_pair.sum())  # "sum" is the default
    assert torch.allclose(giou_loss(a, b, reduction="mean"), per_pair.mean())


def test_empty_input():
    pred = torch.zeros(0, 4, requires_grad=True)
    target = torch.zeros(0, 4)
    assert generalized_box_iou_pairs(pred, target).shape == (0,)
    assert giou_loss(pred, target, reduction="none").shape == (0,)
    mean = giou_loss(pred, target, reduction="mean")
    assert mean.item() == 0.0 and mean.grad_fn is not None
    total = giou_loss(pred, target, reduction="sum")
    assert total.item() == 0.0 and total.grad_fn is not None
    total.backward()
    assert pred.grad is not None and pred.grad.shape == (0, 4)


def test_bad_arguments_raise():
    a = random_boxes(3, seed=0)
    with pytest.raises(ValueError, match="same shape"):
        generalized_box_iou_pairs(a, a[:2])
    with pytest.raises(ValueError, match="same shape"):
        generalized_box_iou_pairs(a[:, :3], a[:, :3])
    with pytest.raises(ValueError, match="reduction"):
        giou_loss(a, a, reduction="max")
    with pytest.raises(ValueError, match="eps"):
        giou_loss(a, a, eps=0.0)
