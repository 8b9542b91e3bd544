"""Greedy non-maximum suppression, vectorised by tiles small enough to stay single-threaded.

Shape legend: N boxes, ``boxes: Tensor[N, 4]`` xyxy, ``scores: Tensor[N]``, ``idxs: int64[N]`` (class / group id);
B boxes per block, T kept boxes per tile.

Algorithm: sort by score (stable, descending), then walk the sorted boxes in blocks of ``_BLOCK``. A block's
boxes are first suppressed by the boxes already kept in earlier blocks, tile by tile (``[T, B]`` IoU
matrices); the greedy order inside the block is then resolved exactly by a fixed-point iteration
``keep = alive & ~any_{j<i}(S[j, i] & keep[j])``, started from ``keep = alive``. Position ``i`` of the block
is exact after ``i + 1`` iterations (it only depends on positions ``< i``), so the iteration converges to the
sequential greedy answer in at most ``B`` steps, and in a handful for real data. Memory is O(N + T * B): no
N x N matrix is ever built, and work is O(N * kept), the same as the sequential greedy loop.

Why tiles of fewer than 32768 pairs: every op then stays under ATen's parallel grain and runs on the
calling thread. NMS is hundreds of small ops; each parallel one would wake the OpenMP team, which costs
a scheduler time slice when the other cores are busy, more than a second thread gains on a tile. For the
same reason the masks are float 0./1. tensors (bool ops on a tile are slower), a block is staged right
after the kept boxes so that its own [B, B] matrix comes out of the last tile, and batched NMS separates
groups inside the IoU arithmetic instead of with a mask.
On a GPU the same code runs with one host sync per block (the kept count) and per fixed-point step.

Batched NMS over many small groups (every group at most a block, as in per-class post-processing) skips the
walk: all groups are padded to the largest one and resolved together, one [G, G_max, G_max] matrix and a
batched fixed point (:func:`_greedy_small_groups`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["batched_nms", "nms"]

_BLOCK = 128
# kept boxes per tile: _TILE * _BLOCK = 31744 pairs, under ATen's grain of 32768 elements (see the docstring)
_TILE = 248
# largest [G, G_max, G_max] suppression tensor of the small-groups path of batched NMS
_SMALL_GROUPS_BUDGET = 1 << 21


def _threshold_in(dtype: torch.dtype, iou_threshold: float) -> float:
    """The threshold as a value ``t`` exactly representable in ``dtype`` such that ``iou > t`` (in ``dtype``) equals
    ``iou > iou_threshold`` compared in double precision, for every ``iou`` representable in ``dtype``: the
    threshold rounded down. (A Python float compared with a float32 tensor is first rounded to nearest.)"""
    exact = torch.tensor(iou_threshold, dtype=torch.float64)
    t = exact.to(dtype)
    if t.to(torch.float64) > exact:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return float(t)


def _columns(boxes: Tensor, groups: Tensor | None = None) -> Tensor:
    """``[N, 4] -> [5, N]``: rows x1, y1, x2, y2, area, each contiguous (cheap tile slices); with ``groups``
    a sixth row, the group's dense rank times a power of two wider than every box (see :func:`_suppresses`)."""
    x1, y1, x2, y2 = boxes.t().unbind(0)
    rows = [x1, y1, x2, y2, (x2 - x1) * (y2 - y1)]
    if groups is not None and boxes.shape[0] > 0:
        # dense ranks of the (sorted) group ids times a power of two wider than every box: exact products
        rank = torch.cumsum(torch.diff(groups, prepend=groups[:1]) != 0, 0)
        widest = float(torch.maximum(x2 - x1, y2 - y1).abs().max())
        stride = 2.0 ** math.ceil(math.log2(2 * widest + 2)) if math.isfinite(widest) else 1.0
        rows.append(rank.to(boxes.dtype) * stride)
    elif groups is not None:
        rows.append(x1)
    return torch.stack(rows)


