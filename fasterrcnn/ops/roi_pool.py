"""RoIPool (Girshick, Fast R-CNN): max over a quantised grid of bins.

Shape legend: N images, C channels, H x W feature map, K RoIs, oh x ow output bins, B = K * oh * ow bins,
L = W - w + 1 positions of a window of width w in a row.

Semantics: RoI corners are quantised with C's ``round`` (half away from zero):
``start = round(x1 * s)``, ``end = round(x2 * s)``, ``roi = max(end - start + 1, 1)``, ``bin = roi / out``;
bin ``p`` covers ``[floor(p * bin), ceil((p + 1) * bin))`` shifted by ``start`` and clamped to the map.
An empty bin outputs 0, otherwise the max; the gradient of a bin goes to its argmax (the first maximum
in row-major order within the bin).

Implementation: separable, so that work is shared between the (heavily overlapping) RoIs. A bin of
``h x w`` pixels is the max over its ``h`` rows of the row-window max of width ``w``. The row-window maxima
``M_w[n, y, x] = max(F[n, y, x : x + w])`` are built for w = 1, 2, ... up to the widest bin, each from the
previous one with one elementwise op over the channels-last map (``M_w = max(M_{w-1}[x], F[x + w - 1])``);
the bins of width ``w`` then gather their ``h`` rows of ``M_w`` and reduce them with ``amax``. Reading every
pixel of every bin (a gather per pixel, or torchvision's per-RoI loop) costs ~30 reads per map pixel for
1000 RPN-like RoIs on a stride-4 map; this costs a dozen streaming passes over the map plus ``h`` reads per
bin. The argmax, only when a gradient is needed, is carried along: ``O_w`` (a small-int map) is the offset of
the first maximum inside each window (strictly greater wins, so ties keep the left one), and the first
maximal row is found by weights ``h - r`` on the rows equal to the max, so the pair is the first maximum in
row-major order. The backward scatters each bin's gradient to its argmax with one ``index_add_``, in bin
order (for every input element, the order of the reference loops, so the sums match bit for bit).
Forward and backward run on the caller's intra-op threads; the op changes no thread setting itself.
NaN inputs are not given any particular meaning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._utils import BoxesArg, empty_roi_rows, pair, roi_op_arguments, rows_as_nchw, to_channels_first, to_channels_last

__all__ = ["roi_pool", "roi_pool_bins", "roi_pool_rows"]

# at most this many gathered values per chunk of bins (bounded temporaries, reused by the allocator)
_GATHER_BUDGET = 1 << 22


def _offset_dtype(max_width: int) -> torch.dtype:
    """Smallest integer dtype holding an offset ``< max_width`` inside a window (a quarter of int64's memory)."""
    return torch.uint8 if max_width <= 256 else torch.int16 if max_width <= 32768 else torch.int32


def _pool_bins(
    feats: Tensor, bin_img: Tensor, y0: Tensor, x0: Tensor, bh: Tensor, bw: Tensor, with_argmax: bool
) -> tuple[Tensor, Tensor | None]:
    """Max over each bin: ``feats[N, H, W, C]`` (contiguous), per bin ``bin_img, y0, x0, bh, bw: int64[B]``
    (image, top-left corner, size) -> ``(out[B, C], argmax[B, C] or None)``. The argmax (int32 when it fits) is
    the flat index into ``feats`` (``pixel * C + channel``) of the first maximum in row-major order; an empty
    bin gives 0, and argmax ``N*H*W*C + channel``, a spare row that the backward drops.

    Few, large ops: bins are grouped by width and by height rounded up to a power of two (a bin's rows are
    padded by repeating its last row, which changes neither the max nor the first argmax), and each chunk's
    results are written straight to their bins (``index_copy_``). The big temporaries are allocated once and
    updated in place (``out=``): on a CPU a fresh 70 MB tensor per step costs more in page faults than the
    step itself.
    """
    n, height, width, c = feats.shape
    device = feats.device
    nbins = bh.shape[0]
    out = feats.new_empty((nbins, c))
    index_dtype = torch.int32 if (n * height * width + 1) * c < 2**31 else torch.int64
    channel = torch.arange(c, device=device)
    argmax = torch.empty((nbins, c), dtype=index_dtype, device=device) if with_argmax else None
    nonempty = (bh > 0) & (bw > 0)
    empty = torch.nonzero(~nonempty).flatten()
    out.index_fill_(0, empty, 0)
    if argmax is not None:
        argmax.index_copy_(0, empty, (n * height * width * c + channel).to(index_dtype).expand(empty.numel(), c))
    if empty.numel() == nbins:
        return out, argmax

    # non-empty bins sorted by (width, height bucket, height): widths ascending, so the window maps are built
    # once, in order; a group's last bin has its largest height
    sel = torch.nonzero(nonempty).flatten()
    h, w = bh[sel], bw[sel]
    max_h, max_w = int(h.max()), int(w.max())
    bucket = torch.ceil(torch.log2(h.to(torch.float64))).to(torch.int64)  # 1 -> 0, 2 -> 1, 3..4 -> 2, ...
    group_key = w * 64 + bucket
    order = torch.sort(group_key * (max_h + 1) + h).indices
    sel, h, group_key = sel[order], h[order], group_key[order]
    _, counts = torch.unique_consecutive(group_key, return_counts=True)
    ends = torch.cumsum(counts, 0)
    groups = list(zip(w[order][ends - 1].tolist(), h[ends - 1].tolist(), (ends - counts).tolist(), counts.tolist()))
    row0 = (bin_img[sel] * height + y0[sel]) * width + x0[sel]  # [S] window at each bin's top-left pixel

    # M_w (the row-window maxima) lives in the first W - w + 1 columns of `win`, updated in place; rows of
    # `win` and of `off` keep the full width W, so pixel (n, y, x) is row (n * H + y) * W + x of either.
    win = feats if max_w == 1 else torch.empty_like(feats)
    off = torch.zeros(feats.shape, dtype=_offset_dtype(max_w), device=device) if with_argmax and max_w > 1 else None
    step_off = torch.empty_like(off) if off is not None else None  # 1 where F[x + cur] wins, then cur there
    budget = max(_GATHER_BUDGET, max_h * c)
    gather_buf = feats.new_empty(budget)
    cur = 1
    for w, hpad, lo, count in groups:
        while cur < w:  # M_{cur+1}[x] = max(M_cur[x], F[x + cur]); a later pixel wins only if strictly greater
            length = width - cur
            prev = (feats if cur == 1 else win)[:, :, :length]
            nxt = feats[:, :, cur:]
            if off is not None and step_off is not None:
                # off = cur where F[x + cur] > M_cur[x], else unchanged: as cur exceeds every offset so far,
                # that is max(off, cur * (F[x + cur] > M_cur[x])), elementwise ops that vectorise
                # (masked_fill_ / where on these maps are much slower)
                won = step_off[:, :, :length]
                if won.dtype == torch.uint8:  # compare straight into the offset buffer, through a bool view
                    torch.gt(nxt, prev, out=won.view(torch.bool))
                else:
                    won.copy_(torch.gt(nxt, prev))
                won.mul_(cur)
                torch.maximum(off[:, :, :length], won, out=off[:, :, :length])
            torch.maximum(prev, nxt, out=win[:, :, :length])
            cur += 1
        rows_flat = (feats if cur == 1 else win).view(-1, c)
        pad = torch.arange(hpad, device=device)
        # first-row weights hpad - r (uint8 while hpad < 256): the largest weight among the maximal rows is the first
        first_weight = (hpad - pad).to(torch.uint8 if hpad < 256 else torch.int64)[None, :, None]
        chunk = max(1, budget // (hpad * c))
        for a in range(lo, lo + count, chunk):
            b = min(a + chunk, lo + count)
            g = b - a
            # row r of a bin of height h reads row min(r, h - 1): padding repeats the bin's last row
            rows = row0[a:b, None] + torch.minimum(pad, h[a:b, None] - 1) * width  # [g, hpad]
            vals = torch.index_select(rows_flat, 0, rows.view(-1), out=gather_buf[: g * hpad * c].view(-1, c))
            vals = vals.view(g, hpad, c)
            best = torch.amax(vals, dim=1)
            out.index_copy_(0, sel[a:b], best)
            if argmax is None:
                continue
            # the first maximal row, by weights (max(dim) with indices is much slower than amax here)
            hit = torch.eq(vals, best[:, None, :])
            if first_weight.dtype == torch.uint8:
                hit = hit.view(torch.uint8)
            dy = (hpad - (hit * first_weight).amax(dim=1).to(torch.int64)).clamp_(max=hpad - 1)  # [g, C]
            pixel = dy.mul_(width).add_(row0[a:b, None])  # the row of the window holding the maximum ...
            if off is not None:
                pixel.add_(off.view(-1, c).gather(0, pixel))  # ... plus the offset of the maximum inside it
            argmax.index_copy_(0, sel[a:b], pixel.mul_(c).add_(channel).to(index_dtype))
    return out, argmax


class _RoIPoolFunction(torch.autograd.Function):
    """``input[N, C, H, W]`` and the bins (see :func:`_pool_bins`) -> ``out[B, C]``, 0 for empty bins."""

    @staticmethod
    def forward(ctx, input: Tensor, bin_img: Tensor, y0: Tensor, x0: Tensor, bh: Tensor, bw: Tensor) -> Tensor:
        with_argmax = ctx.needs_input_grad[0]
        out, argmax = _pool_bins(to_channels_last(input), bin_img, y0, x0, bh, bw, with_argmax)
        if with_argmax:
            ctx.save_for_backward(argmax)
            ctx.input_shape = input.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (argmax,) = ctx.saved_tensors
        n, c, height, width = ctx.input_shape
        # grad[argmax[b, c]] += grad_out[b, c] in bin order (for each destination, the order of the
        # reference loops), channels-last, as one 1-D index_add_; empty bins write to the spare row N*H*W
        grad = grad_out.new_zeros((n * height * width + 1) * c)
        grad.index_add_(0, argmax.view(-1), grad_out.contiguous().view(-1))
        grad = to_channels_first(grad[:-c].view(n, height, width, c))
        return grad, None, None, None, None, None


def _c_round(v: Tensor) -> Tensor:
    """C's ``round``: halves go away from zero (``torch.round`` rounds them to even)."""
    t = torch.trunc(v)
    frac = v - t  # exact
    return t + torch.where(frac.abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def _bin_edges(start: Tensor, roi: Tensor, n_out: int, size: int) -> tuple[Tensor, Tensor]:
    """Bin edges along one axis: ``start, roi: [K]`` -> ``(lo, hi): int64[K, n_out]`` clamped to ``[0, size]``."""
    bin_size = roi / n_out
    p = torch.arange(n_out, dtype=roi.dtype, device=roi.device)
    lo = torch.floor(p[None, :] * bin_size[:, None]).to(torch.int64) + start[:, None]
    hi = torch.ceil((p[None, :] + 1) * bin_size[:, None]).to(torch.int64) + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


def roi_pool_bins(
    rois: Tensor, output_size: tuple[int, int], spatial_scale: float, height: int, width: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cells each bin of RoIs ``[K, 5]`` (image index, x1, y1, x2, y2 in input pixels, float32 at least)
    covers on a ``height x width`` map: ``(h_lo, h_hi) int64[K, oh]``, ``(w_lo, w_hi) int64[K, ow]``, bin
    ``(p, q)`` = rows ``[h_lo[p], h_hi[p])`` x columns ``[w_lo[q], w_hi[q])`` (empty when lo == hi)."""
    oh, ow = output_size
    start_w = _c_round(rois[:, 1] * spatial_scale).to(torch.int64)
    start_h = _c_round(rois[:, 2] * spatial_scale).to(torch.int64)
    end_w = _c_round(rois[:, 3] * spatial_scale).to(torch.int64)
    end_h = _c_round(rois[:, 4] * spatial_scale).to(torch.int64)
    roi_w = (end_w - start_w + 1).clamp(min=1).to(rois.dtype)
    roi_h = (end_h - start_h + 1).clamp(min=1).to(rois.dtype)
    h_lo, h_hi = _bin_edges(start_h, roi_h, oh, height)  # [K, oh]
    w_lo, w_hi = _bin_edges(start_w, roi_w, ow, width)  # [K, ow]
    return h_lo, h_hi, w_lo, w_hi


def roi_pool(input: Tensor, boxes: BoxesArg, output_size: int | Sequence[int], spatial_scale: float = 1.0) -> Tensor:
    """RoIPool: ``input[N, C, H, W]``, boxes ``Tensor[K, 5]`` or ``list[Tensor[L_i, 4]]`` -> ``Tensor[K, C, oh, ow]``.

    Differentiable w.r.t. ``input`` (gradient to each bin's argmax).
    """
    oh, ow = pair(output_size, "roi_pool")
    rows = roi_pool_rows(input, boxes, (oh, ow), spatial_scale)
    return rows_as_nchw(rows, oh, ow).contiguous()


def roi_pool_rows(
    input: Tensor, boxes: BoxesArg, output_size: int | Sequence[int], spatial_scale: float = 1.0
) -> Tensor:
    """:func:`roi_pool` with its output as rows, ``Tensor[K, oh*ow, C]``
    (as :func:`~fasterrcnn.ops.roi_align.roi_align_rows`)."""
    oh, ow, rois, _ = roi_op_arguments(input, boxes, output_size, "roi_pool")
    n, c, height, width = input.shape
    k = rois.shape[0]
    if k == 0 or n * height * width == 0:
        return empty_roi_rows(input, k, oh, ow)

    with torch.no_grad():
        h_lo, h_hi, w_lo, w_hi = roi_pool_bins(rois, (oh, ow), spatial_scale, height, width)
        # per bin (RoI, ph, pw), row-major over the bins: [K, oh, ow] -> [B]
        bh = (h_hi - h_lo).clamp(min=0)[:, :, None].expand(k, oh, ow).reshape(-1)
        bw = (w_hi - w_lo).clamp(min=0)[:, None, :].expand(k, oh, ow).reshape(-1)
        y0 = h_lo[:, :, None].expand(k, oh, ow).reshape(-1)
        x0 = w_lo[:, None, :].expand(k, oh, ow).reshape(-1)
        img = rois[:, 0].to(torch.int64)[:, None].expand(k, oh * ow).reshape(-1)

    out = _RoIPoolFunction.apply(input, img, y0, x0, bh, bw)  # [K*oh*ow, C], empty bins -> 0
    return out.view(k, oh * ow, c)
