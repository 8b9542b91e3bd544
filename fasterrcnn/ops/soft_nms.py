"""Soft-NMS (Bodla, Singh, Chellappa, Davis, ICCV 2017): decay the scores of overlapping boxes instead of removing them.

Shape legend: N boxes, ``boxes: Tensor[N, 4]`` xyxy, ``scores: Tensor[N]``, ``idxs: int64[N]`` (class / group id);
K kept boxes; G groups (rows), M the largest group's size (columns of the padded layout).

Algorithm (the paper's): repeatedly pick the remaining box with the highest current score (ties: the lowest input
index), keep it, and multiply the score of every other remaining box by a weight of its IoU with the picked box:

- ``"linear"``: ``w = 1 - iou`` where ``iou > iou_threshold``, else ``w = 1``;
- ``"gaussian"``: ``w = exp(-iou ** 2 / sigma)`` (``iou_threshold`` unused).

A box whose score falls below ``score_threshold`` (at the start, or after a decay) is dropped for good. Weights are
at most 1, so the picks come out by decayed score descending. Scores are expected non-negative (probabilities):
a negative score would grow towards 0 when decayed.

Vectorised as far as the algorithm allows: the loop over picks is inherent (which box comes next depends on the
decayed scores), but each pick decays all remaining boxes at once from one IoU row (no N x N matrix): O(N * K)
work, one host sync per pick (is anything left?). Batched Soft-NMS lays the groups out padded, one row each
(``[G, M]``), and picks in every group at once, so the loop runs as many times as the largest group keeps, not as
the total; finished groups leave the layout. The results are merged by decayed score at the end. Boxes of different
groups never meet: each row only sees its own group, so no coordinate offset (and no precision loss) is needed.

The IoU is :func:`~fasterrcnn.ops.box_iou`'s (same operations in the same order; a zero union gives 0), computed in
float32 at least, float64 when the boxes or the scores are float64. The outputs carry no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .nms import _threshold_in

__all__ = ["batched_soft_nms", "soft_nms"]

_METHODS = ("linear", "gaussian")


def _check(
    name: str, boxes: Tensor, scores: Tensor, idxs: Tensor | None, method: str, sigma: float, iou_threshold: float
) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} boxes: expected Tensor[N, 4], got shape {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"{name} scores: expected Tensor[{boxes.shape[0]}], got shape {tuple(scores.shape)}")
    if idxs is not None and idxs.shape != scores.shape:
        raise ValueError(f"{name} idxs: expected Tensor[{scores.shape[0]}], got shape {tuple(idxs.shape)}")
    if method not in _METHODS:
        raise ValueError(f"{name} method: expected one of {', '.join(map(repr, _METHODS))}, got {method!r}")
    if not sigma > 0:
        raise ValueError(f"{name} sigma: expected a number > 0, got {sigma!r}")
    if iou_threshold != iou_threshold:  # NaN
        raise ValueError(f"{name} iou_threshold: expected a number, got {iou_threshold!r}")


def _work_dtype(boxes: Tensor, scores: Tensor) -> torch.dtype:
    """float64 when the boxes or the scores are float64, else float32."""
    return torch.float64 if torch.float64 in (boxes.dtype, scores.dtype) else torch.float32


def _soft_nms_rows(
    cols: Tensor, cur: Tensor, method: str, sigma: float, iou_threshold: float, score_threshold: float
) -> tuple[Tensor, Tensor]:
    """Soft-NMS in every row of a padded layout at once.

    ``cols[5, G, M]``: rows x1, y1, x2, y2, area of each row's boxes; ``cur[G, M]``: their scores, ``-inf`` where
    there is no box (padding) or the box is dropped. -> ``(pos: int64[K], score[K])``: the picks as flat positions
    ``row * M + column`` in the input layout and their decayed scores, step-major (by pick within each row).
    """
    g, m = cur.shape
    device, dtype = cur.device, cur.dtype
    threshold = _threshold_in(dtype, iou_threshold)
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    cur = torch.where(cur >= score_threshold, cur, neg_inf)  # NaN and below-threshold scores: dropped
    rows = torch.arange(g, device=device)  # the input row of each row still in the layout
    picks_pos: list[Tensor] = []
    picks_score: list[Tensor] = []
    for _ in range(m):
        slot = torch.argmax(cur, dim=1, keepdim=True)  # [G, 1]; ties: the first (lowest input index)
        best = cur.gather(1, slot)  # [G, 1]
        alive = best[:, 0] > neg_inf
        n_alive = int(alive.sum())  # the one host sync per pick
        if n_alive == 0:
            break
        if n_alive < rows.shape[0]:  # rows with nothing left leave the layout
            live = alive.nonzero()[:, 0]
            rows, slot, best = rows[live], slot[live], best[live]
            cols, cur = cols.index_select(1, live), cur.index_select(0, live)
        picks_pos.append(rows * m + slot[:, 0])
        picks_score.append(best[:, 0])

        # one IoU row per group: the picked box against its group's boxes, as box_iou computes it
        px1, py1, px2, py2, parea = cols.gather(2, slot.expand(5, -1, -1)).unbind(0)  # [G, 1] each
        x1, y1, x2, y2, area = cols.unbind(0)  # [G, M] each
        w = torch.minimum(px2, x2).sub_(torch.maximum(px1, x1)).clamp_(min=0)
        h = torch.minimum(py2, y2).sub_(torch.maximum(py1, y1)).clamp_(min=0)
        inter = w.mul_(h)
        union = torch.add(parea, area).sub_(inter)
        iou = torch.where(union > 0, inter.div(union), torch.zeros_like(inter))

        if method == "linear":
            weight = torch.where(iou > threshold, 1 - iou, torch.ones_like(iou))
        else:
            weight = iou.mul_(iou).div_(-sigma).exp_()
        cur = cur.mul(weight)
        cur.scatter_(1, slot, float("-inf"))  # the picked box leaves (its own weight is irrelevant)
        # below the threshold: dropped; -inf * 0 (a dropped box at IoU 1, linear) is NaN: dropped as well
        cur = torch.where(cur >= score_threshold, cur, neg_inf)
    if not picks_pos:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=dtype, device=device)
    return torch.cat(picks_pos), torch.cat(picks_score)


def _columns(boxes: Tensor) -> Tensor:
    """``[..., 4] -> [5, ...]``: x1, y1, x2, y2, area (:func:`~fasterrcnn.ops.box_area`'s)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2, y2, (x2 - x1) * (y2 - y1)))


def _out_scores(new_scores: Tensor, scores: Tensor) -> Tensor:
    """The decayed scores in the input scores' dtype when that is a floating dtype (else the working dtype)."""
    return new_scores.to(scores.dtype) if scores.is_floating_point() else new_scores


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    *,
    method: str = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS: ``boxes[N, 4], scores[N] -> (keep: int64[K], new_scores[K])``.

    ``keep``: indices into the input in the order picked, which is by decayed score descending (ties: input order);
    ``new_scores``: the decayed scores of the kept boxes, same order (dtype of ``scores``). ``method``: ``"linear"``
    (``iou_threshold`` applies) or ``"gaussian"`` (``sigma`` applies, > 0). A box is kept while its decayed score
    is ``>= score_threshold``. See the module docstring for the algorithm.
    """
    _check("soft_nms", boxes, scores, None, method, sigma, iou_threshold)
    dtype = _work_dtype(boxes, scores)
    with torch.no_grad():
        cols = _columns(boxes.detach().to(dtype))[:, None, :]  # one group: [5, 1, N]
        pos, new_scores = _soft_nms_rows(
            cols, scores.detach().to(dtype)[None, :], method, float(sigma), float(iou_threshold), float(score_threshold)
        )
    return pos, _out_scores(new_scores, scores)


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    *,
    method: str = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS independently per value of ``idxs``: ``boxes[N, 4], scores[N], idxs[N] -> (keep[K], new_scores[K])``.

    Boxes of different groups never decay each other: the result equals :func:`soft_nms` on each group alone,
    merged by decayed score descending. Ties keep each group's pick order; across groups the earlier pick round comes
    first, then the lower group id. Arguments and outputs as in :func:`soft_nms`.
    """
    _check("batched_soft_nms", boxes, scores, idxs, method, sigma, iou_threshold)
    dtype = _work_dtype(boxes, scores)
    n = boxes.shape[0]
    device = boxes.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), _out_scores(
            torch.zeros(0, dtype=dtype, device=device), scores
        )
    with torch.no_grad():
        # group-major, input order inside a group (the stable sort): argmax ties then go to the lowest input index
        order = torch.sort(idxs, stable=True).indices
        _, counts = torch.unique_consecutive(idxs.index_select(0, order), return_counts=True)
        g, m = counts.numel(), int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        group_of = torch.repeat_interleave(torch.arange(g, device=device), counts, output_size=n)
        slot = group_of * m + (torch.arange(n, device=device) - starts.index_select(0, group_of))  # [N]
        # the padded layout [G, M]: padding boxes are all-zero with score -inf (never picked, never decayed back)
        padded_boxes = boxes.new_zeros((g * m, 4), dtype=dtype).index_copy_(
            0, slot, boxes.detach().to(dtype).index_select(0, order)
        )
        padded_scores = torch.full((g * m,), float("-inf"), dtype=dtype, device=device).index_copy_(
            0, slot, scores.detach().to(dtype).index_select(0, order)
        )
        input_of = torch.zeros(g * m, dtype=torch.int64, device=device).index_copy_(0, slot, order)
        pos, new_scores = _soft_nms_rows(
            _columns(padded_boxes).view(5, g, m),
            padded_scores.view(g, m),
            method,
            float(sigma),
            float(iou_threshold),
            float(score_threshold),
        )
        keep = input_of.index_select(0, pos)
        if g > 1:  # merge the groups: step-major picks, so the stable sort keeps each group's pick order on ties
            by_score = torch.sort(new_scores, descending=True, stable=True).indices
            keep, new_scores = keep.index_select(0, by_score), new_scores.index_select(0, by_score)
    return keep, _out_scores(new_scores, scores)
