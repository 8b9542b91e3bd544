import csv
import math

import pytest
import torch

import fasterrcnn.engine.trainer as trainer_mod
from fasterrcnn.engine.checkpoint import load_checkpoint
from fasterrcnn.engine.config import ConfigError
from fasterrcnn.engine.trainer import NonFiniteLossError, train

from .helpers import tiny_config


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth") / "data"


def _train_losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["iteration"]), float(r["loss"])) for r in csv.DictReader(f) if r["kind"] == "train"]


def test_a_short_run_writes_every_output(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, "train.iterations=3")
    result = train(cfg, show_progress=False)
    run = result.run_dir
    for name in (
        "config.yaml",
        "last.pt",
        "best.pt",
        "metrics.csv",
        "predictions.json",
        "eval.json",
        "losses.png",
        "ap.png",
    ):
        assert (run / name).exists(), name
    state = load_checkpoint(run / "last.pt")
    assert state["iteration"] == 3 and state["class_names"][0] == "__background__"
    assert [i for i, _ in _train_losses(run)] == [1, 2, 3]
    assert all(math.isfinite(v) for _, v in _train_losses(run))
    assert result.evaluation is not None and 0.0 <= result.evaluation.coco.AP <= 1.0


def test_resume_continues_the_same_loss_sequence(tmp_path, synth_dir, monkeypatch):
    """6 iterations straight against 3, a crash, and a resume from last.pt for the other 3."""
    overrides = ("train.iterations=6", "train.checkpoint_every=3")
    full = train(tiny_config(tmp_path / "a", synth_dir, *overrides), show_progress=False)

    cfg = tiny_config(tmp_path / "b", synth_dir, *overrides)
    original = trainer_mod.check_finite

    def crash_at_iteration_4(losses, loss, iteration):
        if iteration == 4:
            raise KeyboardInterrupt
        return original(losses, loss, iteration)

    monkeypatch.setattr(trainer_mod, "check_finite", crash_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, show_progress=False)
    monkeypatch.setattr(trainer_mod, "check_finite", original)
    run_b = tmp_path / "b" / "runs" / "t"
    assert load_checkpoint(run_b / "last.pt")["iteration"] == 3
    resumed = train(cfg, resume=str(run_b / "last.pt"), show_progress=False)

    a, b = _train_losses(full.run_dir), _train_losses(resumed.run_dir)
    assert [i for i, _ in a] == [i for i, _ in b] == [1, 2, 3, 4, 5, 6]
    for (i, va), (_, vb) in zip(a, b):
        assert va == pytest.approx(vb, rel=1e-5, abs=1e-6), (i, va, vb)
    wa = load_checkpoint(full.run_dir / "last.pt")["model"]
    wb = load_checkpoint(run_b / "last.pt")["model"]
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)


def test_non_finite_loss_stops_with_the_iteration_and_values_and_writes_nothing(tmp_path, synth_dir):
    cfg = tiny_config(
        tmp_path,
        synth_dir,
        "solver.lr=1e6",
        "solver.warmup_iters=0",
        "train.iterations=30",
        "train.checkpoint_every=1000",
    )
    with pytest.raises(NonFiniteLossError, match=r"iteration \d+: the loss is not finite \(loss_objectness="):
        train(cfg, show_progress=False)
    assert not (tmp_path / "runs" / "t" / "last.pt").exists()


def test_existing_run_is_not_overwritten_and_cuda_without_gpu_is_refused(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, "train.iterations=1")
    train(cfg, show_progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, show_progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no GPU"):
            train(tiny_config(tmp_path / "c", synth_dir, "train.device=cuda"), show_progress=False)


def test_gradient_accumulation_and_clipping(tmp_path, synth_dir):
    cfg = tiny_config(
        tmp_path,
        synth_dir,
        "train.iterations=2",
        "solver.accumulate=2",
        "solver.clip_grad_norm=1.0",
        "solver.optimizer=adamw",
        "solver.lr=0.001",
    )
    result = train(cfg, show_progress=False)
    state = load_checkpoint(result.run_dir / "last.pt")
    assert state["iteration"] == 2
    assert state["batch_in_epoch"] == 4  # two micro-batches per optimizer step
    assert [i for i, _ in _train_losses(result.run_dir)] == [1, 2]
