"""RoIPool (Girshick, Fast R-CNN): max over a quantised grid of bins.

Shape legend: N images, C channels, H x W feature map, K RoIs, oh x ow output bins, T pixels over all bins.

Semantics: RoI corners are quantised with C's ``round`` (half away from zero):
``start = round(x1 * s)``, ``end = round(x2 * s)``, ``roi = max(end - start + 1, 1)``, ``bin = roi / out``;
bin ``p`` covers ``[floor(p * bin), ceil((p + 1) * bin))`` shifted by ``start`` and clamped to the map.
An empty bin outputs 0, otherwise the max; the gradient of a bin goes to its argmax (the first maximum
in row-major order within the bin).

Implementation: every bin is a variable-size bag of flat pixel indices into the channels-last map
``F[N*H*W, C]`` (row-major inside the bag), reduced by the native ``embedding_bag`` kernel in max mode,
which keeps the first maximum, gives 0 for empty bags and returns the argmax rows. The backward
(``_MaxGather``) scatters each bin's gradient to its argmax with one ``index_add_``; measured several times faster
than ``F.embedding_bag``'s generic max-mode backward on the benchmark of ``benchmarks/bench_ops.py``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._utils import BoxesArg, empty_roi_output, roi_op_arguments

__all__ = ["roi_pool"]


class _MaxGather(torch.autograd.Function):
    """``out[b] = max over the rows index[offsets[b]:offsets[b+1]] of feats`` (0 for an empty bag).

    ``feats[P, C], index[T], offsets[B] -> [B, C]``; the gradient of ``out[b, c]`` goes to the first row
    holding the maximum of channel ``c``.
    """

    @staticmethod
    def forward(ctx, feats: Tensor, index: Tensor, offsets: Tensor) -> Tensor:
        # torch.embedding_bag is the native op behind F.embedding_bag (mode 2 = max); unlike the functional
        # wrapper it also returns the bag sizes and the argmax rows, which the backward needs.
        out, _, bag_size, argmax = torch.embedding_bag(feats, index, offsets, False, 2, False, None, False, None)
        ctx.save_for_backward(argmax, bag_size)
        ctx.feats_shape = feats.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        argmax, bag_size = ctx.saved_tensors
        # an empty bag's argmax is meaningless: send its (zero-output) gradient nowhere
        grad_out = torch.where((bag_size > 0)[:, None], grad_out, torch.zeros((), dtype=grad_out.dtype,
                                                                              device=grad_out.device))
        rows, channels = ctx.feats_shape
        # grad[argmax[b, c], c] += grad_out[b, c], as a 1-D index_add_ (measured faster than scatter_add_)
        flat = (argmax * channels + torch.arange(channels, device=argmax.device)).reshape(-1)
        grad = grad_out.new_zeros(rows * channels)
        grad.index_add_(0, flat, grad_out.reshape(-1))
        return grad.view(rows, channels), None, None


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


def roi_pool(input: Tensor, boxes: BoxesArg, output_size: int | Sequence[int],
             spatial_scale: float = 1.0) -> Tensor:
    """RoIPool: ``input[N, C, H, W]``, boxes ``Tensor[K, 5]`` or ``list[Tensor[L_i, 4]]`` -> ``Tensor[K, C, oh, ow]``.

    Differentiable w.r.t. ``input`` (gradient to each bin's argmax).
    """
    oh, ow, rois, cdtype = roi_op_arguments(input, boxes, output_size, "roi_pool")
    n, c, height, width = input.shape
    k = rois.shape[0]
    if k == 0 or n * height * width == 0:
        return empty_roi_output(input, k, oh, ow)

    # channels-last rows, one per pixel; contiguous, since the gather reads whole rows
    feats = input.permute(0, 2, 3, 1).contiguous().view(n * height * width, c)

    with torch.no_grad():
        start_w = _c_round(rois[:, 1] * spatial_scale).to(torch.int64)
        start_h = _c_round(rois[:, 2] * spatial_scale).to(torch.int64)
        end_w = _c_round(rois[:, 3] * spatial_scale).to(torch.int64)
        end_h = _c_round(rois[:, 4] * spatial_scale).to(torch.int64)
        roi_w = (end_w - start_w + 1).clamp(min=1).to(cdtype)
        roi_h = (end_h - start_h + 1).clamp(min=1).to(cdtype)
        h_lo, h_hi = _bin_edges(start_h, roi_h, oh, height)  # [K, oh]
        w_lo, w_hi = _bin_edges(start_w, roi_w, ow, width)  # [K, ow]
        # per bag (RoI, ph, pw), row-major over the bins: [K, oh, ow] -> [B]
        bag_h = (h_hi - h_lo).clamp(min=0)[:, :, None].expand(k, oh, ow).reshape(-1)
        bag_w = (w_hi - w_lo).clamp(min=0)[:, None, :].expand(k, oh, ow).reshape(-1)
        bag_y0 = h_lo[:, :, None].expand(k, oh, ow).reshape(-1)
        bag_x0 = w_lo[:, None, :].expand(k, oh, ow).reshape(-1)
        bag_base = (rois[:, 0].to(torch.int64) * (height * width))[:, None].expand(k, oh * ow).reshape(-1)
        sizes = bag_h * bag_w
        offsets = torch.cumsum(sizes, 0) - sizes
        total = int(sizes.sum())
        # one entry per pixel of every bin, row-major within the bin
        bag = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes,
                                      output_size=total)
        local = torch.arange(total, device=sizes.device) - offsets[bag]
        bw = bag_w[bag]
        index = bag_base[bag] + (bag_y0[bag] + local // bw) * width + bag_x0[bag] + local % bw

    out = _MaxGather.apply(feats, index, offsets)  # [K*oh*ow, C], empty bins -> 0
    return out.view(k, oh, ow, c).permute(0, 3, 1, 2).contiguous()
