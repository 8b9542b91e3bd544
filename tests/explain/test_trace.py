"""explain_image: the trace holds what the model's own stages computed, and the detections are model([image])."""

import math

import pytest
import torch

from fasterrcnn.explain.trace import STAGES, explain_image, roi_sampling_grid
from fasterrcnn.model.transform import resize_boxes
from fasterrcnn.ops import assign_fpn_levels, box_iou

from .helpers import CLASSES, explain_model, single_map_model, synth_example


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    paths, image_path, image, target = synth_example(tmp_path_factory.mktemp("explain") / "synth")
    model = explain_model()
    trace = explain_image(model, image, target=target, class_names=CLASSES)
    return model, image, target, trace


def test_detections_are_exactly_the_models(example):
    model, image, _, trace = example
    with torch.inference_mode():
        expected = model([image])[0]
    assert expected["scores"].numel() > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(trace.detections[key], expected[key]), key
    # the same boxes in the resized image, and the way back
    assert trace.scale == (128 / 96, 160 / 120) and trace.image_size == (128, 160)
    back = resize_boxes(trace.detection_boxes_resized, trace.image_size, trace.original_size)
    assert torch.equal(back, trace.detections["boxes"])
    assert not model.training


def test_filter_counts_and_proposals_are_the_propose_stages(example):
    model, image, _, trace = example
    with torch.inference_mode():  # the stages again, without a recorder
        images, _ = model.preprocess([image])
        features = model.features(images.tensors)
        (proposals,), losses = model.propose(images, features)
        anchors = model.rpn.anchor_generator(images.tensors, list(features.values()))
    assert losses == {}
    assert torch.equal(trace.proposals, proposals)
    stats = trace.filter_counts
    assert list(stats) == [
        "anchors",
        "pre_nms_top_k",
        "after_small_box_removal",
        "after_score_threshold",
        "after_nms",
        "post_nms_top_n",
    ]
    assert stats["anchors"] == trace.num_anchors == sum(lv.size[0] * lv.size[1] * 3 for lv in trace.levels)
    assert stats["pre_nms_top_k"] == sum(min(100, lv.anchors.shape[0]) for lv in trace.levels)
    assert stats["pre_nms_top_k"] >= stats["after_small_box_removal"] >= stats["after_score_threshold"]
    assert stats["after_score_threshold"] >= stats["after_nms"] >= stats["post_nms_top_n"] == proposals.shape[0]
    assert stats["after_nms"] > stats["post_nms_top_n"] or stats["after_nms"] < stats["after_score_threshold"]
    assert trace.nms_candidates.shape[0] == stats["after_score_threshold"]
    # every proposal is one of the candidates, with its score and level; best first within a level's NMS
    for box, score in zip(trace.proposals, trace.proposal_scores):
        hit = torch.nonzero((trace.nms_candidates == box).all(dim=1)).flatten()
        assert hit.numel() >= 1 and float(trace.nms_candidate_scores[hit[0]]) == float(score)
    assert all(
        torch.equal(lv.anchors, a)
        for lv, a in zip(trace.levels, anchors[0].split([lv.anchors.shape[0] for lv in trace.levels]))
    )


