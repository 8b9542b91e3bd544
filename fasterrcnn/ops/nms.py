"""Greedy non-maximum suppression, vectorised by blocks.

Shape legend: N boxes, ``boxes: Tensor[N, 4]`` xyxy, ``scores: Tensor[N]``, ``idxs: int64[N]`` (class / group id).

Algorithm: sort by score (stable, descending), then walk the sorted boxes in blocks of ``_BLOCK``. A block's
boxes are first suppressed by the boxes already kept in earlier blocks (one ``[kept, block]`` IoU matrix);
the greedy order inside the block is then resolved exactly by a fixed-point iteration
``keep = alive & ~any_{j<i}(S[j, i] & keep[j])``, started from ``keep = alive``. Position ``i`` of the block
is exact after ``i + 1`` iterations (it only depends on positions ``< i``), so the iteration converges to the
sequential greedy answer in at most ``block`` steps, and in a handful for real data. Memory is O(N * block).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .boxes import _pairwise_inter_union

__all__ = ["nms", "batched_nms"]

# 128: as fast as 256 single-threaded, and a block's [128, 128] matrices stay under ATen's parallel grain
# (32768 elements), so the many small per-block ops never pay an OpenMP wake-up (ms each on a busy machine)
_BLOCK = 128


def _threshold_in(dtype: torch.dtype, iou_threshold: float) -> Tensor:
    """The threshold as a ``dtype`` scalar ``t`` such that ``iou > t`` (in ``dtype``) equals ``iou > iou_threshold``
    compared in double precision, for every ``iou`` representable in ``dtype``: the threshold rounded down."""
    exact = torch.tensor(iou_threshold, dtype=torch.float64)
    t = exact.to(dtype)
    if t.to(torch.float64) > exact:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return t


def _suppresses(boxes1: Tensor, boxes2: Tensor, threshold: Tensor) -> Tensor:
    """``IoU > threshold`` for every pair, ``[N, 4], [M, 4] -> bool[N, M]``; a zero union never suppresses.

    Bit for bit the IoU of :func:`box_iou` (same operations in the same order), so IoU == threshold is kept;
    written with in-place ops to limit temporaries, since this is the hot loop of NMS.
    """
    if bool(threshold < 0):  # only then can a pair with IoU 0 (including a zero union) be suppressed
        inter, union = _pairwise_inter_union(boxes1, boxes2)
        positive = union > 0
        return torch.where(positive, inter / torch.where(positive, union, torch.ones_like(union)),
                           torch.zeros_like(inter)) > threshold
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    w = torch.minimum(boxes1[:, None, 2], boxes2[None, :, 2])
    w.sub_(torch.maximum(boxes1[:, None, 0], boxes2[None, :, 0])).clamp_(min=0)
    h = torch.minimum(boxes1[:, None, 3], boxes2[None, :, 3])
    h.sub_(torch.maximum(boxes1[:, None, 1], boxes2[None, :, 1])).clamp_(min=0)
    inter = w.mul_(h)
    union = torch.add(area1[:, None], area2[None, :]).sub_(inter)
    # a zero union has a zero intersection: 0 / 0 is NaN, and NaN > threshold is False, as it should be
    return inter.div_(union).gt(threshold)


def _greedy_sorted(boxes: Tensor, groups: Tensor | None, iou_threshold: float) -> Tensor:
    """Exact greedy NMS on boxes already in priority order: ``[N, 4] -> bool[N]`` (kept mask).

    With ``groups`` (``int64[N]``, sorted ascending, i.e. group-major order), only boxes of the same group
    suppress each other; earlier groups' kept boxes are then skipped when checking a block.
    """
    n = boxes.shape[0]
    threshold = _threshold_in(boxes.dtype, iou_threshold).to(boxes.device)
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    kept_boxes = boxes.new_zeros((0, 4))
    kept_groups = groups.new_zeros((0,)) if groups is not None else None
    for start in range(0, n, _BLOCK):
        end = min(start + _BLOCK, n)
        blk = boxes[start:end]
        blk_groups = groups[start:end] if groups is not None else None
        alive = torch.ones(end - start, dtype=torch.bool, device=boxes.device)

        # 1) suppression by the kept boxes of earlier blocks
        prev, prev_groups = kept_boxes, kept_groups
        if groups is not None and prev.shape[0] > 0:
            # group-major order: kept boxes of groups below this block's first group cannot matter, and
            # they form a prefix of the kept list.
            first = torch.searchsorted(prev_groups, blk_groups[:1]).item()
            prev, prev_groups = prev[first:], prev_groups[first:]
        if prev.shape[0] > 0:
            sup = _suppresses(prev, blk, threshold)  # [P, B]
            if groups is not None:
                sup &= prev_groups[:, None] == blk_groups[None, :]
            alive &= ~sup.any(dim=0)

        # 2) exact greedy inside the block by fixed-point iteration
        m = end - start
        sup = _suppresses(blk, blk, threshold)  # [B, B], sup[j, i]: j would suppress i
        sup &= torch.ones(m, m, dtype=torch.bool, device=boxes.device).triu(diagonal=1)  # only j < i
        if groups is not None:
            sup &= blk_groups[:, None] == blk_groups[None, :]
        sup &= alive[:, None]  # dead boxes never suppress
        if bool(sup.any()):
            supf = sup.to(torch.float32)  # matmul form of any_j(sup[j, i] & k[j]); counts <= block size are exact
            k = alive
            for _ in range(m + 1):
                new = alive & ~((k.to(torch.float32)[None, :] @ supf)[0] > 0)
                if torch.equal(new, k):
                    break
                k = new
        else:
            k = alive

        keep[start:end] = k
        if end < n:
            kept_boxes = torch.cat((kept_boxes, blk[k]))
            if groups is not None:
                kept_groups = torch.cat((kept_groups, blk_groups[k]))
    return keep


def _prepare(boxes: Tensor) -> Tensor:
    """Detached boxes in a dtype with enough precision for the IoU (float32 at least)."""
    boxes = boxes.detach()
    return boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.to(torch.float32)


def _check(boxes: Tensor, scores: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} boxes: expected Tensor[N, 4], got shape {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"{name} scores: expected Tensor[{boxes.shape[0]}], got shape {tuple(scores.shape)}")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: ``boxes[N, 4], scores[N] -> int64[K]`` indices kept, by descending score.

    Equal scores keep their input order (stable sort). A box is suppressed when its IoU with a kept,
    higher-ranked box is strictly greater than ``iou_threshold``.
    """
    _check(boxes, scores, "nms")
    order = torch.sort(scores, descending=True, stable=True).indices
    with torch.no_grad():
        keep = _greedy_sorted(_prepare(boxes)[order], None, float(iou_threshold))
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS independently per value of ``idxs``: ``boxes[N, 4], scores[N], idxs[N] -> int64[K]``.

    The result is sorted by descending score (ties: input order), and equals running :func:`nms` on each
    group and merging by score. Boxes of different groups never suppress each other (masked, no coordinate
    offsets, so large coordinates keep full precision).
    """
    _check(boxes, scores, "batched_nms")
    if idxs.shape != scores.shape:
        raise ValueError(f"batched_nms idxs: expected Tensor[{scores.shape[0]}], got shape {tuple(idxs.shape)}")
    by_score = torch.sort(scores, descending=True, stable=True).indices
    # group-major, score-descending inside a group (the stable sort keeps the score order)
    order = by_score[torch.sort(idxs[by_score], stable=True).indices]
    with torch.no_grad():
        keep = _greedy_sorted(_prepare(boxes)[order], idxs[order].to(torch.int64), float(iou_threshold))
    kept = torch.sort(order[keep]).values  # input order ...
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]  # ... then by score, stably
