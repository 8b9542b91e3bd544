"""Issue 14: every path that takes an architecture takes the new builders' names: a config's model.arch and
`fasterrcnn train`, then `fasterrcnn evaluate --arch` and `Detector.load(arch=)` on torchvision-format weights."""

import pytest
import torch
import yaml

from fasterrcnn import Detector
from fasterrcnn.cli import main
from fasterrcnn.engine.config import ConfigError, load_config
from fasterrcnn.model import BUILDERS

from .helpers import TINY_MODEL

NEW = ["fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"]


@pytest.mark.parametrize("arch", NEW)
def test_a_config_takes_the_new_names_and_their_options(arch):
    cfg = load_config(overrides=[f"model.arch={arch}", "model.options.min_size=128", "model.options.max_size=160"])
    assert cfg.model.arch == arch
    if arch.startswith("fasterrcnn_mobilenet"):
        load_config(overrides=[f"model.arch={arch}", "model.options.anchor_sizes=[16, 32, 64, 128, 256]"])
    with pytest.raises(ConfigError, match="fpn_channels"):  # an option this builder does not take
        load_config(overrides=[f"model.arch={arch}", "model.options.fpn_channels=64"])


def test_train_then_evaluate_and_load_the_small_mobilenet(tmp_path, capsys):
    options = {k: v for k, v in TINY_MODEL.items() if k != "fpn_channels"}
    config = {
        "data": {"synth_dir": str(tmp_path / "synth"), "synth_num_train": 4, "synth_num_val": 2},
        "model": {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "options": options},
        "train": {"iterations": 2, "batch_size": 2, "name": "m", "device": "cpu", "out_dir": str(tmp_path / "runs")},
    }
    config["data"].update({"synth_size": [96, 128], "workers": 0})
    config["model"]["options"]["anchor_sizes"] = [16, 32, 64, 128, 256]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", str(tmp_path / "m.yaml")]
    assert main(["train", *args]) == 0
    best = tmp_path / "runs" / "m" / "best.pt"
    detector = Detector.load(best, score_threshold=0.0)
    assert detector.model.transform.min_size == (96,)  # the run's options came with the checkpoint
    image = torch.rand(3, 96, 128)
    assert detector(image).boxes.shape[-1] == 4
    # torchvision-format weights of the new builders: --arch / arch= build them
    bare = tmp_path / "bare.pth"
    torch.save(BUILDERS["fasterrcnn_mobilenet_v3_large_320_fpn"](num_classes=5).state_dict(), bare)
    loaded = Detector.load(bare, arch="fasterrcnn_mobilenet_v3_large_320_fpn")
    assert loaded.model.num_classes == 5
    capsys.readouterr()
    val = tmp_path / "synth" / "annotations" / "instances_val.json"
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert main(["evaluate", "--weights", str(best), "--arch", arch, "--data", str(val)]) == 0
    # the bare COCO-layout weights are built with --arch; their 91-index COCO names do not fit this data's
    assert main(["evaluate", "--weights", str(bare), "--arch", arch, "--data", str(val)]) == 2
    assert "are not classes of the model" in capsys.readouterr().err