def test_levels_strides_and_objectness(example):
    _, _, _, trace = example
    assert [lv.name for lv in trace.levels] == ["P2", "P3", "P4", "P5", "P6"]
    assert [lv.size for lv in trace.levels] == [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    assert [lv.stride[0] for lv in trace.levels] == [4, 8, 16, 32, 64]
    for lv in trace.levels:
        assert lv.objectness.shape == (3, *lv.size)
        assert ((lv.objectness > 0) & (lv.objectness < 1)).all()
    assert trace.levels[0].anchor_sizes == (32,) and trace.levels[0].aspect_ratios == (0.5, 1.0, 2.0)


def test_anchor_labels_equal_a_plain_recomputation(example):
    _, _, target, trace = example
    fg, bg = 0.7, 0.3  # the RPN's thresholds (Ren et al. 2015)
    anchors = torch.cat([lv.anchors for lv in trace.levels])
    gt = resize_boxes(target["boxes"], trace.original_size, trace.image_size)
    iou = box_iou(gt, anchors)  # [G, N]
    best, best_gt = iou.max(dim=0)
    best_per_gt = iou.max(dim=1).values
    is_best = ((iou == best_per_gt[:, None]) & (best_per_gt[:, None] > 0)).any(dim=0)
    positive = (best >= fg) | is_best
    negative = (best < bg) & ~positive
    ignored = ~positive & ~negative
    lab = trace.anchor_labels
    assert lab.fg_iou_thresh == fg and lab.bg_iou_thresh == bg
    assert torch.allclose(lab.gt_boxes, gt)
    assert lab.counts["positive"] == int(positive.sum()) > 0
    assert lab.counts["negative"] == int(negative.sum())
    assert lab.counts["ignored"] == int(ignored.sum())
    assert lab.counts["low_quality"] == int((positive & (best < fg)).sum())
    assert torch.equal(lab.labels == 1, positive)
    for g, info in enumerate(lab.per_gt):
        assert torch.equal(info.positive, torch.nonzero(positive & (best_gt == g)).flatten())
        assert torch.equal(info.ignored, torch.nonzero(ignored & (best_gt == g)).flatten())
        assert torch.equal(info.negative, torch.nonzero(negative & (iou[g] > 0)).flatten())
        assert info.best_iou == pytest.approx(float(best_per_gt[g]))
        assert float(iou[g, info.best_anchor]) == pytest.approx(float(best_per_gt[g]))


def test_level_assignment_is_the_poolers(example):
    model, _, _, trace = example
    assert trace.roi_level_names == ["P2", "P3", "P4", "P5"]
    assert torch.equal(trace.roi_levels, assign_fpn_levels(trace.proposals, 2, 5))
    assert trace.roi_level_bounds == [112.0, 224.0, 448.0]


def test_second_stage_pairs_proposals_and_refined_boxes(example):
    _, _, _, trace = example
    d = trace.detections["scores"].numel()
    assert trace.detection_proposal_index.shape == (d,)
    assert int(trace.detection_proposal_index.max()) < trace.proposals.shape[0]
    assert trace.refined_boxes.shape == trace.proposals.shape
    # a detection of its proposal's best class is that proposal's refined box
    same = 0
    for k in range(d):
        r = int(trace.detection_proposal_index[k])
        if int(trace.roi_labels[r]) == int(trace.detections["labels"][k]):
            assert torch.equal(trace.refined_boxes[r], trace.detection_boxes_resized[k])
            assert float(trace.roi_scores[r]) == float(trace.detections["scores"][k])
            same += 1
    assert same > 0


def test_roi_grid_of_the_top_detection_samples_the_pooled_feature(example):
    _, _, _, trace = example
    roi = trace.roi
    top = int(trace.detection_proposal_index[trace.detections["scores"].argmax()])
    assert roi.proposal_index == top and torch.equal(roi.box, trace.proposals[top])
    level = int(trace.roi_levels[top])
    assert roi.level == trace.roi_level_names[level] and roi.spatial_scale == 2.0 ** -(level + 2)
    assert roi.output_size == (7, 7) and roi.grid == (2, 2) and roi.op == "roi_align"
    # the pooled feature (mean over channels) is the mean of the bilinear samples at the grid's points
    # (the mean over channels commutes with the interpolation), read as RoIAlign reads them
    fmap = roi.feature
    height, width = fmap.shape

    def bilinear(y, x):
        if y < -1 or y > height or x < -1 or x > width:
            return 0.0
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = min(int(math.floor(y)), height - 1), min(int(math.floor(x)), width - 1)
        y = float(y0) if y0 >= height - 1 else y
        x = float(x0) if x0 >= width - 1 else x
        y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
        ly, lx = y - y0, x - x0
        return float(
            (1 - ly) * (1 - lx) * fmap[y0, x0]
            + (1 - ly) * lx * fmap[y0, x1]
            + ly * (1 - lx) * fmap[y1, x0]
            + ly * lx * fmap[y1, x1]
        )

    s = roi.spatial_scale
    for p in range(7):
        for q in range(7):
            values = [bilinear(float(ys) * s, float(xs) * s) for ys in roi.samples_y[p] for xs in roi.samples_x[q]]
            assert float(roi.pooled[p, q]) == pytest.approx(sum(values) / len(values), abs=1e-4)


def test_roi_sampling_grid_by_hand():
    box = torch.tensor([10.0, 20.0, 66.0, 48.0])
    # RoIAlign at scale 1/4: x from 2.5 to 16.5 (bins of 2 cells), y from 5 to 12 (bins of 1 cell)
    g = roi_sampling_grid(box, output_size=(7, 7), spatial_scale=0.25, sampling_ratio=2)
    p = torch.arange(7.0)
    assert torch.allclose(g["bins_x"], torch.stack([10 + 8 * p, 18 + 8 * p], dim=1))
    assert torch.allclose(g["bins_y"], torch.stack([20 + 4 * p, 24 + 4 * p], dim=1))
    # samples at a quarter and three quarters of each bin: (2.5 + 2p + 0.5) / 0.25 and (2.5 + 2p + 1.5) / 0.25
    assert torch.allclose(g["samples_x"], torch.stack([12 + 8 * p, 16 + 8 * p], dim=1))
    assert torch.allclose(g["samples_y"], torch.stack([21 + 4 * p, 23 + 4 * p], dim=1))
    assert g["grid"] == (2, 2)
    # adaptive: ceil(14 / 7) = 2 samples across, ceil(7 / 7) = 1 down (the bin centre)
    g = roi_sampling_grid(box, output_size=(7, 7), spatial_scale=0.25, sampling_ratio=0)
    assert g["grid"] == (1, 2) and torch.allclose(g["samples_y"][:, 0], 22 + 4 * p)
    # RoIPool: x cells round(2.5) = 3 .. round(16.5) = 17 (C rounding), 15 cells over 7 bins
    g = roi_sampling_grid(
        box, output_size=(7, 7), spatial_scale=0.25, sampling_ratio=0, op="roi_pool", feature_size=(32, 40)
    )
    lo = torch.floor(p * 15 / 7) + 3
    hi = torch.ceil((p + 1) * 15 / 7) + 3
    assert torch.allclose(g["bins_x"], torch.stack([(lo - 0.5) * 4, (hi - 0.5) * 4], dim=1))
    assert g["bins_x"][0].tolist() == [10.0, 22.0] and g["samples_x"] is None and g["grid"] is None


def test_times_and_stages(example):
    _, image, _, trace = example
    assert list(trace.times) == list(STAGES) == ["preprocess", "features", "propose", "detect", "postprocess"]
    assert all(t >= 0 for t in trace.times.values())
    plain = explain_image(explain_model(), image)
    assert plain.anchor_labels is None and list(plain.times) == list(STAGES)
    assert plain.class_names[1] == "class 1"


def test_single_map_model_has_no_level_assignment():
    image = torch.rand(3, 100, 140, generator=torch.Generator().manual_seed(0))
    model = single_map_model("roi_pool")
    trace = explain_image(
        model, image, target={"boxes": torch.tensor([[10.0, 10.0, 70.0, 60.0]]), "labels": torch.tensor([1])}
    )
    with torch.inference_mode():
        expected = model([image])[0]
    assert all(torch.equal(trace.detections[k], expected[k]) for k in expected)
    assert [lv.name for lv in trace.levels] == ["C4"] and trace.levels[0].cell_anchors.shape == (9, 4)
    assert trace.roi_levels is None and trace.roi_level_names == ["C4"]
    assert any("single feature map" in n for n in trace.notes)
    assert trace.roi.op == "roi_pool" and trace.roi.samples_x is None and trace.roi.output_size == (7, 7)
