import logging

import pytest
import torch

from fasterrcnn.engine.config import ConfigError, ModelConfig
from fasterrcnn.engine.setup import build_model
from fasterrcnn.model import fasterrcnn_resnet18_fpn

from .helpers import TINY_MODEL


def test_fine_tuning_keeps_every_weight_but_the_predictor_and_says_so(tmp_path, caplog):
    source = fasterrcnn_resnet18_fpn(num_classes=11, **TINY_MODEL)
    path = tmp_path / "other_classes.pth"
    torch.save(source.state_dict(), path)
    cfg = ModelConfig(arch="fasterrcnn_resnet18_fpn", weights=str(path), options=dict(TINY_MODEL))
    with caplog.at_level(logging.INFO, logger="fasterrcnn"):
        model = build_model(cfg, num_classes=4)
    assert model.num_classes == 4 and model.roi_heads.box_predictor.bbox_pred.out_features == 16
    assert "re-initialised for 4 classes (the checkpoint has 11)" in caplog.text
    theirs = source.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith("roi_heads.box_predictor"):
            continue
        assert torch.equal(v, theirs[k]), k
    # the same class count: loaded whole, nothing said
    caplog.clear()
    same = build_model(cfg, num_classes=11)
    assert torch.equal(same.roi_heads.box_predictor.cls_score.weight, source.roi_heads.box_predictor.cls_score.weight)
    assert "re-initialised" not in caplog.text


def test_unknown_arch_and_option_are_config_errors():
    with pytest.raises(ConfigError, match="model.arch 'fasterrcnn_vgg16' is not one of"):
        build_model(ModelConfig(arch="fasterrcnn_vgg16"), num_classes=3)
    with pytest.raises(ConfigError, match="model.options"):
        build_model(ModelConfig(arch="fasterrcnn_resnet18_fpn", options={"no_such_option": 1}), num_classes=3)
