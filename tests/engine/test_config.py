import pytest

from fasterrcnn.engine.config import ConfigError, load_config, parse_override


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  lr: 0.05\ntrain:\n  iterations: 10\nmodel:\n  options: {min_size: 300}\n")
    cfg = load_config(path, overrides=["train.iterations=20", "solver.milestones=[0.5, 0.9]"])
    assert cfg.solver.lr == 0.05 and cfg.train.iterations == 20 and cfg.solver.milestones == [0.5, 0.9]
    assert cfg.model.options == {"min_size": 300}
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("text, message", [
    ("solver:\n  lrr: 0.1\n", "unknown config key 'solver.lrr'"),
    ("trainer:\n  x: 1\n", "unknown config key 'trainer'"),
    ("train:\n  batch_size: two\n", "train.batch_size: expected int"),
    ("train:\n  batch_size: 0\n", "train.batch_size must be >= 1"),
    ("train:\n  amp: fp8\n", "train.amp must be none, bf16 or fp16"),
    ("solver:\n  lr: -1\n", "solver.lr must be > 0"),
    ("solver:\n  loss_weights: {loss_mask: 1}\n", "unknown losses"),
    ("data:\n  synth_size: [16]\n", "data.synth_size"),
    ("train: [1, 2\n", "not valid YAML"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert "bad.yaml" in str(e.value)


def test_override_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["solver.lr"])
    with pytest.raises(ConfigError, match="unknown config key 'solver.nope'"):
        load_config(overrides=["solver.nope=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_mapping_overrides_merge_instead_of_replacing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  options: {min_size: 256, max_size: 320}\n")
    cfg = load_config(path, overrides=["model.options.fpn_norm=bn", "solver.loss_weights.loss_box_reg=2"])
    assert cfg.model.options == {"min_size": 256, "max_size": 320, "fpn_norm": "bn"}
    assert cfg.solver.loss_weights["loss_box_reg"] == 2 and cfg.solver.loss_weights["loss_classifier"] == 1.0
