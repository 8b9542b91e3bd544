"""What a run shows while it trains (issue 18): the validation loss, TensorBoard events (read back with
TensorBoard's own reader), the error analysis in the run folder, and a resumed run without duplicated steps."""

import csv
import logging

import pytest
import torch
from PIL import Image

import fasterrcnn.engine.trainer as trainer_mod
from fasterrcnn.engine.checkpoint import load_checkpoint
from fasterrcnn.engine.diagnostics import ImageResult, pick_grid_images
from fasterrcnn.engine.metrics import VAL_LOSS_COLUMNS
from fasterrcnn.engine.trainer import train
from fasterrcnn.engine.val_loss import VAL_SEED, validation_loss
from fasterrcnn.model.loss_names import LOSS_NAMES

from ..model.helpers import tiny_model
from .helpers import tiny_config

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth") / "data"


def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def rows(run_dir, kind: str) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["kind"] == kind]


# ---- the validation loss ------------------------------------------------------------------------------------


class _Batch(torch.utils.data.Dataset):
    """Two fixed images and targets, one with a crowd box the loss must leave out."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 112, generator=g)]
        self.targets = [
            {
                "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]),
                "labels": torch.tensor([1, 3]),
                "image_id": torch.tensor(7),
                "iscrowd": torch.tensor([0, 1]),
            },
            {
                "boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]),
                "labels": torch.tensor([2]),
                "image_id": torch.tensor(9),
                "iscrowd": torch.tensor([0]),
            },
        ]

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def test_validation_loss_is_the_training_losses_without_gradient_and_with_batchnorm_in_eval_mode():
    torch.manual_seed(0)
    model = tiny_model(num_classes=4)  # from scratch: plain BatchNorm, with running statistics
    model.eval()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    data = _Batch()
    got = validation_loss(model, data, batch_size=2, weights={"loss_classifier": 2.0})

    # by hand: the same batch, the losses of training mode, BatchNorm and the resize in eval mode, no gradient
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    model.transform.eval()
    targets = [
        {
            "boxes": t["boxes"][t["iscrowd"] == 0],
            "labels": t["labels"][t["iscrowd"] == 0],
            "sample_seed": VAL_SEED * 1_000_003 + int(t["image_id"]),
        }
        for t in data.targets
    ]
    with torch.no_grad():
        expected = {k: float(v) for k, v in model(data.images, targets).items()}
    assert set(expected) == set(LOSS_NAMES)
    for k in LOSS_NAMES:
        assert got[k] == pytest.approx(expected[k], rel=1e-6), k
    assert got["loss"] == pytest.approx(sum(expected.values()) + expected["loss_classifier"], rel=1e-6)
    # a measurement, not a step: BatchNorm's statistics untouched, no gradient, the model's mode restored
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    again = validation_loss(model, data, batch_size=1)
    assert not model.training and not bn.training  # eval mode, as it was before
    assert validation_loss(model, data, batch_size=1) == again  # the same weights, the same loss


# ---- a run: metrics.csv, the run folder, TensorBoard ----------------------------------------------------------


def test_a_run_logs_validation_loss_tensorboard_and_the_error_analysis(tmp_path, synth_dir, caplog):
    caplog.set_level(logging.INFO, logger="fasterrcnn")
    cfg = tiny_config(tmp_path, synth_dir, "train.iterations=4", "train.eval_every=2")
    run = train(cfg, show_progress=False).run_dir
    assert f"tensorboard --logdir {tmp_path / 'runs'}" in caplog.text
    evals = rows(run, "eval")
    assert [int(r["iteration"]) for r in evals] == [2, 4]
    for r in evals:
        assert all(r[c] not in ("", None) for c in VAL_LOSS_COLUMNS)
        parts = sum(float(r[f"val_{k}"]) for k in LOSS_NAMES)
        assert float(r["val_loss"]) == pytest.approx(parts, rel=1e-4)
    for name in ("confusion_matrix.png", "confusion_matrix.csv", "f1_curve.png", "val_predictions.jpg", "losses.png"):
        assert (run / name).is_file(), name
    assert Image.open(run / "val_predictions.jpg").size[0] >= 360

    acc = events(run)
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/images_per_s", *(f"train/{k}" for k in LOSS_NAMES)):
        assert steps(acc, tag) == [1, 2, 3, 4], tag
    for tag in ("val/AP", "val/AP50", "val/APl", "val/VOC07_mAP50", "val/loss", *(f"val/{k}" for k in LOSS_NAMES)):
        assert steps(acc, tag) == [2, 4], tag
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(float(evals[-1]["val_loss"]), rel=1e-4)
    assert acc.Scalars("val/AP")[-1].value == pytest.approx(float(evals[-1]["AP"]), rel=1e-4)
    assert any(t.startswith("val_AP_per_class/") for t in tags["scalars"])
    assert {"val_predictions/0", "val_predictions/3"} <= set(tags["images"])
    assert [e.step for e in acc.Images("val_predictions/0")] == [2, 4]
    pr_tags = [t for t in tags["tensors"] if t.startswith("pr_curve/")]
    assert pr_tags and [e.step for e in acc.Tensors(pr_tags[0])] == [2, 4]


def test_a_resumed_run_appends_to_tensorboard_without_duplicated_steps(tmp_path, synth_dir, monkeypatch):
    cfg = tiny_config(tmp_path, synth_dir, "train.iterations=6", "train.checkpoint_every=3", "train.eval_every=3")
    original = trainer_mod.check_finite

    def crash_at_iteration_5(losses, loss, iteration):
        if iteration == 5:
            raise KeyboardInterrupt  # after iteration 4 was logged, past the checkpoint at 3
        return original(losses, loss, iteration)

    monkeypatch.setattr(trainer_mod, "check_finite", crash_at_iteration_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, show_progress=False)
    monkeypatch.setattr(trainer_mod, "check_finite", original)
    run = tmp_path / "runs" / "t"
    assert load_checkpoint(run / "last.pt")["iteration"] == 3
    assert steps(events(run), "train/loss") == [1, 2, 3, 4]
    train(cfg, resume=str(run / "last.pt"), show_progress=False)
    acc = events(run)
    assert steps(acc, "train/loss") == [1, 2, 3, 4, 5, 6]  # step 4 of the interrupted run purged, then redone
    assert steps(acc, "val/AP") == [3, 6] and steps(acc, "val/loss") == [3, 6]
    assert [int(r["iteration"]) for r in rows(run, "train")] == [1, 2, 3, 4, 5, 6]


# ---- the error grid's choice of images ----------------------------------------------------------------------


def _result(index: int, gt: list, det: list) -> ImageResult:
    boxes = torch.tensor([b for b, _ in gt], dtype=torch.float32).reshape(-1, 4)
    dboxes = torch.tensor([b for b, _, _ in det], dtype=torch.float32).reshape(-1, 4)
    return ImageResult(
        index,
        100 + index,
        {"boxes": boxes, "labels": torch.tensor([k for _, k in gt]), "iscrowd": torch.zeros(len(gt), dtype=torch.long)},
        {
            "boxes": dboxes,
            "labels": torch.tensor([k for _, k, _ in det], dtype=torch.long),
            "scores": torch.tensor([s for _, _, s in det]),
        },
    )


def test_the_grid_shows_the_worst_images_first_then_random_ones():
    box, other = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]
    results = [
        _result(0, [(box, 1)], [(box, 1, 0.9)]),  # right
        _result(1, [(box, 1)], []),  # 1 missed
        _result(2, [(box, 1)], [(box, 2, 0.9), (other, 1, 0.8)]),  # 1 confused, 1 false
        _result(3, [(box, 1)], [(box, 1, 0.3)]),  # below the threshold: 1 missed
        _result(4, [], []),
        _result(5, [(box, 2)], [(box, 2, 0.9)]),
    ]
    names = ["__background__", "a", "b"]
    picks = pick_grid_images(
        results, class_names=names, score_threshold=0.5, iou_threshold=0.5, worst=2, random_count=2
    )
    captions = [c for _, c in picks]
    assert captions[:2] == [
        "worst 1: id 102, 0 missed, 1 false, 1 confused",
        "worst 2: id 101, 1 missed, 0 false, 0 confused",
    ]
    assert len(picks) == 4 and all(c.startswith("random: ") for c in captions[2:])
    assert {r.index for r, _ in picks[2:]} <= {0, 3, 4, 5}
