"""Soft-NMS in the second stage (`box_nms`): the detections are those of the model without suppression, put
through `ops.batched_soft_nms` per image and class; the option trains and evaluates end to end, reaches the model
from the config, and export refuses it with a clear message. The default stays greedy NMS."""

import pytest
import torch

from fasterrcnn.ops import batched_soft_nms

from .helpers import tiny_model


def _detect(model, images):
    model.eval()
    with torch.inference_mode():
        return model(images)


@pytest.mark.parametrize("method, sigma", [("soft_gaussian", 0.5), ("soft_linear", 0.5), ("soft_gaussian", 0.1)])
def test_soft_nms_detections_equal_the_op_on_the_unsuppressed_candidates(method, sigma):
    torch.manual_seed(0)
    common = dict(box_score_thresh=0.01, rpn_post_nms_top_n_test=60)
    plain = tiny_model(num_classes=4, box_nms_thresh=1.0, box_detections_per_img=100000, **common)
    soft = tiny_model(
        num_classes=4,
        box_nms=method,
        box_soft_nms_sigma=sigma,
        box_soft_nms_min_score=0.02,
        box_nms_thresh=0.4,
        box_detections_per_img=25,
        **common,
    )
    soft.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 120, 160, generator=g), torch.rand(3, 100, 130, generator=g)]
    candidates = _detect(plain, images)  # every (proposal, class) above the score threshold, none suppressed
    found = _detect(soft, images)
    total = 0
    for cand, det in zip(candidates, found):
        keep, decayed = batched_soft_nms(
            cand["boxes"],
            cand["scores"],
            cand["labels"],
            method=method.removeprefix("soft_"),
            sigma=sigma,
            iou_threshold=0.4,
            score_threshold=0.02,
        )
        keep, decayed = keep[:25], decayed[:25]
        torch.testing.assert_close(det["boxes"], cand["boxes"][keep])
        torch.testing.assert_close(det["scores"], decayed)
        assert torch.equal(det["labels"], cand["labels"][keep])
        total += len(keep)
    assert total > 10  # the comparison had detections to compare


def test_soft_nms_keeps_more_overlapping_boxes_than_greedy_nms():
    torch.manual_seed(0)
    hard = tiny_model(num_classes=4, box_score_thresh=0.01)
    soft = tiny_model(num_classes=4, box_score_thresh=0.01, box_nms="soft_gaussian", box_soft_nms_min_score=0.01)
    soft.load_state_dict(hard.state_dict())
    images = [torch.rand(3, 120, 160, generator=torch.Generator().manual_seed(1))]
    assert len(_detect(soft, images)[0]["scores"]) >= len(_detect(hard, images)[0]["scores"])


def test_bad_box_nms_is_refused():
    with pytest.raises(ValueError, match="box_nms must be one of nms, soft_linear, soft_gaussian"):
        tiny_model(num_classes=4, box_nms="soft")


def test_soft_nms_trains_and_evaluates_from_the_config(tmp_path):
    from fasterrcnn.engine.trainer import train

    from ..engine.helpers import tiny_config

    cfg = tiny_config(tmp_path, tmp_path / "synth", "train.iterations=2", "model.options.box_nms=soft_linear")
    result = train(cfg, show_progress=False)
    assert result.evaluation is not None and 0.0 <= result.evaluation.coco.AP <= 1.0


def test_a_bad_box_nms_in_the_config_names_the_key(tmp_path):
    from fasterrcnn.engine.config import ConfigError

    from ..engine.helpers import tiny_config

    with pytest.raises(ConfigError, match="model.options.box_nms"):
        tiny_config(tmp_path, tmp_path / "synth", "model.options.box_nms=greedy")


def test_export_refuses_soft_nms_with_a_clear_message():
    from fasterrcnn.deploy.export import ExportError
    from fasterrcnn.deploy.graph import DeployGraph

    model = tiny_model(num_classes=4, box_nms="soft_gaussian").eval()
    with pytest.raises(ExportError, match="box_nms=soft_gaussian: Soft-NMS has no exported form yet"):
        DeployGraph(model)
