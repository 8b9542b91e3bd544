"""Cascade R-CNN heads (issue 19): each stage refines the previous stage's boxes; at test time the scores are the
stages' class probabilities averaged, the boxes the last stage's; training sums the stage losses with their
weights; the optimised model detects the same; the option trains from the config; export refuses it by name."""

import pytest
import torch
import torch.nn.functional as F

from fasterrcnn.model.cascade import CascadeRoIHeads, stage_weights
from fasterrcnn.model.recorder import Recorder

from .helpers import sample_batch, tiny_model

IOUS = (0.5, 0.6, 0.7)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(num_classes=4, cascade_iou=IOUS, box_score_thresh=0.05).eval()


def _image():
    g = torch.Generator().manual_seed(2)
    im = torch.rand(3, 96, 128, generator=g) * 0.3
    im[:, 20:70, 30:90] = torch.tensor([0.9, 0.3, 0.1])[:, None, None]
    return im


def test_the_heads_are_a_cascade_of_three_stages(model):
    heads = model.roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.num_stages == 3
    assert heads.iou_thresholds == IOUS and heads.stage_loss_weights == (1.0, 0.5, 0.25)
    assert (
        [c.weights for c in heads.coders]
        == [stage_weights(k) for k in range(3)]
        == [
            (10.0, 10.0, 5.0, 5.0),
            (20.0, 20.0, 10.0, 10.0),
            (30.0, 30.0, 15.0, 15.0),
        ]
    )
    assert heads.box_predictor.bbox_pred.out_features == 4  # one class-agnostic box per RoI
    assert model.num_classes == 4
    # each stage has its own weights
    assert not torch.equal(heads.box_head.fc6.weight, heads.later_heads[0].fc6.weight)


def test_scores_are_the_stages_probabilities_averaged_and_boxes_the_last_stages(model):
    image = _image()
    with torch.inference_mode():
        image_list, _ = model.preprocess([image])
        features = model.features(image_list.tensors)
        proposals, _ = model.propose(image_list, features)
        recorder = Recorder()
        detections, _ = model.detect(features, proposals, image_list.image_sizes, recorder=recorder)
        heads = model.roi_heads
        stage_boxes = recorder["roi_heads.cascade_boxes"]  # the input boxes of each stage, then the last output
        assert len(stage_boxes) == 4 and torch.equal(stage_boxes[0][0], proposals[0])
        probs, deltas = [], None
        for k in range(3):
            head, predictor = heads.stage(k)
            logits, deltas = predictor(head(heads.box_roi_pool(features, stage_boxes[k], image_list.image_sizes)))
            probs.append(F.softmax(logits, dim=-1))
            if k < 2:  # the next stage's boxes are this stage's, decoded with its own coder
                refined = heads.coders[k].decode(deltas, stage_boxes[k][0])
                h, w = image_list.image_sizes[0]
                refined[:, 0::2] = refined[:, 0::2].clamp(0, w)
                refined[:, 1::2] = refined[:, 1::2].clamp(0, h)
                torch.testing.assert_close(stage_boxes[k + 1][0], refined)
        mean = torch.stack(probs).mean(0)
        rows = recorder["roi_heads.proposal_index"][0]
        det = detections[0]
        assert len(rows) > 0
        torch.testing.assert_close(det["scores"], mean[rows, det["labels"]], rtol=1e-5, atol=1e-6)
        last = heads.coders[2].decode(deltas, stage_boxes[2][0])[rows]
        h, w = image_list.image_sizes[0]
        last[:, 0::2] = last[:, 0::2].clamp(0, w)
        last[:, 1::2] = last[:, 1::2].clamp(0, h)
        torch.testing.assert_close(det["boxes"], last, rtol=1e-5, atol=1e-4)


def test_training_sums_the_stage_losses_with_their_weights():
    torch.manual_seed(0)
    model = tiny_model(num_classes=4, cascade_iou=IOUS).train()
    images, targets = sample_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    heads = model.roi_heads
    for k in range(3):  # every stage learns
        head, predictor = heads.stage(k)
        assert head.fc6.weight.grad is not None and head.fc6.weight.grad.abs().sum() > 0, k
        assert predictor.bbox_pred.weight.grad.abs().sum() > 0, k
    # the weights: only stage 0 counting (1, 0, 0) gives stage 0's loss alone, smaller than the weighted sum
    torch.manual_seed(0)
    first = tiny_model(num_classes=4, cascade_iou=IOUS, cascade_loss_weights=(1.0, 1e-9, 1e-9)).train()
    first.load_state_dict(model.state_dict())
    alone = first(images, targets)
    assert float(alone["loss_classifier"].detach()) < float(losses["loss_classifier"].detach())


def test_the_optimised_cascade_detects_the_same(model):
    import copy

    image = _image()
    with torch.inference_mode():
        plain = model([image])[0]
        fast = copy.deepcopy(model).optimize_for_inference()([image])[0]
    assert len(plain["scores"]) > 0
    torch.testing.assert_close(fast["scores"], plain["scores"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast["boxes"], plain["boxes"], rtol=1e-4, atol=1e-2)
    with torch.inference_mode():  # bfloat16: every stage's head and predictor cast, the pooled rows too
        half = copy.deepcopy(model).optimize_for_inference(dtype=torch.bfloat16)([image])[0]
    assert half["scores"].dtype == torch.float32 and len(half["scores"]) > 0


def test_cascade_trains_and_evaluates_from_the_config(tmp_path):
    from fasterrcnn.engine.trainer import train

    from ..engine.helpers import tiny_config

    cfg = tiny_config(tmp_path, tmp_path / "synth", "train.iterations=2", "model.options.cascade_iou=[0.5, 0.6, 0.7]")
    result = train(cfg, show_progress=False)
    assert result.evaluation is not None and 0.0 <= result.evaluation.coco.AP <= 1.0


def test_what_the_cascade_refuses(tmp_path):
    from fasterrcnn.deploy.export import ExportError
    from fasterrcnn.deploy.graph import DeployGraph
    from fasterrcnn.engine.config import ConfigError

    from ..engine.helpers import tiny_config

    with pytest.raises(ValueError, match="one weight per stage"):
        tiny_model(num_classes=4, cascade_iou=(0.5, 0.6), cascade_loss_weights=(1.0, 0.5, 0.25))
    with pytest.raises(ConfigError, match="model.options.cascade_iou"):
        tiny_config(tmp_path, tmp_path / "synth", "model.options.cascade_iou=[0.7, 0.5]")
    with pytest.raises(ExportError, match="Cascade R-CNN model .* has no exported form yet"):
        DeployGraph(tiny_model(num_classes=4, cascade_iou=IOUS).eval())


def test_explain_draws_the_boxes_after_each_stage(tmp_path):
    from fasterrcnn.explain.figures import write_explain_figures
    from fasterrcnn.explain.trace import explain_image

    from ..explain.helpers import CLASSES, explain_model, synth_example

    _, _, image, target = synth_example(tmp_path / "synth")
    model = explain_model(cascade_iou=IOUS)
    trace = explain_image(model, image, target=target, class_names=CLASSES)
    assert trace.cascade_boxes is not None and len(trace.cascade_boxes) == 4  # proposals, then 3 stages
    # the detections are the model's own
    with torch.inference_mode():
        direct = model([image])[0]
    torch.testing.assert_close(trace.detections["scores"], direct["scores"])
    figures = write_explain_figures(trace, tmp_path / "fig", score_threshold=0.0)
    path, numbers = figures["cascade_stages"]
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert numbers["stages"] == 3 and numbers["shown"] and len(numbers["shown"][0]["boxes"]) == 4
