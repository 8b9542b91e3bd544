"""Encoding of boxes as regression deltas relative to reference boxes, and back.

Shape legend: N boxes, K classes (class-specific deltas come as ``Tensor[N, 4K]``).
Deltas are ``(dx, dy, dw, dh)``: ``dx = wx * (gx - px) / pw``, ``dw = ww * log(gw / pw)``, with centres
``cx = x1 + 0.5 * w`` and widths ``w = x2 - x1`` (no +1 convention).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BoxCoder", "decode_boxes"]


class BoxCoder:
    """Encode ``(reference, proposal)`` pairs to deltas and decode deltas against boxes.

    ``weights = (wx, wy, ww, wh)`` scale the deltas; ``bbox_xform_clip`` caps ``dw, dh`` (after dividing by
    the weights, before ``exp``) so a wild prediction cannot overflow.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights: expected 4 numbers (wx, wy, ww, wh), got {weights!r}")
        self.weights = (float(weights[0]), float(weights[1]), float(weights[2]), float(weights[3]))
        self.bbox_xform_clip = float(bbox_xform_clip)

    def encode(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Deltas that turn ``proposals`` into ``reference_boxes``: ``[N, 4], [N, 4] -> [N, 4]``."""
        dtype = reference_boxes.dtype
        proposals = proposals.to(dtype)
        wx, wy, ww, wh = self.weights

        pw = proposals[:, 2] - proposals[:, 0]
        ph = proposals[:, 3] - proposals[:, 1]
        px = proposals[:, 0] + 0.5 * pw
        py = proposals[:, 1] + 0.5 * ph

        gw = reference_boxes[:, 2] - reference_boxes[:, 0]
        gh = reference_boxes[:, 3] - reference_boxes[:, 1]
        gx = reference_boxes[:, 0] + 0.5 * gw
        gy = reference_boxes[:, 1] + 0.5 * gh

        dx = wx * (gx - px) / pw
        dy = wy * (gy - py) / ph
        dw = ww * torch.log(gw / pw)
        dh = wh * torch.log(gh / ph)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply ``deltas`` to ``boxes``: ``Tensor[N, 4K], Tensor[N, 4] -> Tensor[N, 4K]``.

        Each group of 4 deltas in a row decodes against that row's box; computed in the deltas' dtype.
        """
        if deltas.dim() != 2 or deltas.shape[1] % 4 != 0:
            raise ValueError(f"BoxCoder.decode deltas: expected Tensor[N, 4K], got shape {tuple(deltas.shape)}")
        if boxes.shape[0] != deltas.shape[0]:
            raise ValueError(f"BoxCoder.decode: {deltas.shape[0]} rows of deltas but {boxes.shape[0]} boxes")
        return decode_boxes(deltas, boxes, self.weights, self.bbox_xform_clip)


def decode_boxes(deltas: Tensor, boxes: Tensor, weights: tuple[float, float, float, float], clip: float) -> Tensor:
    """:meth:`BoxCoder.decode` without its checks, as a plain function (the exported graph and TorchScript
    call it): ``deltas[N, 4K]`` against ``boxes[N, 4]`` -> ``[N, 4K]``, in the deltas' dtype."""
    boxes = boxes.to(deltas.dtype)
    wx, wy, ww, wh = weights

    widths = (boxes[:, 2] - boxes[:, 0])[:, None]  # [N, 1], broadcast over the K groups
    heights = (boxes[:, 3] - boxes[:, 1])[:, None]
    ctr_x = boxes[:, 0][:, None] + 0.5 * widths
    ctr_y = boxes[:, 1][:, None] + 0.5 * heights

    d = deltas.reshape(deltas.shape[0], deltas.shape[1] // 4, 4)  # [N, K, 4]
    dx = d[..., 0] / wx
    dy = d[..., 1] / wy
    dw = (d[..., 2] / ww).clamp(max=clip)
    dh = (d[..., 3] / wh).clamp(max=clip)

    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights

    out = torch.stack(
        (
            pred_ctr_x - 0.5 * pred_w,
            pred_ctr_y - 0.5 * pred_h,
            pred_ctr_x + 0.5 * pred_w,
            pred_ctr_y + 0.5 * pred_h,
        ),
        dim=2,
    )  # [N, K, 4]
    return out.reshape(deltas.shape)
