"""Generalized IoU (Rezatofighi et al., CVPR 2019) of paired boxes, and the GIoU loss; differentiable.

Shape legend: N pairs, ``boxes1, boxes2: Tensor[N, 4]`` xyxy (any leading shape ``[..., 4]`` works, elementwise),
``giou: Tensor[N]``.

``GIoU = IoU - (area(C) - union) / area(C)``, C the smallest box enclosing both; in ``[-1, 1]``, 1 for identical
boxes, negative for disjoint ones (the farther apart, the closer to -1). ``giou_loss = 1 - GIoU``, in ``[0, 2]``.

Degenerate boxes (``x2 < x1`` or ``y2 < y1``, as a network's early predictions can be) never give NaN or infinite
values or gradients: a box's width and height are clamped at 0, so a degenerate box has zero area, and its
intersection and IoU with anything are 0. C is still taken from the corners as given (the smallest x1, y1 and the
largest x2, y2 of the pair), so it contains the other box. A degenerate predicted box against a proper target thus
gets ``GIoU = -(area(C) - area(target)) / area(C)`` in ``[-1, 0]`` (loss in ``[1, 2]``); its gradient comes from C
alone: it pulls the corners that stick out of the target back towards it, and is zero when they do not (C is then
the target itself, and the loss 1). Union and ``area(C)`` are clamped at ``eps`` before they divide, so two
zero-area boxes give a finite GIoU as well (IoU 0); for boxes of area above ``eps`` the values are exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["generalized_box_iou_pairs", "giou_loss"]

_REDUCTIONS = ("none", "mean", "sum")


def generalized_box_iou_pairs(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU of each pair ``(boxes1[i], boxes2[i])``: ``Tensor[N, 4], Tensor[N, 4] -> Tensor[N]``.

    Differentiable in both arguments; degenerate boxes handled as the module docstring says. ``eps`` (> 0): the
    smallest union and enclosing area used as a divisor.
    """
    if boxes1.shape != boxes2.shape or boxes1.dim() < 1 or boxes1.shape[-1] != 4:
        raise ValueError(
            f"generalized_box_iou_pairs: expected two Tensor[N, 4] of the same shape, got shapes "
            f"{tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"generalized_box_iou_pairs eps: expected a number > 0, got {eps!r}")
    ax1, ay1, ax2, ay2 = boxes1.unbind(-1)
    bx1, by1, bx2, by2 = boxes2.unbind(-1)
    area1 = (ax2 - ax1).clamp(min=0) * (ay2 - ay1).clamp(min=0)
    area2 = (bx2 - bx1).clamp(min=0) * (by2 - by1).clamp(min=0)
    # the intersection's width is at most each box's width: clamped at 0 it is 0 for a degenerate box
    inter = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0) * (
        torch.minimum(ay2, by2) - torch.maximum(ay1, by1)
    ).clamp(min=0)
    union = area1 + area2 - inter  # >= 0: inter <= min(area1, area2)
    iou = inter / union.clamp(min=eps)
    # the enclosing box; clamped at 0 only matters when both boxes are degenerate
    area_c = (torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)).clamp(min=0) * (
        torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    ).clamp(min=0)
    return iou - (area_c - union) / area_c.clamp(min=eps)


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, *, reduction: str = "sum", eps: float = 1e-7) -> Tensor:
    """``1 - GIoU`` of each pair: ``Tensor[N, 4], Tensor[N, 4] -> Tensor[N]`` (``reduction="none"``) or a scalar.

    ``reduction``: ``"none"``, ``"mean"`` (0 for an empty input, not NaN) or ``"sum"`` (0 for an empty input). An
    empty input still gives a result connected to the inputs' graph (a ``grad_fn`` when they require grad).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"giou_loss reduction: expected one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}")
    loss = 1 - generalized_box_iou_pairs(pred_boxes, target_boxes, eps=eps)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / max(loss.numel(), 1) if reduction == "mean" else total
