import math

import pytest
import torch

from .helpers import sample_batch, tiny_model

LOSS_KEYS = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}


def test_training_step_gives_finite_losses_and_a_gradient_on_every_trainable_parameter():
    model = tiny_model().train()
    images, targets = sample_batch()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS
    for k, v in losses.items():
        assert v.dim() == 0 and math.isfinite(float(v)), k
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))  # from scratch: everything trains
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []


def test_loss_decreases_when_overfitting_one_batch():
    model = tiny_model().train()
    images, targets = sample_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = None
    for _ in range(12):
        loss = sum(model(images, targets).values())
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first


def test_image_without_objects_gives_zero_box_losses():
    model = tiny_model().train()
    images = [torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    assert float(losses["loss_rpn_box_reg"]) == 0.0 and float(losses["loss_box_reg"]) == 0.0
    assert float(losses["loss_objectness"]) > 0 and float(losses["loss_classifier"]) > 0
    sum(losses.values()).backward()


def test_mixed_batch_with_an_empty_image():
    model = tiny_model().train()
    images, targets = sample_batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, targets)
    assert all(math.isfinite(float(v)) for v in losses.values())


def test_eval_output_format_and_boxes_in_original_pixels():
    model = tiny_model(box_score_thresh=0.0).eval()
    images, _ = sample_batch()
    with torch.no_grad():
        out = model(images)
    assert len(out) == len(images)
    for det, im in zip(out, images):
        assert set(det) == {"boxes", "labels", "scores"}
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].shape == (n,) and det["labels"].dtype == torch.int64
        assert det["scores"].shape == (n,)
        assert n <= model.roi_heads.detections_per_img
        if n:
            h, w = im.shape[-2:]
            assert float(det["boxes"][:, 0::2].max()) <= w + 1e-3 and float(det["boxes"][:, 1::2].max()) <= h + 1e-3
            assert bool((det["labels"] >= 1).all()) and bool((det["labels"] < model.num_classes).all())
            assert bool((det["scores"][:-1] >= det["scores"][1:]).all())  # best first
    assert any(d["boxes"].shape[0] > 0 for d in out)  # with threshold 0, a random model still detects


@pytest.mark.parametrize(
    "bad_targets, message",
    [
        (None, "needs targets"),
        ([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}], "one dict per image"),
        ([{"labels": torch.tensor([1])}] * 2, r"targets\[0\] has no 'boxes'"),
        (
            [{"boxes": torch.zeros(3), "labels": torch.tensor([1])}] * 2,
            r"targets\[0\]\['boxes'\]: expected a Tensor\[N, 4\]",
        ),
        ([{"boxes": torch.tensor([[0, 0, 5, 5]]), "labels": torch.tensor([1])}] * 2, "expected a float tensor"),
        ([{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([1, 2])}] * 2, "one label per box"),
        (
            [{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([1], dtype=torch.int32)}] * 2,
            "torch.int64",
        ),
        (
            [
                {"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([1])},
                {"boxes": torch.tensor([[0.0, 0, 5, 5], [10.0, 10, 10, 20]]), "labels": torch.tensor([1, 1])},
            ],
            r"targets\[1\]\['boxes'\]\[1\] = \[10.0, 10.0, 10.0, 20.0\] is degenerate",
        ),
        (
            [{"boxes": torch.tensor([[0.0, 8, 5, 5]]), "labels": torch.tensor([1])}] * 2,
            r"\[0\]\['boxes'\]\[0\].*degenerate",
        ),
        ([{"boxes": torch.tensor([[0.0, 0, float("nan"), 5]]), "labels": torch.tensor([1])}] * 2, "not finite"),
        (
            [{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([0])}] * 2,
            r"\['labels'\]\[0\] = 0 is out of range: expected 1..3",
        ),
        ([{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([4])}] * 2, "= 4 is out of range"),
    ],
)
def test_training_input_errors(bad_targets, message):
    model = tiny_model().train()
    images, _ = sample_batch()
    with pytest.raises((ValueError, TypeError, KeyError), match=message):
        model(images, bad_targets)


@pytest.mark.parametrize(
    "bad_images, message",
    [
        (torch.rand(2, 3, 64, 64), "list of Tensor"),
        ([torch.rand(1, 64, 64)], r"images\[0\]: expected a Tensor\[3, H, W\]"),
        ([torch.rand(3, 64, 64), torch.zeros(3, 64, 64, dtype=torch.uint8)], r"images\[1\]: expected a float tensor"),
        ([], "non-empty list"),
    ],
)
def test_image_input_errors(bad_images, message):
    model = tiny_model().eval()
    with pytest.raises((ValueError, TypeError), match=message):
        model(bad_images)


def test_model_does_not_mutate_inputs():
    model = tiny_model().train()
    images, targets = sample_batch()
    before = [t["boxes"].clone() for t in targets], [im.clone() for im in images]
    model(images, targets)
    assert all(torch.equal(a, t["boxes"]) for a, t in zip(before[0], targets))
    assert all(torch.equal(a, im) for a, im in zip(before[1], images))


def test_channels_last_gives_the_same_detections():
    model = tiny_model(box_score_thresh=0.0).eval()
    images, _ = sample_batch()
    with torch.no_grad():
        ref = model(images)
        out = model.to_channels_last()(images)
    for a, b in zip(ref, out):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3) and torch.allclose(a["scores"], b["scores"], atol=1e-5)


def test_conv_box_head_option_trains_and_detects():
    model = tiny_model(box_head_convs=(16, 16), box_score_thresh=0.0)
    assert type(model.roi_heads.box_head).__name__ == "ConvFCHead"
    images, targets = sample_batch()
    losses = model.train()(images, targets)
    sum(losses.values()).backward()
    assert model.roi_heads.box_head[0][0].weight.grad is not None
    with torch.no_grad():
        out = model.eval()(images)
    assert out[0]["boxes"].shape[-1] == 4
