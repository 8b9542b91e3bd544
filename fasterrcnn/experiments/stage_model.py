"""Training one part of a detector at a time, for the steps of alternating training.

``StageModel`` wraps a ``FasterRCNN`` for the trainer: in training it returns the usual four losses,
of which only the trained part's are computed (the others are constant zeros, so they add nothing);
its frozen parts stay in eval mode (BatchNorm statistics unchanged); and the detector can learn from
the proposals of another, frozen network. The wrapped model's outputs and state_dict are its own:
the wrapper adds nothing to a checkpoint.

    trains="rpn":       images -> transform -> backbone -> rpn                -> RPN losses
    trains="detector":  images -> transform -> backbone -> roi_heads          -> detector losses
                                          (proposal model: its backbone -> rpn -> proposals, no gradient)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..model.faster_rcnn import FasterRCNN
from ..model.loss_names import DETECTOR_LOSSES, RPN_LOSSES
from ..model.transform import ImageList

PARTS = ("backbone", "rpn", "roi_heads")
__all__ = ["DETECTOR_LOSSES", "PARTS", "RPN_LOSSES", "StageModel", "freeze", "propose"]


def freeze(module: nn.Module) -> None:
    """No gradients (so no optimizer state) for every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def propose(
    model: FasterRCNN,
    images: ImageList,
    features: OrderedDict[str, torch.Tensor],
    targets: list[dict] | None,
    *,
    training: bool,
) -> list[torch.Tensor]:
    """Proposals of a detector's (frozen) RPN (its ``propose`` stage) with the training-time
    (``training``) or test-time top-n counts.

    The RPN has no layer that behaves differently in training; its mode only picks the counts (and,
    given targets, computes losses, dropped here)."""
    was_training = model.rpn.training
    model.rpn.train(training)
    try:
        boxes, _ = model.propose(images, features, targets if training else None)
    finally:
        model.rpn.train(was_training)
    return boxes


class StageModel(nn.Module):
    """``model`` trained in one part: ``trains`` is "rpn" or "detector"; ``frozen`` names the parts
    (of ``PARTS``) kept in eval mode. ``proposal_model``: a frozen detector whose RPN proposes the
    RoIs the detector trains on (and is evaluated on); without one, the detector uses ``model``'s own
    RPN (frozen, in eval mode, proposing with its training counts while training). Everything runs
    through the detectors' public stages (``preprocess``, ``features``, ``propose``, ``detect``,
    ``postprocess``)."""

    def __init__(
        self, model: FasterRCNN, *, trains: str, frozen: tuple[str, ...], proposal_model: FasterRCNN | None = None
    ):
        super().__init__()
        if trains not in ("rpn", "detector"):
            raise ValueError(f"trains must be 'rpn' or 'detector', got {trains!r}")
        unknown = set(frozen) - set(PARTS)
        if unknown:
            raise ValueError(f"frozen names unknown parts {sorted(unknown)}; the parts are {PARTS}")
        self.model = model
        self.trains = trains
        self.frozen = tuple(frozen)
        self.proposal_model = proposal_model
        if proposal_model is not None:
            freeze(proposal_model)
        self.train(model.training)

    def train(self, mode: bool = True) -> StageModel:
        super().train(mode)
        for name in self.frozen:
            getattr(self.model, name).eval()
        if self.proposal_model is not None:
            self.proposal_model.eval()
        return self

    def _zeros(self, like: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {k: like.new_zeros(()) for k in names}

    def _proposals(self, images: ImageList, features, targets) -> list[torch.Tensor]:
        if self.proposal_model is None:
            return propose(self.model, images, features, targets, training=self.training)
        with torch.no_grad():
            source_features = self.proposal_model.features(images.tensors)
        return propose(self.proposal_model, images, source_features, targets, training=self.training)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        model = self.model
        if not self.training:
            if self.proposal_model is None:
                return model(images)
            image_list, _ = model.preprocess(images)
            original_sizes = [(im.shape[-2], im.shape[-1]) for im in images]
            features = model.features(image_list.tensors)
            detections, _ = model.detect(features, self._proposals(image_list, features, None), image_list.image_sizes)
            return model.postprocess(detections, image_list.image_sizes, original_sizes)

        image_list, targets = model.preprocess(images, targets)
        features = model.features(image_list.tensors)
        if self.trains == "rpn":
            _, losses = model.propose(image_list, features, targets)
            return {**losses, **self._zeros(losses[RPN_LOSSES[0]], DETECTOR_LOSSES)}
        proposals = self._proposals(image_list, features, targets)
        _, losses = model.detect(features, proposals, image_list.image_sizes, targets)
        return {**self._zeros(losses[DETECTOR_LOSSES[0]], RPN_LOSSES), **losses}
