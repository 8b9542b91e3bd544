"""The explain figures: each is a PNG, and the numbers written on it are the trace's."""

import pytest
import torch

from fasterrcnn.explain.figures import (
    FIGURES,
    plot_anchor_labels,
    plot_roi_grid,
    plot_roi_levels,
    write_explain_figures,
    write_summary,
)
from fasterrcnn.explain.trace import explain_image

from .helpers import CLASSES, explain_model, single_map_model, synth_example

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain_viz")
    _, _, image, target = synth_example(tmp / "synth")
    trace = explain_image(explain_model(), image, target=target, class_names=CLASSES)
    out = tmp / "figures"
    figures = write_explain_figures(trace, out, level=1, score_threshold=0.2)
    return trace, out, figures


def test_every_figure_is_a_png(drawn):
    _, out, figures = drawn
    assert list(figures) == list(FIGURES)
    for name, (path, _) in figures.items():
        assert path == out / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_anchor_numbers(drawn):
    trace, _, figures = drawn
    n = figures["anchors"][1]
    lv = trace.levels[1]
    assert n["level"] == "P3" and n["stride"] == (8, 8) and n["grid"] == (16, 20)
    assert n["anchors_per_location"] == 3 and n["anchors_on_level"] == 16 * 20 * 3 == lv.anchors.shape[0]
    assert n["total_anchors"] == trace.filter_counts["anchors"]
    assert n["location"] == (80.0, 64.0)  # the cell nearest the centre of the 128x160 image
    widths = (lv.cell_anchors[:, 2] - lv.cell_anchors[:, 0]).tolist()
    heights = (lv.cell_anchors[:, 3] - lv.cell_anchors[:, 1]).tolist()
    assert [c["width"] for c in n["cell_anchors"]] == widths and [c["height"] for c in n["cell_anchors"]] == heights
    assert [(c["size"], c["ratio"]) for c in n["cell_anchors"]] == [(64.0, 0.5), (64.0, 1.0), (64.0, 2.0)]
    assert widths == [90.0, 64.0, 46.0]  # w = s / sqrt(r), rounded


def test_anchor_label_numbers(drawn):
    trace, _, figures = drawn
    n = figures["anchor_labels"][1]
    lab = trace.anchor_labels
    for key in ("positive", "negative", "ignored", "low_quality"):
        assert n[key] == lab.counts[key]
    assert n["fg_iou_thresh"] == 0.7 and n["bg_iou_thresh"] == 0.3
    assert n["gt_boxes"] == lab.gt_boxes.shape[0] == len(n["per_gt"])
    for info, row, box, label in zip(lab.per_gt, n["per_gt"], lab.gt_boxes, lab.gt_labels):
        assert row["positive"] == info.positive.numel() and row["ignored"] == info.ignored.numel()
        assert row["negative_overlapping"] == info.negative.numel() and row["best_iou"] == info.best_iou
        assert row["gt"] == box.tolist() and row["class"] == CLASSES[int(label)]
    assert sum(r["positive"] for r in n["per_gt"]) == n["positive"]


def test_objectness_and_proposal_numbers(drawn):
    trace, _, figures = drawn
    levels = figures["rpn_objectness"][1]["levels"]
    assert [x["name"] for x in levels] == [lv.name for lv in trace.levels]
    assert [x["max"] for x in levels] == [float(lv.objectness.max()) for lv in trace.levels]
    n = figures["proposals"][1]
    assert n["counts"] == trace.filter_counts
    assert n["shown_before_nms"] == min(50, trace.nms_candidates.shape[0])
    assert n["shown_after_nms"] == min(50, trace.proposals.shape[0]) and n["proposals"] == trace.proposals.shape[0]
    assert n["nms_thresh"] == 0.7 and n["pre_nms_top_n"] == 100 and n["post_nms_top_n"] == 50


def test_roi_numbers(drawn):
    trace, _, figures = drawn
    n = figures["roi_levels"][1]
    counts = torch.bincount(trace.roi_levels, minlength=4).tolist()
    assert n["counts"] == dict(zip(["P2", "P3", "P4", "P5"], counts)) and sum(counts) == trace.proposals.shape[0]
    assert n["bounds"] == [112.0, 224.0, 448.0]
    g = figures["roi_grid"][1]
    assert g["box"] == trace.roi.box.tolist() and g["level"] == trace.roi.level
    assert g["proposal_index"] == trace.roi.proposal_index and g["grid"] == (2, 2) and g["output_size"] == (7, 7)
    x1, y1, x2, y2 = g["box"]
    assert g["bin_size"] == (pytest.approx((y2 - y1) / 7, rel=1e-5), pytest.approx((x2 - x1) / 7, rel=1e-5))


def test_second_stage_and_detection_numbers(drawn):
    trace, _, figures = drawn
    scores = trace.detections["scores"]
    shown = torch.nonzero(scores >= 0.2).flatten()
    n = figures["detections"][1]
    assert n["total"] == scores.numel() and n["shown"] == shown.numel() > 0 and n["threshold"] == 0.2
    assert [d["score"] for d in n["detections"]] == sorted(scores[shown].tolist(), reverse=True)
    for d in n["detections"]:
        k = int((scores == d["score"]).nonzero()[0])
        assert d["box"] == trace.detections["boxes"][k].tolist() and d["class"] == CLASSES[d["label"]]
    pairs = figures["two_stage"][1]["pairs"]
    assert len(pairs) == min(10, shown.numel())
    for pair, det in zip(pairs, n["detections"]):
        assert pair["score"] == det["score"] and pair["label"] == det["label"]
        assert pair["proposal"] == trace.proposals[pair["proposal_index"]].tolist()
        assert pair["objectness"] == float(trace.proposal_scores[pair["proposal_index"]])
        k = int((scores == det["score"]).nonzero()[0])
        assert pair["refined"] == trace.detection_boxes_resized[k].tolist()
        assert 0.0 <= pair["iou"] <= 1.0


def test_summary_has_one_line_per_stage(drawn):
    trace, out, _ = drawn
    path, text = write_summary(trace, out, score_threshold=0.2)
    assert path.read_text() == text
    lines = [line for line in text.splitlines() if not line.startswith(" ")]  # the rest continue a stage
    assert [line.split()[0] for line in lines] == list(trace.times)
    assert all(" ms " in line for line in lines)
    c = trace.filter_counts
    assert f"anchors {c['anchors']} -> pre_nms_top_k {c['pre_nms_top_k']}" in text
    assert f"{trace.anchor_labels.counts['positive']} positive" in text


def test_figures_that_do_not_apply_are_skipped(tmp_path):
    image = torch.rand(3, 100, 140, generator=torch.Generator().manual_seed(0))
    trace = explain_image(single_map_model("roi_align"), image)
    path, numbers = plot_anchor_labels(trace, tmp_path / "anchor_labels.png")
    assert path is None and "no annotations" in numbers["note"]
    path, numbers = plot_roi_levels(trace, tmp_path / "roi_levels.png")
    assert path is None and "single feature map" in numbers["note"]
    path, numbers = plot_roi_grid(trace, tmp_path / "roi_grid.png")
    assert numbers["grid"] is not None and numbers["level"] == "C4"  # RoIAlign on one map still has a grid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roi_grid.png"]