def _suppresses(a: Tensor, b: Tensor, threshold: float, grouped: bool) -> Tensor:
    """``IoU > threshold`` for every pair of boxes ``a[R, T, 1], b[R, 1, B]`` -> ``[T, B]`` of 0. / 1. (a float mask).

    Rows R: x1, y1, x2, y2, area, and with ``grouped`` a sixth, the group's rank times a power of two wider
    than any box: boxes of different groups then get a negative overlap width, so a zero intersection (with
    ``threshold >= 0``; masked explicitly otherwise), and boxes of one group subtract an exact 0.
    The IoU of :func:`~fasterrcnn.ops.box_iou` bit for bit (same operations in the same order), so IoU equal
    to the threshold is kept. Everything stays in floating point: on these tiles any op that reads or writes a
    bool tensor is several times slower than a float one, and the float mask reduces with ``amax``. The
    operands come pre-shaped so that one ``unbind`` each gives the broadcastable rows (Python-side views cost
    about as much as an op on a tile).
    """
    ax1, ay1, ax2, ay2, aarea, *ag = a.unbind(0)  # [T, 1] each
    bx1, by1, bx2, by2, barea, *bg = b.unbind(0)  # [1, B] each
    w = torch.minimum(ax2, bx2)
    w.sub_(torch.maximum(ax1, bx1))
    if grouped:
        w.sub_(torch.sub(ag[0], bg[0]).abs_())
    w.clamp_(min=0)
    h = torch.minimum(ay2, by2)
    h.sub_(torch.maximum(ay1, by1)).clamp_(min=0)
    inter = w.mul_(h)
    union = torch.add(aarea, barea).sub_(inter)
    if threshold < 0:  # only then can a pair with IoU 0 (including a zero union) be suppressed: 0/0 must be 0
        positive = union > 0
        iou = torch.where(
            positive, inter / torch.where(positive, union, torch.ones_like(union)), torch.zeros_like(inter)
        )
        sup = iou.gt_(threshold)
        if grouped:  # IoU 0 > threshold: mask the pairs of different groups explicitly
            sup.mul_(ag[0] == bg[0])
        return sup
    # a zero union has a zero intersection: 0 / 0 is NaN, and NaN > threshold is False, as it should be
    return inter.div_(union).gt_(threshold)


def _greedy_fixed_point(sup: Tensor, alive: Tensor) -> Tensor:
    """The greedy order inside blocks: ``keep[i] = alive[i] and no kept j < i has sup[j, i]``, solved by the
    fixed-point iteration of the module docstring. One block: ``sup[B, B]`` (float 0./1., only pairs j < i
    set), ``alive[B]`` (float 0./1.) -> ``keep[B]``; G groups at once: ``sup[G, B, B]``, ``alive[G, 1, B]``
    -> ``keep[G, 1, B]``. ``k @ sup`` counts, for every i, the kept boxes suppressing it (exact in float:
    counts <= B); one block uses ``mv`` on the transpose, faster there than a [1, B] matmul."""
    sup_t = sup.t() if sup.dim() == 2 else None
    k = alive
    for _ in range(sup.shape[-1] + 1):
        counts = torch.mv(sup_t, k) if sup_t is not None else torch.bmm(k, sup)
        new = alive * (counts == 0)
        if torch.equal(new, k):
            break
        k = new
    return k


def _greedy_sorted(cols: Tensor, grouped: bool, iou_threshold: float) -> Tensor:
    """Exact greedy NMS on boxes already in priority order: columns ``[5 or 6, N] -> bool[N]`` (kept mask).

    With ``grouped`` (``cols`` then has the sixth row of :func:`_suppresses`, ascending: group-major order),
    only boxes of the same group suppress each other; earlier groups' kept boxes are then skipped.
    """
    n = cols.shape[1]
    device, dtype = cols.device, cols.dtype
    threshold = _threshold_in(dtype, iou_threshold)
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    kept = torch.empty_like(cols)  # columns of the kept boxes, in order; the first n_kept are valid
    kept_t = kept[:, :, None]  # [R, N, 1]: tile operands
    cols_b = cols[:, None, :]  # [R, 1, N]: block operands
    n_kept = 0
    # pairs j < i of a block, as a float mask (an elementwise compare: triu runs multi-threaded even on 128 x 128)
    ar = torch.arange(_BLOCK, device=device)
    upper = (ar[:, None] < ar[None, :]).to(dtype)
    for start in range(0, n, _BLOCK):
        end = min(start + _BLOCK, n)
        m = end - start
        blk = cols_b[:, :, start:end]
        # stage the block right after the kept boxes: the last tile then also holds the block's own rows,
        # so the [B, B] matrix of step 2 comes out of the same ops as the tail of step 1
        kept[:, n_kept : n_kept + m] = cols[:, start:end]

        # 1) suppression by the kept boxes of earlier blocks, one tile at a time
        first = 0
        if grouped and n_kept > 0:
            # group-major order: kept boxes of groups below this block's first group cannot matter, and
            # they form a prefix of the kept list.
            first = int(torch.searchsorted(kept[5, :n_kept], cols[5, start : start + 1]))
        last = max(first, n_kept + m - max(_TILE, m))  # the last tile: rows [last, n_kept + m)
        dead = None  # [B], 1. where suppressed
        for lo in range(first, last, _TILE):
            hi = min(lo + _TILE, last)
            hit = _suppresses(kept_t[:, lo:hi], blk, threshold, grouped).amax(dim=0)  # [T, B] -> [B]
            dead = hit if dead is None else torch.maximum(dead, hit, out=dead)
        sup = _suppresses(kept_t[:, last : n_kept + m], blk, threshold, grouped)  # kept rows, then the block's
        if n_kept > last:
            hit = sup[: n_kept - last].amax(dim=0)
            dead = hit if dead is None else torch.maximum(dead, hit, out=dead)

        # 2) exact greedy inside the block by fixed-point iteration
        sup = sup[n_kept - last :]  # [B, B], sup[j, i]: j would suppress i
        sup.mul_(upper if m == _BLOCK else upper[:m, :m])  # only j < i
        if dead is None:
            alive = torch.ones(m, dtype=dtype, device=device)  # [B] 1. / 0.
        else:
            alive = 1 - dead
            sup.mul_(alive[:, None])  # dead boxes never suppress
        k = _greedy_fixed_point(sup, alive) > 0
        keep[start:end] = k
        if end < n:
            new_cols = cols[:, start:end][:, k]
            c = new_cols.shape[1]
            kept[:, n_kept : n_kept + c] = new_cols
            n_kept += c
    return keep


