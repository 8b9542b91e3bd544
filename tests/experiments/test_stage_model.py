"""StageModel: one part of a detector trained through the detector's public stages; what each part
computes is what the whole model computes."""

import copy

import torch

from fasterrcnn.experiments.stage_model import StageModel
from fasterrcnn.model.loss_names import DETECTOR_LOSSES, RPN_LOSSES

from ..model.helpers import sample_batch, tiny_model


def seeded(targets):
    return [{**t, "sample_seed": 11 + i} for i, t in enumerate(targets)]


def test_each_part_gets_the_whole_models_losses():
    torch.manual_seed(0)
    model = tiny_model().train()
    images, targets = sample_batch()
    targets = seeded(targets)
    whole = model(images, targets)

    rpn_step = StageModel(model, trains="rpn", frozen=("roi_heads",)).train()
    losses = rpn_step(images, targets)
    assert list(losses) == list(RPN_LOSSES + DETECTOR_LOSSES)
    assert all(torch.equal(losses[k], whole[k]) for k in RPN_LOSSES)
    assert all(float(losses[k]) == 0.0 for k in DETECTOR_LOSSES)
    assert not model.roi_heads.training and model.rpn.training

    detector_step = StageModel(model, trains="detector", frozen=("rpn",)).train()
    losses = detector_step(images, targets)  # the frozen RPN proposes with its training counts
    assert list(losses) == list(RPN_LOSSES + DETECTOR_LOSSES)
    assert all(torch.equal(losses[k], whole[k]) for k in DETECTOR_LOSSES)
    assert all(float(losses[k]) == 0.0 for k in RPN_LOSSES)
    assert not model.rpn.training and model.roi_heads.training


def test_detector_on_another_networks_proposals_detects_as_that_network_would():
    torch.manual_seed(0)
    model = tiny_model(box_score_thresh=0.02).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
    images, _ = sample_batch()
    staged = StageModel(model, trains="detector", frozen=("rpn",), proposal_model=copy.deepcopy(model)).eval()
    with torch.inference_mode():
        want, got = model(images), staged(images)
    assert sum(d["scores"].numel() for d in want) > 0
    for w, g in zip(want, got):
        assert all(torch.equal(w[k], g[k]) for k in w)
