import json

import pytest
import torch

import fasterrcnn.engine.trainer as trainer_mod
from fasterrcnn.cli import main
from fasterrcnn.engine.config import ConfigError
from fasterrcnn.experiments.ablate import BUILTIN_CELLS, base_config, cell_config, config_hash, select_cells

from ..engine.helpers import TINY_MODEL

TINY = [f"model.options.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "data.synth_num_train=8",
    "data.synth_num_val=4",
    "data.synth_size=[96, 128]",
    "data.workers=0",
    "train.batch_size=2",
    "train.log_every=1",
    "train.amp=none",
]


def test_ablate_runs_two_cells_writes_the_table_and_plot_then_reuses_them(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ablation"
    argv = [
        "ablate",
        "--out",
        str(out),
        "--data",
        str(tmp_path / "synth"),
        "--iterations",
        "2",
        "--cells",
        "joint_pretrained,test_proposals_100",
        *TINY,
    ]
    assert main(argv) == 0
    # test_proposals_100 re-evaluates the baseline, joint_pretrained starts from its backbone: it is added and trained
    for cell in ("baseline", "joint_pretrained"):
        assert (out / cell / "last.pt").is_file()
        saved = json.loads((out / cell / "result.json").read_text())
        assert 0.0 <= saved["AP"] <= 1.0 and saved["train_s"] > 0
    assert not (out / "test_proposals_100" / "last.pt").exists()
    table = (out / "ablation.md").read_text()
    assert "| cell | overrides | AP | AP50 | AP_small | training time |" in table
    assert "| joint_pretrained | (backbone from baseline's model) |" in table and "--iterations 2" in table
    donor, pretrained = (
        torch.load(out / c / "last.pt", weights_only=True)["model"] for c in ("baseline", "joint_pretrained")
    )
    key = "backbone.body.conv1.weight"  # the stem is frozen, so it is still the donor's
    assert torch.equal(donor[key], pretrained[key])
    assert (
        json.loads((out / "joint_pretrained" / "result.json").read_text())["config_hash"]
        != json.loads((out / "baseline" / "result.json").read_text())["config_hash"]
    )
    assert (out / "ablation.png").stat().st_size > 1000
    assert "0 re-used" in capsys.readouterr().out

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(trainer_mod, "train", no_training)
    assert main(argv) == 0
    assert "3 cell(s), 3 re-used" in capsys.readouterr().out
    assert (out / "ablation.md").read_text() == table


def test_cells_select_their_reference_and_unknown_names_are_refused():
    assert [c.name for c in select_cells(["test_proposals_1000"])] == ["baseline", "test_proposals_1000"]
    assert [c.name for c in select_cells(["alternating_pretrained"])] == ["baseline", "alternating_pretrained"]
    assert len(select_cells(None)) == len(BUILTIN_CELLS)
    with pytest.raises(ConfigError, match="unknown ablation cell"):
        select_cells(["baseline", "bogus"])


def test_the_hash_ignores_where_and_how_a_cell_runs_but_not_what_it_computes(tmp_path):
    base = base_config(iterations=60)
    assert base.train.iterations == 60 and base.solver.warmup_iters == 10  # the demo's 100 of 600, scaled
    baseline, single = (c for c in BUILTIN_CELLS if c.name in ("baseline", "single_map"))
    a = cell_config(base, baseline, tmp_path / "a")
    b = cell_config(
        base_config(iterations=60, overrides=["train.threads=1", "data.workers=0"]), baseline, tmp_path / "b"
    )
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(cell_config(base_config(iterations=61), baseline, tmp_path))
    s = cell_config(base, single, tmp_path)
    assert s.model.arch == "fasterrcnn_resnet18_c4" and "fpn_channels" not in s.model.options