def _greedy_small_groups(cols: Tensor, groups: Tensor, iou_threshold: float) -> Tensor | None:
    """Exact greedy NMS of many small groups at once: columns ``[5+, N]`` and ``groups: int64[N]`` in group-major
    priority order -> ``bool[N]`` kept mask, or ``None`` when the groups are too large for this path.

    Every group is padded to the largest group's size G_max and gets its own [G_max, G_max] matrix in one
    batched op ([G, G_max, G_max]); the fixed point of :func:`_greedy_sorted` then runs on all groups at once
    (``bmm``). Padding boxes are all-zero (zero area: they never suppress, since ``threshold >= 0`` here).
    For detection post-processing (tens of classes with tens of boxes each) this is a few dozen ops instead
    of dozens of ops per block.
    """
    n = cols.shape[1]
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    g, g_max = counts.numel(), int(counts.max())
    if iou_threshold < 0 or g_max > _BLOCK or g * g_max * g_max > _SMALL_GROUPS_BUDGET:
        return None
    device, dtype = cols.device, cols.dtype
    starts = torch.cumsum(counts, 0) - counts
    group_of = torch.repeat_interleave(torch.arange(g, device=device), counts, output_size=n)
    slot = group_of * g_max + (torch.arange(n, device=device) - starts.index_select(0, group_of))  # [N]
    padded = cols.new_zeros((5, g * g_max)).index_copy_(1, slot, cols[:5])
    sup = _suppresses(
        padded.view(5, g, g_max, 1), padded.view(5, g, 1, g_max), _threshold_in(dtype, iou_threshold), False
    )  # [G, G_max, G_max]
    ar = torch.arange(g_max, device=device)
    sup.mul_((ar[:, None] < ar[None, :]).to(dtype))  # only j < i
    alive = cols.new_zeros(g * g_max).index_fill_(0, slot, 1).view(g, 1, g_max)
    return _greedy_fixed_point(sup, alive).view(-1).index_select(0, slot) > 0


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
        keep = _greedy_sorted(_columns(_prepare(boxes).index_select(0, order)), False, float(iou_threshold))
    return order.masked_select(keep)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS independently per value of ``idxs``: ``boxes[N, 4], scores[N], idxs[N] -> int64[K]``.

    The result is sorted by descending score (ties: input order), and equals running :func:`nms` on each
    group and merging by score. Boxes of different groups never suppress each other: a group term enters the
    overlap width (see :func:`_suppresses`); the coordinates themselves are not offset per group, so large
    coordinates keep full precision.
    """
    _check(boxes, scores, "batched_nms")
    if idxs.shape != scores.shape:
        raise ValueError(f"batched_nms idxs: expected Tensor[{scores.shape[0]}], got shape {tuple(idxs.shape)}")
    by_score = torch.sort(scores, descending=True, stable=True).indices
    # group-major, score-descending inside a group (the stable sort keeps the score order)
    perm = torch.sort(idxs.index_select(0, by_score), stable=True).indices
    order = by_score.index_select(0, perm)
    with torch.no_grad():
        groups = idxs.index_select(0, order).to(torch.int64)
        cols = _columns(_prepare(boxes).index_select(0, order), groups)
        keep = None
        if groups.numel():
            keep = _greedy_small_groups(cols, groups, float(iou_threshold))
        if keep is None:
            keep = _greedy_sorted(cols, True, float(iou_threshold))
    # back to score order (ties: input order), which is by_score's: no second sort
    keep_by_score = torch.zeros_like(keep).index_copy_(0, perm, keep)
    return by_score.masked_select(keep_by_score)
