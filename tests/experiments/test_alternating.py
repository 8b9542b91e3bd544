import csv

import pytest
import torch

import fasterrcnn.engine.trainer as trainer_mod
from fasterrcnn.engine.checkpoint import load_checkpoint
from fasterrcnn.engine.config import ConfigError, apply_overrides
from fasterrcnn.engine.setup import build_model, load_model_for_inference
from fasterrcnn.experiments.alternating import AlternatingStep, step_config, step_lengths
from fasterrcnn.experiments.schedules import train_schedule as train

from ..engine.helpers import tiny_config

ALTERNATING = ("train.schedule=alternating", "train.iterations=4", "train.batch_size=2")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth") / "data"


@pytest.fixture(scope="module")
def schedule(tmp_path_factory, synth_dir):
    """One alternating run of 1 iteration per step: (its folder, its config)."""
    tmp = tmp_path_factory.mktemp("alternating")
    cfg = tiny_config(tmp, synth_dir, *ALTERNATING, "solver.lr=0.01")
    result = train(cfg, show_progress=False)
    return result, cfg


def _part(state, name):
    return {k: v for k, v in state.items() if k.startswith(name + ".")}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_four_steps_run_and_log_each_step(schedule):
    result, _ = schedule
    run = result.run_dir
    assert result.iterations == 4 and len(result.steps) == 4
    for k in (1, 2, 3, 4):
        assert load_checkpoint(run / f"step{k}" / "last.pt")["iteration"] == 1
        assert (run / f"step{k}" / "done.json").is_file()
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [(r["step"], r["iteration"]) for r in train_rows] == [("1", "1"), ("2", "2"), ("3", "3"), ("4", "4")]
    # only the trained part's losses count (the others are left empty)
    assert train_rows[0]["loss_classifier"] == "" and float(train_rows[0]["loss_objectness"]) > 0
    assert train_rows[1]["loss_objectness"] == "" and float(train_rows[1]["loss_classifier"]) > 0
    assert [r["step"] for r in rows if r["kind"] == "eval"] == ["2", "3", "4"]  # step 1 has no detector
    assert (run / "last.pt").read_bytes() == (run / "step4" / "last.pt").read_bytes()


def test_frozen_parts_do_not_change_and_get_no_optimizer_state(schedule):
    result, _ = schedule
    s = {k: load_checkpoint(result.run_dir / f"step{k}" / "last.pt") for k in (1, 2, 3, 4)}
    m = {k: v["model"] for k, v in s.items()}
    # step 2 trains a fresh backbone (not step 1's); step 3 trains only the RPN, step 4 only the heads
    assert not _equal(_part(m[1], "backbone"), _part(m[2], "backbone"))
    assert _equal(_part(m[2], "backbone"), _part(m[3], "backbone"))  # BatchNorm statistics included
    assert _equal(_part(m[2], "roi_heads"), _part(m[3], "roi_heads"))
    assert not _equal(_part(m[1], "rpn"), _part(m[3], "rpn"))
    assert _equal(_part(m[2], "backbone"), _part(m[4], "backbone"))
    assert _equal(_part(m[3], "rpn"), _part(m[4], "rpn"))
    assert not _equal(_part(m[3], "roi_heads"), _part(m[4], "roi_heads"))

    model = build_model(result_cfg(schedule).model, num_classes=len(s[4]["class_names"]))
    trained = {1: ("backbone", "rpn"), 2: ("backbone", "roi_heads"), 3: ("rpn",), 4: ("roi_heads",)}
    for k, parts in trained.items():
        n = sum(1 for name, _ in model.named_parameters() if name.split(".")[0] in parts)
        optimizer = s[k]["optimizer"]
        assert len(optimizer["param_groups"][0]["params"]) == n, k  # the frozen parts are not in it
        assert 0 < len(optimizer["state"]) <= n, k


def result_cfg(schedule):
    return schedule[1]


def test_prepare_freezes_the_shared_layers_for_steps_3_and_4(schedule):
    result, cfg = schedule
    for step, trainable in ((3, {"rpn"}), (4, {"roi_heads"})):
        model = build_model(cfg.model, num_classes=5)
        AlternatingStep(step, result.run_dir, cfg.model, cfg.train.seed).prepare(model, device=torch.device("cpu"))
        assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == trainable
        wrapped = AlternatingStep(step, result.run_dir, cfg.model, cfg.train.seed).wrap(model).train()
        assert not model.backbone.training and wrapped.training


def test_the_result_loads_for_inference_and_detects(schedule):
    result, _ = schedule
    model, class_names, _ = load_model_for_inference(result.run_dir / "last.pt")
    assert class_names[0] == "__background__"
    with torch.inference_mode():
        (det,) = model([torch.rand(3, 96, 128)])
    assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0] > 0


def test_a_stopped_schedule_continues_where_it_stopped(tmp_path, synth_dir, monkeypatch, schedule):
    cfg = tiny_config(tmp_path, synth_dir, *ALTERNATING, "solver.lr=0.01")
    original, calls = trainer_mod.check_finite, []

    def crash_in_step_4(losses, loss, iteration):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(losses, loss, iteration)

    monkeypatch.setattr(trainer_mod, "check_finite", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, show_progress=False)
    monkeypatch.setattr(trainer_mod, "check_finite", original)
    run = tmp_path / "runs" / "t"
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, show_progress=False)
    resumed = train(cfg, resume=str(run / "step3" / "last.pt"), show_progress=False)
    assert resumed.steps[:3] == [None] * 3  # finished before the stop: not run again
    assert resumed.steps[3].iterations == 1
    final = load_checkpoint(run / "last.pt")["model"]
    reference = load_checkpoint(schedule[0].run_dir / "last.pt")["model"]
    assert all(torch.allclose(final[k], reference[k], rtol=1e-5, atol=1e-6) for k in final)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (("train.alternating_iterations=[0.5, 0.5]",), "four positive numbers"),
        (("train.alternating_iterations=[0.5, 0.2, 0.2, 0.2]",), "summing to 1"),
        (("train.alternating_iterations=[10, 10, 10, 10]", "train.iterations=30"), "sum matches"),
        (("train.alternating_iterations=[0.5, 10, 10, 10]",), "all fractions"),
        (("train.alternating_detector_init=step1",), "initial or rpn"),
    ],
)
def test_bad_alternating_configs_are_refused(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_config(tmp_path, tmp_path, "train.schedule=alternating", *overrides)


def test_step_lengths(tmp_path):
    cfg = tiny_config(
        tmp_path,
        tmp_path,
        "train.schedule=alternating",
        "train.iterations=600",
        "train.alternating_iterations=[0.2, 0.5, 0.15, 0.15]",
    )
    assert step_lengths(cfg.train) == [120, 300, 90, 90]
    step2 = step_config(apply_overrides(cfg, ["solver.warmup_iters=60"]), 2)  # warmup scaled with the step
    assert (step2.train.iterations, step2.solver.warmup_iters, step2.train.name) == (300, 30, "step2")
    assert step2.train.schedule == "joint"  # a plain run of the trainer: the step is the schedule's state
    cfg = tiny_config(
        tmp_path,
        tmp_path,
        "train.schedule=alternating",
        "train.iterations=0",
        "train.alternating_iterations=[1, 2, 3, 4]",
    )
    assert step_lengths(cfg.train) == [1, 2, 3, 4]
