"""Elementary box geometry.

Shape legend: N, M boxes; boxes are ``Tensor[..., 4]`` in ``(x1, y1, x2, y2)`` absolute pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_area", "box_iou", "clip_boxes_to_image", "min_size_mask", "remove_small_boxes"]


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
    return torch.where(positive, inter / torch.where(positive, union, torch.ones_like(union)), torch.zeros_like(inter))


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU: ``Tensor[N, 4], Tensor[M, 4] -> Tensor[N, M]``.

    ``inter / (area1 + area2 - inter)``; a pair whose union is 0 (two zero-area boxes) gets 0, never NaN.
    """
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    return _safe_div(inter, union)


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int] | Tensor) -> Tensor:
    """Clamp ``x`` to ``[0, w]`` and ``y`` to ``[0, h]``: ``Tensor[..., 4] -> Tensor[..., 4]``.

    ``size``: one image's ``(h, w)``, or a ``Tensor[..., 2]`` of ``(h, w)`` broadcasting against
    ``boxes[..., 0]``, so that a batch clips each box to its own image (``[B, 1, 2]`` for boxes
    ``[B, K, 4]``, ``[M, 2]`` for boxes ``[M, 4]``).
    """
    if isinstance(size, Tensor):
        hw = size.to(device=boxes.device, dtype=boxes.dtype)
        bound = torch.stack((hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]), dim=-1)
    else:
        height, width = size
        bound = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(boxes.clamp(min=0), bound)


def min_size_mask(boxes: Tensor, min_size: float) -> Tensor:
    """``bool[...]``: True where a box's width and height are both at least ``min_size`` (``[..., 4]``)."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (int64) of the boxes with width >= ``min_size`` and height >= ``min_size``: ``[N, 4] -> [K]``."""
    return torch.nonzero(min_size_mask(boxes, min_size)).flatten()
