"""RoIAlign (He et al., Mask R-CNN), as a weighted gather.

Shape legend: N images, C channels, H x W feature map, K RoIs, oh x ow output cells ("bins"),
gh x gw sampling points per bin, S = 4 * gh * gw bilinear taps per bin.

Semantics (those of Detectron2 / torchvision): ``offset = 0.5 if aligned else 0``;
``start = coord * spatial_scale - offset``; ``roi = end - start`` (at least 1 when not aligned);
``bin = roi / out``; grid = ``sampling_ratio`` if > 0 else ``ceil(roi / out)`` per axis; sample
``y = start_y + ph * bin_h + (iy + 0.5) * bin_h / gh``; bilinear interpolation where a sample outside
``[-1, H] x [-1, W]`` contributes 0, coordinates below 0 are taken as 0 and the last row/column is clamped;
each bin is the mean over its ``gh * gw`` samples (divided by ``max(gh * gw, 1)``).

Implementation: every output cell is a bag of S (flat index, weight) taps into the channels-last feature
map ``F[N*H*W, C]``, and ``F.embedding_bag(mode="sum", per_sample_weights=...)`` computes all bags in one
native, multi-threaded call. The backward is the transposed gather: the taps are sorted by pixel, and
a second ``embedding_bag`` over the output gradient with one bag per pixel sums, for every pixel, the
gradient of the cells that read it (no atomics, deterministic, and faster than the generic
``embedding_bag`` backward). The NCHW -> channels-last copy and its gradient go through a 2-D transpose per
image (``_utils.channels_last_rows``), faster than a generic permuted copy on a CPU.
``benchmarks/bench_ops.py`` compares all this with torchvision's RoIAlign.
The bilinear terms are separable, so they are computed per (RoI, row) and (RoI, column) and combined by
broadcasting. With an adaptive grid (``sampling_ratio <= 0``) the RoIs are grouped by grid size (rounded up
to two significant bits, padded taps get weight 0) and processed in chunks of bounded memory.

Precision: the coordinates and bilinear weights are computed in the input's dtype, but never below float32.
A bfloat16 or float16 map is read as it is (no float32 copy of the map): the weights are rounded to its dtype
and ``embedding_bag`` accumulates each bin in float32 and rounds it once (measured: bf16 output within
one rounding, 0.2%, of the float64 sum of the same bf16 inputs).

:func:`roi_align_rows` returns the result before its final transpose, ``[K, oh*ow, C]`` (bins, then
channels): :class:`~fasterrcnn.ops.poolers.MultiScaleRoIAlign` assembles the levels from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import BoxesArg, channels_last_rows, empty_roi_rows, pair, roi_op_arguments, rows_as_nchw

__all__ = ["RoIAlignGrid", "roi_align", "roi_align_grid", "roi_align_rows", "sample_coordinates"]

# at most this many (index, weight) taps are materialised per embedding_bag call
_TAP_BUDGET = 1 << 22


class _WeightedGather(torch.autograd.Function):
    """``out[b] = sum_s weight[b, s] * feats[index[b, s]]``: ``feats[P, C], index[B, S], weight[B, S] -> [B, C]``.

    Differentiable w.r.t. ``feats`` only (the taps come from the boxes, which get no gradient).
    """

    @staticmethod
    def forward(ctx, feats: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(index, weight)
        ctx.num_rows = feats.shape[0]
        return F.embedding_bag(index, feats, mode="sum", per_sample_weights=weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        index, weight = ctx.saved_tensors
        flat = index.reshape(-1)
        # transpose the (cell -> pixel) taps into (pixel -> cell) bags: sort the taps by pixel
        order = torch.sort(flat).indices
        counts = torch.bincount(flat, minlength=ctx.num_rows)
        offsets = torch.cumsum(counts, 0) - counts
        cell = torch.div(order, index.shape[1], rounding_mode="floor")
        grad_feats = F.embedding_bag(
            cell, grad_out.contiguous(), offsets, mode="sum", per_sample_weights=weight.reshape(-1)[order]
        )
        return grad_feats, None, None


class RoIAlignGrid(NamedTuple):
    """Where RoIAlign samples K RoIs, along each axis, in feature-map coordinates (cell c's centre at c)."""

    start_y: Tensor  # [K] the RoI's first edge
    start_x: Tensor
    bin_h: Tensor  # [K] the size of a bin
    bin_w: Tensor
    grid_h: Tensor  # int64 [K] samples per bin
    grid_w: Tensor


def roi_align_grid(
    rois: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
) -> RoIAlignGrid:
    """The bins and sample counts of RoIs ``[K, 5]`` (image index, x1, y1, x2, y2 in input pixels): the
    semantics of the module docstring, computed once here for the op and for whoever shows the grid."""
    oh, ow = output_size
    offset = 0.5 if aligned else 0.0
    start_x = rois[:, 1] * spatial_scale - offset
    start_y = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - start_x
    roi_h = rois[:, 4] * spatial_scale - offset - start_y
    if not aligned:  # legacy behaviour: force malformed RoIs to be 1x1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        gh = torch.full((rois.shape[0],), sampling_ratio, dtype=torch.int64, device=rois.device)
        gw = gh
    else:  # adaptive; an aligned RoI with negative size gets an empty grid (it outputs zeros)
        gh = torch.ceil(roi_h / oh).clamp(min=0, max=2**30).to(torch.int64)
        gw = torch.ceil(roi_w / ow).clamp(min=0, max=2**30).to(torch.int64)
    return RoIAlignGrid(start_y, start_x, roi_h / oh, roi_w / ow, gh, gw)


def sample_coordinates(start: Tensor, bin_size: Tensor, grid: Tensor, max_grid: int, n_out: int) -> Tensor:
    """Sample ``i`` of bin ``p`` along one axis, ``start + p * bin + (i + 0.5) * bin / g``:
    ``start, bin_size [K], grid int64 [K]`` -> ``[K, n_out, max_grid]`` (samples past a RoI's grid are junk)."""
    dtype = start.dtype
    p = torch.arange(n_out, dtype=dtype, device=start.device)
    i = torch.arange(max_grid, dtype=dtype, device=start.device)
    g = grid.clamp(min=1).to(dtype)
    # evaluated in the order of the reference formula
    return (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) + (i[None, None, :] + 0.5) * bin_size[
        :, None, None
    ] / g[:, None, None]


def _axis_taps(
    start: Tensor, bin_size: Tensor, grid: Tensor, max_grid: int, n_out: int, size: int
) -> tuple[Tensor, Tensor]:
    """Bilinear taps along one axis.

    ``start, bin_size: [K]`` (float), ``grid: [K]`` (int64, samples per bin for each RoI, <= ``max_grid``).
    Returns ``index: int64[K, n_out, max_grid, 2]`` (low, high) and ``weight: [K, n_out, max_grid, 2]``;
    samples beyond a RoI's own grid or outside ``[-1, size]`` get weight 0 and index 0.
    """
    y = sample_coordinates(start, bin_size, grid, max_grid, n_out)  # [K, n_out, G]
    i = torch.arange(max_grid, device=start.device)
    valid = (y >= -1.0) & (y <= size) & (i[None, None, :] < grid[:, None, None])
    y = y.clamp(min=0)
    low = y.floor()
    top = low >= size - 1
    low = torch.where(top, torch.full_like(low, size - 1), low)
    y = torch.where(top, low, y)
    high = torch.where(top, low, low + 1)
    frac = y - low
    weight = torch.stack((1 - frac, frac), dim=-1) * valid[..., None]
    index = torch.stack((low, high), dim=-1)
    index = torch.where(valid[..., None], index, torch.zeros_like(index)).to(torch.int64)
    return index, weight


def _bag_taps(
    rois: Tensor, oh: int, ow: int, grid: RoIAlignGrid, max_gh: int, max_gw: int, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """Taps for the RoIs ``rois[K, 5]`` and their ``grid``: ``(index int64[K*oh*ow, S], weight [K*oh*ow, S])``,
    ``S = 4*max_gh*max_gw``."""
    k = rois.shape[0]
    count = (grid.grid_h * grid.grid_w).clamp(min=1).to(rois.dtype)

    iy, wy = _axis_taps(grid.start_y, grid.bin_h, grid.grid_h, max_gh, oh, height)  # [K, oh, GH, 2]
    ix, wx = _axis_taps(grid.start_x, grid.bin_w, grid.grid_w, max_gw, ow, width)  # [K, ow, GW, 2]
    # fold the image offset into the row index and the 1/count into the row weight (small tensors),
    # so that the big broadcast below is one add and one multiply
    row = rois[:, 0].to(torch.int64)[:, None, None, None] * (height * width) + iy * width
    wy = wy / count[:, None, None, None]
    # broadcast to [K, oh, ow, GH * 2 (y sample, low/high), GW * 2 (x sample, low/high)]: the taps of a bin
    # in any order (a bag is a sum); 5-D, as a 7-D broadcast with inner sizes of 2 is much slower
    a, b = 2 * max_gh, 2 * max_gw
    index = row.reshape(k, oh, 1, a, 1) + ix.reshape(k, 1, ow, 1, b)
    weight = wy.reshape(k, oh, 1, a, 1) * wx.reshape(k, 1, ow, 1, b)
    return index.reshape(k * oh * ow, a * b), weight.reshape(k * oh * ow, a * b)


def _round_up_2bits(g: Tensor) -> Tensor:
    """Round positive ints up to at most two significant bits (1, 2, 3, 4, 6, 8, 12, 16, ...): padding <= 1.5x."""
    g = g.clamp(min=1)
    e = torch.floor(torch.log2(g.to(torch.float64))).to(torch.int64)  # g in [2^e, 2^(e+1))
    step = torch.where(e >= 1, 2 ** (e - 1), torch.ones_like(e))
    return (g + step - 1) // step * step


def roi_align(
    input: Tensor,
    boxes: BoxesArg,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign: ``input[N, C, H, W]``, boxes ``Tensor[K, 5]`` (batch_idx, x1, y1, x2, y2) or
    ``list[Tensor[L_i, 4]]`` (one per image, in input pixels) -> ``Tensor[K, C, oh, ow]``.

    Differentiable w.r.t. ``input`` (not the boxes). ``output_size`` is an int or ``(oh, ow)``.
    Runs on the caller's intra-op threads (``torch.set_num_threads``, the application's choice); it changes
    no thread setting itself.
    """
    oh, ow = pair(output_size, "roi_align")
    rows = roi_align_rows(input, boxes, (oh, ow), spatial_scale, sampling_ratio, aligned)
    return rows_as_nchw(rows, oh, ow).contiguous()


def roi_align_rows(
    input: Tensor,
    boxes: BoxesArg,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """:func:`roi_align` with its output as rows: ``Tensor[K, oh*ow, C]``, bin ``(ph, pw)`` at row
    ``ph * ow + pw``, in the input's dtype. ``_utils.rows_as_nchw(rows, oh, ow)`` is roi_align's result as a
    channels-last view, with no copy."""
    oh, ow, rois, cdtype = roi_op_arguments(input, boxes, output_size, "roi_align")
    n, c, height, width = input.shape
    k = rois.shape[0]
    if k == 0 or n * height * width == 0:
        return empty_roi_rows(input, k, oh, ow)

    # a floating-point map is read in its own dtype, half precision included (see Precision)
    x = input if input.is_floating_point() else input.to(cdtype)
    # channels-last rows, one per pixel; contiguous, since the gather reads whole rows
    feats = channels_last_rows(x)

    with torch.no_grad():
        grid = roi_align_grid(rois, (oh, ow), spatial_scale, sampling_ratio, aligned)
        if sampling_ratio > 0:
            groups: list[tuple[Tensor | None, int, int]] = [(None, sampling_ratio, sampling_ratio)]
        else:
            bh, bw = _round_up_2bits(grid.grid_h), _round_up_2bits(grid.grid_w)
            keys = torch.stack((bh, bw), dim=1)
            uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
            groups = [
                (torch.nonzero(inverse == j).flatten(), int(gy), int(gx)) for j, (gy, gx) in enumerate(uniq.tolist())
            ]

    outs: list[Tensor] = []
    order: list[Tensor] = []
    for members, max_gh, max_gw in groups:
        per_roi = oh * ow * 4 * max_gh * max_gw
        chunk = max(1, _TAP_BUDGET // per_roi)
        size = k if members is None else members.numel()
        for lo in range(0, size, chunk):
            hi = min(lo + chunk, size)
            sel = slice(lo, hi) if members is None else members[lo:hi]
            with torch.no_grad():
                index, weight = _bag_taps(
                    rois[sel], oh, ow, RoIAlignGrid(*(t[sel] for t in grid)), max_gh, max_gw, height, width
                )
            outs.append(_WeightedGather.apply(feats, index, weight.to(feats.dtype)))
            if members is not None:
                order.append(members[lo:hi])

    out = outs[0] if len(outs) == 1 else torch.cat(outs)  # [K*oh*ow, C] in group order
    out = out.view(k, oh * ow, c)
    if order:
        perm = torch.cat(order)
        if not torch.equal(perm, torch.arange(k, device=perm.device)):
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(k, device=perm.device)
            out = out.index_select(0, inv)
    return out if out.dtype == input.dtype else out.to(input.dtype)
