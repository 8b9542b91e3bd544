"""The model's public stages and its recorder: forward is the composition of preprocess, features,
propose, detect and postprocess; a recorder holds what the RPN and the RoI heads did, consistently
with the stages' outputs; without one nothing is recorded."""

import pytest
import torch

from fasterrcnn.model.recorder import Recorder
from fasterrcnn.model.transform import resize_boxes
from fasterrcnn.ops import box_iou

from .helpers import sample_batch, tiny_model


def decisive_model(**overrides):
    """A tiny model with sharp heads: many boxes above the thresholds, so that every filter has work."""
    torch.manual_seed(0)
    model = tiny_model(box_score_thresh=0.02, box_detections_per_img=15, **overrides)
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.mul_(30.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
    return model


def seeded(targets):
    """Targets with a sample_seed: the samplers draw from per-image generators, the same in every run."""
    return [{**t, "sample_seed": 7 + i} for i, t in enumerate(targets)]


def run_stages(model, images, targets=None, recorder=None):
    image_list, targets = model.preprocess(images, targets)
    features = model.features(image_list.tensors)
    proposals, rpn_losses = model.propose(image_list, features, targets, recorder)
    detections, head_losses = model.detect(features, proposals, image_list.image_sizes, targets, recorder)
    return image_list, proposals, detections, {**rpn_losses, **head_losses}


def test_training_forward_is_the_composition_of_the_stages():
    model = decisive_model().train()
    images, targets = sample_batch()
    targets = seeded(targets)
    want = model(images, targets)
    _, _, detections, got = run_stages(model, images, targets)
    assert detections == [] and list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # and with a recorder the losses do not change
    _, _, _, recorded = run_stages(model, images, targets, Recorder())
    assert all(torch.equal(recorded[k], want[k]) for k in want)


def test_eval_forward_is_the_composition_of_the_stages():
    model = decisive_model().eval()
    images, _ = sample_batch(sizes=((120, 160), (100, 130), (150, 90)))
    with torch.inference_mode():
        want = model(images)
        image_list, _, detections, losses = run_stages(model, images, recorder=Recorder())
        got = model.postprocess(detections, image_list.image_sizes, [tuple(im.shape[-2:]) for im in images])
    assert losses == {} and sum(d["scores"].numel() for d in want) > 10
    for w, g in zip(want, got):
        assert list(g) == ["boxes", "scores", "labels"]
        for key in w:
            assert torch.equal(w[key], g[key]), key


def test_without_a_recorder_nothing_is_recorded(monkeypatch):
    def refuse(self, name, value):
        raise AssertionError(f"recorded {name} without a recorder")

    monkeypatch.setattr(Recorder, "put", refuse)
    model = decisive_model()
    images, targets = sample_batch()
    model.train()(images, seeded(targets))
    with torch.inference_mode():
        model.eval()(images)


def test_each_stage_records_only_its_own():
    model = decisive_model().eval()
    images, _ = sample_batch()
    rpn_only = Recorder()
    with torch.inference_mode():
        image_list, _ = model.preprocess(images)
        features = model.features(image_list.tensors)
        proposals, _ = model.propose(image_list, features, recorder=rpn_only)
        model.detect(features, proposals, image_list.image_sizes)
    assert rpn_only.records and all(name.startswith("rpn.") for name in rpn_only.records)
    assert "rpn.matches" not in rpn_only  # no targets, no matching
    with pytest.raises(KeyError, match="nothing recorded as 'roi_heads.pooled'"):
        rpn_only["roi_heads.pooled"]


def test_recorded_inference_is_consistent_with_the_stages_outputs():
    model = decisive_model().eval()
    images, targets = sample_batch(sizes=((120, 160), (100, 130), (150, 90)))
    rec = Recorder()
    with torch.inference_mode():
        image_list, proposals, detections, losses = run_stages(model, images, targets, rec)
    assert losses == {}  # eval mode: targets only make the RPN record its matches
    num_anchors = sum(rec["rpn.num_anchors_per_level"])
    assert [a.shape for a in rec["rpn.anchors"]] == [(num_anchors, 4)] * 3
    assert rec["rpn.matches"].shape == (3, num_anchors) and rec["rpn.iou"].shape[::2] == (3, num_anchors)
    for i, p in enumerate(proposals):
        assert torch.equal(rec["rpn.proposals"][i], p)
        counts = rec["rpn.counts"][i]
        assert counts["post_nms_top_n"] == p.shape[0] and counts["anchors"] == num_anchors
        assert counts["after_score_threshold"] == rec["rpn.pre_nms"][i]["boxes"].shape[0] >= counts["after_nms"]
        # each proposal entered NMS, with its score and level
        pre = rec["rpn.pre_nms"][i]
        for box, score, level in zip(p, rec["rpn.proposal_scores"][i], rec["rpn.proposal_levels"][i]):
            hit = torch.nonzero((pre["boxes"] == box).all(dim=1) & (pre["levels"] == level)).flatten()
            assert hit.numel() >= 1 and float(pre["scores"][hit[0]]) == float(score)
        # the RPN's matches are its matcher's on the recorded IoU, the gt boxes resized by preprocess
        g = targets[i]["boxes"].shape[0]
        resized = resize_boxes(targets[i]["boxes"], tuple(images[i].shape[-2:]), image_list.image_sizes[i])
        assert torch.equal(rec["rpn.gt_boxes"][i][:g], resized)
        iou = box_iou(rec["rpn.gt_boxes"][i][:g], rec["rpn.anchors"][i])
        torch.testing.assert_close(rec["rpn.iou"][i][:g], iou, rtol=0, atol=1e-6)
        best = iou.max(dim=0).values
        assert bool((rec["rpn.matches"][i][best >= 0.7] >= 0).all())
        assert bool((rec["rpn.matches"][i][(best < 0.3) & (rec["rpn.matches"][i] < 0)] == -1).all())

    # the second stage: one row per proposal; each detection comes from a proposal that decodes to it
    num_rois = sum(p.shape[0] for p in proposals)
    assert torch.equal(torch.cat(rec["roi_heads.proposals"]), torch.cat(proposals))
    assert rec["roi_heads.class_scores"].shape == (num_rois, 4)
    assert rec["roi_heads.boxes_per_class"].shape == (num_rois, 4, 4)
    assert rec["roi_heads.roi_levels"].shape == (num_rois,) and int(rec["roi_heads.roi_levels"].max()) <= 3
    first_row = 0
    found = 0
    for i, (p, det) in enumerate(zip(proposals, detections)):
        index = rec["roi_heads.proposal_index"][i]
        assert index.shape == det["scores"].shape and (index.numel() == 0 or int(index.max()) < p.shape[0])
        rows = first_row + index
        refined = rec["roi_heads.boxes_per_class"][rows, det["labels"]]
        torch.testing.assert_close(refined, det["boxes"], rtol=0, atol=1e-4)
        assert torch.equal(rec["roi_heads.class_scores"][rows, det["labels"]], det["scores"])
        found += det["scores"].numel()
        first_row += p.shape[0]
    assert found > 10


def test_recorded_training_samples_are_consistent():
    model = decisive_model().train()
    images, targets = sample_batch()
    rec = Recorder()
    run_stages(model, images, seeded(targets), rec)
    matches = rec["rpn.matches"]
    for i in range(len(images)):
        pos, neg = rec["rpn.sampled_positive"][i], rec["rpn.sampled_negative"][i]
        assert pos.numel() + neg.numel() <= model.rpn.sampler.batch_size_per_image and pos.numel() > 0
        assert bool((matches[i][pos] >= 0).all()) and bool((matches[i][neg] == -1).all())
        assert len(set(pos.tolist()) | set(neg.tolist())) == pos.numel() + neg.numel()
    # the RoI heads' sample: rows of each image's proposals followed by its (resized) gt boxes
    for i, (index, labels, boxes) in enumerate(
        zip(rec["roi_heads.sampled_index"], rec["roi_heads.sampled_labels"], rec["roi_heads.proposals"])
    ):
        candidates = torch.cat([rec["rpn.proposals"][i], rec["rpn.gt_boxes"][i][: targets[i]["boxes"].shape[0]]])
        assert torch.equal(boxes, candidates[index])
        assert labels.shape == index.shape and bool((labels > 0).any()) and bool((labels == 0).any())
    assert rec["roi_heads.class_scores"].shape[0] == sum(b.shape[0] for b in rec["roi_heads.proposals"])
    assert "roi_heads.proposal_index" not in rec  # no detections in training


def test_targets_given_in_eval_mode_are_checked_too():
    model = decisive_model().eval()
    images, targets = sample_batch()
    with pytest.raises(KeyError, match=r"targets\[1\] has no 'labels'"):
        model(images, [targets[0], {"boxes": targets[1]["boxes"]}])
    with pytest.raises(KeyError, match="nothing recorded as 'rpn.matches'; recorded: "):
        Recorder()["rpn.matches"]
