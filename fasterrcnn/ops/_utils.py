"""Private helpers shared by the RoI operators."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

BoxesArg = Tensor | Sequence[Tensor]


def convert_boxes_to_rois(boxes: BoxesArg, dtype: torch.dtype, device: torch.device, name: str) -> Tensor:
    """``Tensor[K, 5]`` (batch_idx, x1, y1, x2, y2) or ``list[Tensor[L_i, 4]]`` -> ``Tensor[K, 5]`` in ``dtype``."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"{name} boxes: expected Tensor[K, 5] (batch_idx, x1, y1, x2, y2) or a list of "
                f"Tensor[L_i, 4], got a tensor of shape {tuple(boxes.shape)}"
            )
        return boxes.detach().to(device=device, dtype=dtype)
    parts = []
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"{name} boxes[{i}]: expected Tensor[L, 4], got shape {tuple(b.shape)}")
        b = b.detach().to(device=device, dtype=dtype)
        parts.append(torch.cat((torch.full_like(b[:, :1], i), b), dim=1))
    if not parts:
        return torch.zeros((0, 5), dtype=dtype, device=device)
    return torch.cat(parts, dim=0)


def pair(output_size: int | Sequence[int], name: str) -> tuple[int, int]:
    """``7 -> (7, 7)``, ``(7, 5) -> (7, 5)``."""
    out = (output_size, output_size) if isinstance(output_size, int) else tuple(int(v) for v in output_size)
    if len(out) != 2 or out[0] <= 0 or out[1] <= 0:
        raise ValueError(f"{name} output_size: expected a positive int or (h, w), got {output_size!r}")
    return out[0], out[1]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Coordinates are computed in the input's dtype, but never below float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def roi_op_arguments(
    input: Tensor, boxes: BoxesArg, output_size: int | Sequence[int], name: str
) -> tuple[int, int, Tensor, torch.dtype]:
    """What every RoI operator checks first (shapes, output size, batch indices in ``[0, N)``):
    ``-> (oh, ow, rois[K, 5] in the compute dtype, compute dtype)``."""
    if input.dim() != 4:
        raise ValueError(f"{name} input: expected Tensor[N, C, H, W], got shape {tuple(input.shape)}")
    oh, ow = pair(output_size, name)
    cdtype = compute_dtype(input.dtype)
    rois = convert_boxes_to_rois(boxes, cdtype, input.device, name)
    n = input.shape[0]
    batch = rois[:, 0]
    if bool(((batch < 0) | (batch >= n) | (batch != batch.floor())).any()):
        raise ValueError(
            f"{name} boxes: batch indices must be integers in [0, {n}), got {batch.unique().tolist()[:10]}"
        )
    return oh, ow, rois, cdtype


def empty_roi_rows(input: Tensor, k: int, oh: int, ow: int) -> Tensor:
    """Rows ``Tensor[K, oh*ow, C]`` of zeros for no RoI (or an empty map), connected to the graph (a sum over
    no element), so a loss over no RoI still backpropagates."""
    return input.new_zeros((k, oh * ow, input.shape[1])) + input.reshape(-1)[:0].sum()


def rows_as_nchw(rows: Tensor, oh: int, ow: int) -> Tensor:
    """RoI rows ``[K, oh*ow, C]`` as ``[K, C, oh, ow]``: a view with channels-last strides (no copy)."""
    return rows.view(rows.shape[0], oh, ow, rows.shape[2]).permute(0, 3, 1, 2)


def to_channels_last(x: Tensor) -> Tensor:
    """``[N, C, H, W] -> [N, H, W, C]`` contiguous (no copy when ``x`` is channels-last already). A contiguous
    input is transposed per image as a 2-D ``[C, H*W] -> [H*W, C]`` copy, which ATen does blockwise, with far
    fewer cache misses on a CPU than the generic 4-D permuted copy (measured: docs/design-decisions.md)."""
    n, c, height, width = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    if nhwc.is_contiguous() or not x.is_contiguous():
        return nhwc.contiguous()
    out = x.new_empty((n, height, width, c))
    for i in range(n):
        out[i].view(height * width, c).copy_(x[i].view(c, height * width).t())
    return out


def to_channels_first(x: Tensor) -> Tensor:
    """The inverse of :func:`to_channels_last`: ``[N, H, W, C]`` -> ``[N, C, H, W]`` contiguous."""
    n, height, width, c = x.shape
    if not x.is_contiguous():
        return x.permute(0, 3, 1, 2).contiguous()
    out = x.new_empty((n, c, height, width))
    for i in range(n):
        out[i].view(c, height * width).copy_(x[i].view(height * width, c).t())
    return out


class _ChannelsLast(torch.autograd.Function):
    """:func:`to_channels_last` whose backward returns a contiguous ``[N, C, H, W]`` gradient by the same fast
    transpose (a permuted gradient would be copied into the input's layout by autograd's generic, slow path)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return to_channels_last(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return to_channels_first(grad.contiguous())


def channels_last_rows(x: Tensor) -> Tensor:
    """``[N, C, H, W] -> [N*H*W, C]``: one contiguous row per pixel, differentiable."""
    n, c, height, width = x.shape
    if x.permute(0, 2, 3, 1).is_contiguous() or not (x.requires_grad and x.is_contiguous()):
        rows = to_channels_last(x) if not x.requires_grad else x.permute(0, 2, 3, 1).contiguous()
    else:
        rows = _ChannelsLast.apply(x)
    return rows.view(n * height * width, c)
