"""Private helpers shared by the RoI operators."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

BoxesArg = Union[Tensor, Sequence[Tensor]]


def convert_boxes_to_rois(boxes: BoxesArg, dtype: torch.dtype, device: torch.device, name: str) -> Tensor:
    """``Tensor[K, 5]`` (batch_idx, x1, y1, x2, y2) or ``list[Tensor[L_i, 4]]`` -> ``Tensor[K, 5]`` in ``dtype``."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"{name} boxes: expected Tensor[K, 5] (batch_idx, x1, y1, x2, y2) or a list of "
                             f"Tensor[L_i, 4], got a tensor of shape {tuple(boxes.shape)}")
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
    if isinstance(output_size, int):
        out = (output_size, output_size)
    else:
        out = tuple(int(v) for v in output_size)
    if len(out) != 2 or out[0] <= 0 or out[1] <= 0:
        raise ValueError(f"{name} output_size: expected a positive int or (h, w), got {output_size!r}")
    return out  # type: ignore[return-value]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Coordinates are computed in the input's dtype, but never below float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def roi_op_arguments(input: Tensor, boxes: BoxesArg, output_size: int | Sequence[int],
                     name: str) -> tuple[int, int, Tensor, torch.dtype]:
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
        raise ValueError(f"{name} boxes: batch indices must be integers in [0, {n}), got {batch.unique().tolist()[:10]}")
    return oh, ow, rois, cdtype


def empty_roi_output(input: Tensor, k: int, oh: int, ow: int) -> Tensor:
    """``Tensor[K, C, oh, ow]`` of zeros for no RoI (or an empty map), connected to the graph (a sum over
    no element), so a loss over no RoI still backpropagates."""
    return input.new_zeros((k, input.shape[1], oh, ow)) + input.reshape(-1)[:0].sum()
