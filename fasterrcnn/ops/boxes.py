"""Elementary box geometry.

Shape legend: N, M boxes; boxes are ``Tensor[..., 4]`` in ``(x1, y1, x2, y2)`` absolute pixels.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_area", "box_iou", "clip_boxes_to_image", "remove_small_boxes"]


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box: ``Tensor[N, 4] -> Tensor[N]`` (``(x2 - x1) * (y2 - y1)``, not clamped)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise_inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of every pair: ``[N, 4], [M, 4] -> ([N, M], [N, M])``."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter, union


def _safe_div(inter: Tensor, union: Tensor) -> Tensor:
    """``inter / union`` with 0 where ``union <= 0`` (two zero-area boxes), gradient-safe."""
    positive = union > 0
    return torch.where(positive, inter / torch.where(positive, union, torch.ones_like(union)),
                       torch.zeros_like(inter))


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU: ``Tensor[N, 4], Tensor[M, 4] -> Tensor[N, M]``.

    ``inter / (area1 + area2 - inter)``; a pair whose union is 0 (two zero-area boxes) gets 0, never NaN.
    """
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    return _safe_div(inter, union)


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp ``x`` to ``[0, w]`` and ``y`` to ``[0, h]``: ``Tensor[..., 4] -> Tensor[..., 4]``; ``size = (h, w)``."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    # interleave back to x1, y1, x2, y2
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (int64) of the boxes with width >= ``min_size`` and height >= ``min_size``: ``[N, 4] -> [K]``."""
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    keep = (ws >= min_size) & (hs >= min_size)
    return torch.nonzero(keep).flatten()
