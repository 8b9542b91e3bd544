"""The box regression loss option of both stages (`rpn_box_loss`, `box_loss`: smooth_l1 | l1 | giou): GIoU on
decoded boxes against a plain float64 reference written here, gradients through it, and a short training run
with each option from the config. The default (smooth L1) is unchanged: the parity suites hold it."""

import math

import pytest
import torch

from fasterrcnn.model.box_loss import box_regression_loss
from fasterrcnn.model.roi_heads import fastrcnn_loss
from fasterrcnn.ops import BoxCoder

from .helpers import sample_batch, tiny_model


def _decode(delta, box, weights):
    """One box, in float64, by the paper's parametrisation (the box coder's clip not reached here)."""
    wx, wy, ww, wh = weights
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = box[0] + 0.5 * w, box[1] + 0.5 * h
    pcx, pcy = delta[0] / wx * w + cx, delta[1] / wy * h + cy
    pw, ph = math.exp(delta[2] / ww) * w, math.exp(delta[3] / wh) * h
    return [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph]


def _giou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def test_second_stage_giou_loss_equals_a_plain_reference_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    num_rois, num_classes = 12, 4
    xy = torch.rand(num_rois, 2, generator=g) * 100
    proposals = torch.cat([xy, xy + 10 + torch.rand(num_rois, 2, generator=g) * 60], dim=1)
    labels = torch.tensor([1, 2, 0, 3, 0, 1, 2, 3, 0, 0, 1, 2])
    targets = torch.randn(num_rois, 4, generator=g) * 0.5
    deltas = (torch.randn(num_rois, 4 * num_classes, generator=g) * 0.5).requires_grad_()
    logits = torch.randn(num_rois, num_classes, generator=g)
    weights = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(weights)
    losses = fastrcnn_loss(logits, deltas, labels, targets, box_loss="giou", proposals=proposals, box_coder=coder)
    expected = 0.0
    for r in range(num_rois):
        k = int(labels[r])
        if k == 0:
            continue
        own = deltas[r, 4 * k : 4 * k + 4].double().tolist()
        box = proposals[r].double().tolist()
        expected += 1 - _giou(_decode(own, box, weights), _decode(targets[r].double().tolist(), box, weights))
    assert float(losses["loss_box_reg"].detach()) == pytest.approx(expected / num_rois, rel=1e-5)
    losses["loss_box_reg"].backward()
    grad = deltas.grad.reshape(num_rois, num_classes, 4)
    assert torch.isfinite(grad).all()
    for r in range(num_rois):  # only each foreground RoI's own class gets a gradient
        others = [k for k in range(num_classes) if k != int(labels[r]) or labels[r] == 0]
        assert torch.all(grad[r, others] == 0)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "giou"])
def test_each_kind_is_zero_for_a_perfect_prediction(kind):
    refs = torch.tensor([[10.0, 10.0, 50.0, 70.0], [0.0, 5.0, 30.0, 20.0]])
    target = torch.tensor([[0.1, -0.2, 0.3, 0.05], [0.0, 0.0, -0.1, 0.2]])
    loss = box_regression_loss(kind, target.clone(), target, refs, BoxCoder((1.0, 1.0, 1.0, 1.0)))
    torch.testing.assert_close(loss, torch.zeros(2), atol=1e-6, rtol=0)
    worse = box_regression_loss(kind, target + 0.3, target, refs, BoxCoder((1.0, 1.0, 1.0, 1.0)))
    assert (worse > 0.01).all()


@pytest.mark.parametrize("rpn_kind, box_kind", [("giou", "giou"), ("l1", "l1"), ("giou", "smooth_l1")])
def test_a_training_step_with_each_loss_gives_finite_losses_and_gradients(rpn_kind, box_kind):
    torch.manual_seed(0)
    model = tiny_model(num_classes=4, rpn_box_loss=rpn_kind, box_loss=box_kind).train()
    images, targets = sample_batch()
    losses = model(images, targets)
    total = sum(losses.values())
    total.backward()
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["loss_box_reg"].detach()) > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_giou_trains_and_evaluates_from_the_config(tmp_path):
    from fasterrcnn.engine.trainer import train

    from ..engine.helpers import tiny_config

    cfg = tiny_config(
        tmp_path,
        tmp_path / "synth",
        "train.iterations=2",
        "model.options.box_loss=giou",
        "model.options.rpn_box_loss=giou",
        "solver.loss_weights.loss_box_reg=10",
    )
    result = train(cfg, show_progress=False)
    assert result.evaluation is not None and 0.0 <= result.evaluation.coco.AP <= 1.0


def test_unknown_box_losses_are_refused(tmp_path):
    from fasterrcnn.engine.config import ConfigError

    from ..engine.helpers import tiny_config

    with pytest.raises(ValueError, match="box_loss must be one of smooth_l1, l1, giou, got 'iou'"):
        tiny_model(num_classes=4, box_loss="iou")
    with pytest.raises(ConfigError, match="model.options.rpn_box_loss"):
        tiny_config(tmp_path, tmp_path / "synth", "model.options.rpn_box_loss=diou")
