"""The validation loss: the four training losses of the paper on the validation set, without learning from it.

    losses = validation_loss(model, data.val, batch_size=4, device=device)   # {"loss_objectness": ..., "loss": ...}

The model computes its losses as in training (anchors and RoIs sampled against the ground truth), with three
differences that make the number a measurement rather than a training step: no gradient; BatchNorm in eval mode
(its running statistics used, and left as they were); the images at the test size (the transform in eval mode:
no multi-scale draw), and the sampling seeded from each image's id, so two evaluations of the same weights give
the same loss and a change over a run is the model's, not the draw's. Crowd regions are left out of the targets,
as training leaves them out. A rising validation loss under a falling training loss is over-fitting.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import make_data_loader
from ..model.loss_names import LOSS_NAMES
from .evaluator import autocast

VAL_SEED = 0x5EED  # the sampling seed of every image, with its id


def loss_eval_mode(model: nn.Module) -> None:
    """``model.train()`` for the losses, with BatchNorm and the resizing transform in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    transform = getattr(model, "transform", None)
    if isinstance(transform, nn.Module):
        transform.eval()


def _without_crowd(target: dict) -> dict:
    crowd = target.get("iscrowd")
    if crowd is None or not bool(crowd.any()):
        return target
    keep = crowd == 0
    return {k: (v[keep] if k in ("boxes", "labels", "area", "iscrowd", "difficult") else v) for k, v in target.items()}


@torch.no_grad()
def batch_losses(model: nn.Module, images: list[torch.Tensor], targets: list[dict], *, device, amp: str = "none"):
    """One batch's losses as floats, the model as ``loss_eval_mode`` leaves it (the caller sets and restores it)."""
    images = [im.to(device) for im in images]
    targets = [
        {
            **{k: v.to(device) for k, v in _without_crowd(t).items()},
            "sample_seed": VAL_SEED * 1_000_003 + int(t["image_id"]),
        }
        for t in targets
    ]
    with autocast(torch.device(device), amp):
        losses = model(images, targets)
    return {k: float(v) for k, v in losses.items()}


def validation_loss(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp: str = "none",
    weights: dict[str, float] | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Each loss the model returns, averaged over the images of ``dataset`` (each batch's loss weighted by its
    images), and ``"loss"``: their sum weighted by ``weights`` (the solver's loss weights; 1 by default), the
    total training logs. The model's mode is restored afterwards."""
    was_training = model.training
    modes = {m: m.training for m in model.modules()}
    loader = make_data_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, aspect_grouping=False)
    sums: dict[str, float] = {}
    count = 0
    try:
        loss_eval_mode(model)
        for images, targets in loader:
            for k, v in batch_losses(model, images, targets, device=device, amp=amp).items():
                sums[k] = sums.get(k, 0.0) + v * len(images)
            count += len(images)
    finally:
        model.train(was_training)
        for module, mode in modes.items():
            module.training = mode
    means = {k: v / max(count, 1) for k, v in sums.items()}
    weights = weights or {}
    means["loss"] = sum(weights.get(k, 1.0) * means[k] for k in LOSS_NAMES if k in means)
    return means
