"""The box regression loss of both stages, per sampled box: smooth L1 on the deltas (the paper's), L1 on the
deltas, or GIoU on the decoded boxes (Rezatofighi et al. 2019; mmdetection's GIoU recipe for Faster R-CNN).

Shape legend: M sampled boxes; ``pred_deltas, target_deltas: Tensor[M, 4]`` encoded against ``references:
Tensor[M, 4]`` xyxy (the anchors of the RPN, the proposals of the second stage) by ``box_coder``; the result is
``Tensor[M]``, one loss per box, which the caller masks and normalises as before (the sum over the foreground
divided by the sample's size).

Smooth L1 uses beta 1/9, as torchvision and the paper's successors do. GIoU decodes both the prediction and the
target against the same reference box (decoding the target gives the matched ground-truth box back) and costs
``1 - GIoU`` in ``[0, 2]``; its scale differs from smooth L1's, so a GIoU run usually raises the loss weight
(mmdetection uses 10 for the second stage: ``solver.loss_weights.loss_box_reg=10``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import BoxCoder, giou_loss

BOX_LOSSES = ("smooth_l1", "l1", "giou")


def check_box_loss(name: str, value: str) -> str:
    if value not in BOX_LOSSES:
        raise ValueError(f"{name} must be one of {', '.join(BOX_LOSSES)}, got {value!r}")
    return value


def box_regression_loss(
    kind: str, pred_deltas: torch.Tensor, target_deltas: torch.Tensor, references: torch.Tensor, box_coder: BoxCoder
) -> torch.Tensor:
    """One loss per row (see the module docstring); float32 whatever the deltas' dtype."""
    pred, target = pred_deltas.float(), target_deltas.float()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=1 / 9, reduction="none").sum(dim=1)
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none").sum(dim=1)
    if kind == "giou":
        refs = references.float()
        return giou_loss(box_coder.decode(pred, refs), box_coder.decode(target, refs), reduction="none")
    raise ValueError(f"unknown box loss {kind!r}; one of {', '.join(BOX_LOSSES)}")
