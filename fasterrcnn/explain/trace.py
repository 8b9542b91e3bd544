"""Explain: run a detector on one image stage by stage and keep what each stage saw and decided.

The trace is built only from the model's public stages (``preprocess``, ``features``, ``propose``,
``detect``, ``postprocess``, in the order ``FasterRCNN.forward`` runs them, eval mode, under
``torch.inference_mode``) and what the RPN and the RoI heads write into a ``Recorder``; so the
detections are exactly ``model([image])``. Everything comes back as data (an ``ExplainTrace``, on the
CPU); ``fasterrcnn.explain.figures`` draws it.

Shapes: one image [3, H0, W0]; L levels, level l has A anchors per location on an H_l x W_l grid;
N = sum_l H_l W_l A anchors; M boxes enter NMS; P proposals; K classes including background;
G ground-truth boxes; S x S pooled bins.
    preprocess     [3, H0, W0] -> resized [3, H, W] (scale H / H0), padded [1, 3, Hp, Wp]
    features       {key: [1, D, H_l, W_l]}, stride_l = Hp // H_l
    propose        objectness [A, H_l, W_l] (sigmoid) per level; anchors [N, 4];
                   decode -> top-k per level, clip, drop small, score -> [M, 4] -> NMS, top-n -> [P, 4];
                   (with ground truth) the RPN's matches on IoU [G, N]: gt index / negative / ignored
    detect         pooler level of each proposal [P]; [P, D, S, S]; class scores [P, K], refined box
                   per class [P, K, 4]; per-class NMS -> detections [D] (+ the proposal each came from)
    postprocess    detections in original pixels
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..engine.config import ConfigError
from ..model.recorder import Recorder
from ..model.single_map_pooler import SingleMapRoIPooler
from ..ops import MultiScalePooler, MultiScaleRoIPool, infer_scale
from ..ops.roi_align import roi_align_grid, sample_coordinates
from ..ops.roi_pool import roi_pool_bins

STAGES = ("preprocess", "features", "propose", "detect", "postprocess")


@dataclass
class Level:
    """One feature map as the RPN sees it."""

    name: str  # "P2".."P6" in a pyramid, "C4"/"C5" for a single map
    key: str  # its key in the features dict
    stride: tuple[int, int]  # (y, x) image pixels per cell
    size: tuple[int, int]  # (H_l, W_l)
    anchor_sizes: tuple[float, ...]
    aspect_ratios: tuple[float, ...]
    cell_anchors: torch.Tensor  # [A, 4] centred on (0, 0), ratio-major
    anchors: torch.Tensor  # [H_l * W_l * A, 4], order (y, x, anchor)
    objectness: torch.Tensor  # [A, H_l, W_l] in (0, 1)


@dataclass
class GtAnchors:
    """The anchors one ground-truth box claims or pushes away (indices into the concatenated anchors)."""

    positive: torch.Tensor  # int64 [n]: matched to this box (IoU >= fg, or its best anchors)
    positive_iou: torch.Tensor
    ignored: torch.Tensor  # between the thresholds, this box being their best
    ignored_iou: torch.Tensor
    negative: torch.Tensor  # negatives (best IoU < bg) that still overlap this box
    negative_iou: torch.Tensor
    best_anchor: int  # the anchor of highest IoU with this box
    best_iou: float
    low_quality: int  # positives with IoU < fg: kept only by the "best anchor per gt" rule


@dataclass
class AnchorLabels:
    """The RPN's training labels for every anchor, given the ground truth (resized pixels)."""

    fg_iou_thresh: float
    bg_iou_thresh: float
    gt_boxes: torch.Tensor  # [G, 4]
    gt_labels: torch.Tensor  # [G]
    labels: torch.Tensor  # [N]: 1 positive, 0 negative, -1 ignored (from the RPN's recorded matches)
    per_gt: list[GtAnchors]
    counts: dict[str, int]  # positive, negative, ignored, low_quality


@dataclass
class RoIGrid:
    """How one RoI is pooled: its bins and sampling points, in resized-image pixels.

    A feature-map coordinate is ``image * spatial_scale - offset`` (cell c's centre is at c).
    """

    proposal_index: int
    box: torch.Tensor  # [4]
    level: str
    spatial_scale: float
    offset: float  # 0.5 for aligned RoIAlign, else 0
    op: str  # "roi_align" or "roi_pool"
    output_size: tuple[int, int]  # (S_h, S_w)
    sampling_ratio: int  # as configured (<= 0: adaptive)
    grid: tuple[int, int] | None  # samples per bin (gh, gw) used; None for RoIPool
    bins_y: torch.Tensor  # [S_h, 2] (start, end)
    bins_x: torch.Tensor  # [S_w, 2]
    samples_y: torch.Tensor | None  # [S_h, gh]
    samples_x: torch.Tensor | None  # [S_w, gw]
    feature: torch.Tensor  # [H_l, W_l] the level's map, mean over channels
    pooled: torch.Tensor  # [S_h, S_w] the pooled feature, mean over channels


@dataclass
class ExplainTrace:
    original_image: torch.Tensor  # [3, H0, W0] in [0, 1]
    image: torch.Tensor  # [3, H, W] resized, in [0, 1]
    original_size: tuple[int, int]
    image_size: tuple[int, int]
    padded_size: tuple[int, int]
    scale: tuple[float, float]  # (H / H0, W / W0)
    class_names: list[str]
    levels: list[Level]
    rpn_settings: dict[str, float]  # pre_nms_top_n, post_nms_top_n, nms_thresh, min_size, score_thresh
    nms_candidates: torch.Tensor  # [M, 4] the boxes entering NMS
    nms_candidate_scores: torch.Tensor  # [M]
    nms_candidate_levels: torch.Tensor  # [M] RPN level index
    proposals: torch.Tensor  # [P, 4] after NMS and top-n
    proposal_scores: torch.Tensor  # [P]
    filter_counts: dict[str, int]  # boxes alive after each filter (the RPN's recorded rpn.counts)
    pooler: str  # what pools the RoIs, in words
    roi_level_names: list[str]  # the pooler's maps
    roi_levels: torch.Tensor | None  # [P] index into roi_level_names; None for a single map
    roi_level_bounds: list[float]  # sqrt(area) at which a RoI moves up one level
    roi: RoIGrid | None
    roi_labels: torch.Tensor  # [P] best foreground class of each proposal
    roi_scores: torch.Tensor  # [P] its probability
    refined_boxes: torch.Tensor  # [P, 4] the box refined for that class (clipped)
    box_settings: dict[str, float]  # score_thresh, nms_thresh, detections_per_img
    detections: dict[str, torch.Tensor]  # boxes (original pixels), labels, scores: model([image])[0]
    detection_boxes_resized: torch.Tensor  # [D, 4]
    detection_proposal_index: torch.Tensor  # [D] row of proposals each detection was refined from
    anchor_labels: AnchorLabels | None = None
    # Cascade R-CNN: each stage's input boxes, then the last stage's output, [P, 4] each (None: one stage)
    cascade_boxes: list[torch.Tensor] | None = None
    times: dict[str, float] = field(default_factory=dict)  # seconds per stage, in STAGES order
    notes: list[str] = field(default_factory=list)

    @property
    def num_anchors(self) -> int:
        return sum(lv.anchors.shape[0] for lv in self.levels)

    def level_index(self, level: str | int | None) -> int:
        """A level given by name ("P4") or index; None: the middle level."""
        if level is None:
            return len(self.levels) // 2
        names = [lv.name for lv in self.levels]
        if isinstance(level, str) and level.strip().lstrip("-").isdigit():
            level = int(level)
        if isinstance(level, int):
            if not -len(names) <= level < len(names):
                raise ConfigError(f"--level {level}: the model has {len(names)} levels ({', '.join(names)})")
            return level % len(names)
        for i, name in enumerate(names):
            if name.lower() == str(level).lower():
                return i
        raise ConfigError(f"--level {level!r}: not one of the model's levels {', '.join(names)}")


class _Clock:
    """Wall time per stage (synchronising a GPU before and after)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.times[name] = time.perf_counter() - start


def _level_names(strides: list[tuple[int, int]]) -> list[str]:
    prefix = "P" if len(strides) > 1 else "C"  # a pyramid's levels, or one ResNet stage's map
    return [f"{prefix}{round(math.log2(max(sy, 1)))}" for sy, _ in strides]


def roi_sampling_grid(
    box: torch.Tensor,
    *,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
    op: str = "roi_align",
    feature_size: tuple[int, int] | None = None,
) -> dict:
    """Bins and sampling points of one RoI (``box [4]``, image pixels), in image pixels, as the ops
    compute them (``ops.roi_align.roi_align_grid`` and ``sample_coordinates``, ``ops.roi_pool.roi_pool_bins``).

    A feature-map coordinate ``f`` is the image coordinate ``(f + offset) / spatial_scale`` (cell c's
    centre at c). RoIPool: bin ``p`` covers the cells ``[lo, hi)`` (clamped to ``feature_size``), shown as
    ``[lo - 0.5, hi - 0.5]``; no sampling points. -> {bins_y [S_h, 2], bins_x [S_w, 2], samples_y [S_h, gh]
    | None, samples_x [S_w, gw] | None, grid (gh, gw) | None, offset}.
    """
    oh, ow = output_size
    rois = torch.cat([box.new_zeros(1), box]).to(torch.float32)[None]  # [1, 5]: image 0
    if op == "roi_pool":
        height, width = feature_size if feature_size is not None else (2**30, 2**30)
        h_lo, h_hi, w_lo, w_hi = roi_pool_bins(rois, (oh, ow), spatial_scale, height, width)
        return {
            "samples_y": None,
            "samples_x": None,
            "grid": None,
            "offset": 0.0,
            "bins_y": torch.stack([h_lo[0], h_hi[0]], dim=1).to(torch.float32).sub(0.5) / spatial_scale,
            "bins_x": torch.stack([w_lo[0], w_hi[0]], dim=1).to(torch.float32).sub(0.5) / spatial_scale,
        }

    offset = 0.5 if aligned else 0.0
    g = roi_align_grid(rois, (oh, ow), spatial_scale, sampling_ratio, aligned)
    out = {"offset": offset, "grid": (int(g.grid_h[0]), int(g.grid_w[0]))}
    for axis, start, bin_size, grid, n in (
        ("y", g.start_y, g.bin_h, g.grid_h, oh),
        ("x", g.start_x, g.bin_w, g.grid_w, ow),
    ):
        p = torch.arange(n + 1, dtype=torch.float32)
        edges = start + p * bin_size  # the n + 1 bin edges
        samples = sample_coordinates(start, bin_size, grid, int(grid[0]), n)[0]  # [n, g]
        out[f"bins_{axis}"] = (torch.stack([edges[:-1], edges[1:]], dim=1) + offset) / spatial_scale
        out[f"samples_{axis}"] = (samples + offset) / spatial_scale
    return out


def _pooler_geometry(
    pooler, features: dict[str, torch.Tensor], image_sizes, level_names: dict[str, str]
) -> dict | None:
    """How ``pooler`` reads the RoIs: {text, keys, scales, pyramid (several maps), bounds (sqrt(area)
    where the level changes), op, output_size, sampling_ratio, aligned}; None for an unknown pooler."""
    if isinstance(pooler, MultiScalePooler):
        keys = [k for k in pooler.featmap_names if k in features]  # the maps the pooler reads (as it does)
        scales, k_min, k_max = pooler.scales_and_levels([features[k] for k in keys], image_sizes)
        bounds = [pooler.canonical_scale * 2.0 ** (k - pooler.canonical_level) for k in range(k_min + 1, k_max + 1)]
        names = [level_names.get(k, k) for k in keys]
        size = tuple(pooler.output_size)
        op = "roi_pool" if isinstance(pooler, MultiScaleRoIPool) else "roi_align"
        what = "RoIPool" if op == "roi_pool" else f"RoIAlign {size[0]}x{size[1]} (sampling {pooler.sampling_ratio})"
        text = (
            f"{what} over {', '.join(names)}: k = "
            f"floor({pooler.canonical_level} + log2(sqrt(area) / {pooler.canonical_scale})) in {k_min}..{k_max}"
        )
        return {
            "text": text,
            "keys": keys,
            "scales": scales,
            "pyramid": len(keys) > 1,
            "bounds": bounds if len(keys) > 1 else [],
            "op": op,
            "output_size": size,
            "sampling_ratio": pooler.sampling_ratio,
            "aligned": False,
        }
    if isinstance(pooler, SingleMapRoIPooler):
        key = pooler.featmap_name
        size = (pooler.output_size,) * 2 if isinstance(pooler.output_size, int) else tuple(pooler.output_size)
        what = "RoIPool" if pooler.op == "roi_pool" else f"RoIAlign (sampling {pooler.sampling_ratio})"
        text = f"{what} {size[0]}x{size[1]} on the single map {level_names.get(key, key)}"
        return {
            "text": text,
            "keys": [key],
            "scales": [infer_scale(features[key], image_sizes)],
            "pyramid": False,
            "bounds": [],
            "op": pooler.op,
            "output_size": size,
            "sampling_ratio": pooler.sampling_ratio,
            "aligned": pooler.aligned,
        }
    return None


def _anchor_labels(
    recorder: Recorder, gt_labels: torch.Tensor, fg_iou_thresh: float, bg_iou_thresh: float
) -> AnchorLabels:
    """The RPN's labels of every anchor, from the matches it recorded (1 positive, 0 negative, -1
    ignored), and per gt box the anchors its matcher gave it."""
    num_gt = gt_labels.numel()
    gt = recorder["rpn.gt_boxes"][0][:num_gt]  # the batch's padding row dropped
    iou = recorder["rpn.iou"][0][:num_gt]  # [G, N]
    matches = recorder["rpn.matches"][0]  # [N]: gt index, -1 negative, -2 ignored
    labels = (matches + 1).clamp(max=1).to(torch.float32)
    per_gt = []
    low_quality = 0
    if num_gt > 0:
        best_gt = iou.argmax(dim=0)
        for g in range(num_gt):
            pos = torch.nonzero(matches == g).flatten()
            ign = torch.nonzero((matches == -2) & (best_gt == g)).flatten()
            neg = torch.nonzero((matches == -1) & (iou[g] > 0)).flatten()
            best = int(iou[g].argmax())
            lq = int((iou[g, pos] < fg_iou_thresh).sum())
            low_quality += lq
            per_gt.append(
                GtAnchors(pos, iou[g, pos], ign, iou[g, ign], neg, iou[g, neg], best, float(iou[g, best]), lq)
            )
    counts = {
        "positive": int((labels == 1).sum()),
        "negative": int((labels == 0).sum()),
        "ignored": int((labels == -1).sum()),
        "low_quality": low_quality,
    }
    return AnchorLabels(fg_iou_thresh, bg_iou_thresh, gt, gt_labels, labels, per_gt, counts)


@torch.inference_mode()
def explain_image(
    model,
    image: torch.Tensor,
    *,
    target: dict | None = None,
    class_names: list[str] | None = None,
    roi_index: int | None = None,
    warm_up: bool = True,
) -> ExplainTrace:
    """Run ``model`` on ``image`` ([3, H, W] in [0, 1]) stage by stage. ``target``: ground truth in
    the image's pixels ({boxes [G, 4], labels [G]}) for the anchor labels. ``roi_index``: the proposal
    whose RoI grid to keep (default: the one behind the top detection, else the top proposal).
    ``warm_up``: run the model once first, so that the stage times are those of a warm model."""
    was_training = model.training
    model.eval()
    try:
        if warm_up:
            with torch.inference_mode():
                model([image.to(next(model.parameters()).device)])
        return _explain(model, image, target, class_names, roi_index)
    finally:
        model.train(was_training)


def _explain(model, image, target, class_names, roi_index) -> ExplainTrace:
    device = next(model.parameters()).device
    image = image.to(device)
    original_size = tuple(image.shape[-2:])
    clock = _Clock(device)
    recorder = Recorder()
    notes = []

    # the model's stages, as FasterRCNN.forward runs them in eval mode, with a recorder
    targets = None if target is None else [{k: v.to(device) for k, v in target.items() if k in ("boxes", "labels")}]
    with clock("preprocess"):
        image_list, targets = model.preprocess([image], targets)
    image_sizes = image_list.image_sizes
    image_size = image_sizes[0]
    with clock("features"):
        features = model.features(image_list.tensors)
    with clock("propose"):
        (proposals,), _ = model.propose(image_list, features, targets, recorder)
    with clock("detect"):
        (dets,), _ = model.detect(features, [proposals], image_sizes, recorder=recorder)
    with clock("postprocess"):
        (final,) = model.postprocess([dets], image_sizes, [original_size])

    rpn, heads = model.rpn, model.roi_heads
    anchor_labels = None
    if targets is not None:
        anchor_labels = _anchor_labels(
            recorder, targets[0]["labels"], rpn.matcher.high_threshold, rpn.matcher.low_threshold
        )

    # what each proposal became: its best foreground class and the box refined for it
    probs = recorder["roi_heads.class_scores"]  # [P, K]
    num_classes = probs.shape[-1]
    roi_scores, roi_labels = probs[:, 1:].max(dim=1)
    roi_labels = roi_labels + 1
    refined = recorder["roi_heads.boxes_per_class"][torch.arange(probs.shape[0], device=device), roi_labels]
    proposal_index = recorder["roi_heads.proposal_index"][0]
    proposal_scores = recorder["rpn.proposal_scores"][0]

    # levels: names, strides, anchors, objectness
    feats = list(features.values())
    grid_sizes = [tuple(f.shape[-2:]) for f in feats]
    gen = rpn.anchor_generator
    strides = gen.strides_for(tuple(image_list.tensors.shape[-2:]), grid_sizes)
    names = _level_names(strides)
    anchors = recorder["rpn.anchors"][0].split(recorder["rpn.num_anchors_per_level"])
    levels = []
    for i, (key, lg, anc) in enumerate(zip(features, recorder["rpn.objectness"], anchors)):
        levels.append(
            Level(
                names[i],
                key,
                tuple(strides[i]),
                grid_sizes[i],
                tuple(gen.sizes[i]),
                tuple(gen.aspect_ratios[i]),
                gen.cell_anchors[i].cpu(),
                anc.cpu(),
                torch.sigmoid(lg[0].float()).cpu(),
            )
        )
    level_names = dict(zip(features, names))

    # which map each proposal is pooled from, and one RoI's sampling grid
    pooler = heads.box_roi_pool
    pooled = recorder["roi_heads.pooled"]
    geo = _pooler_geometry(pooler, features, image_sizes, level_names)
    roi, roi_levels, roi_level_names, bounds, pooler_text = None, None, [], [], type(pooler).__name__
    if geo is None:
        notes.append(f"the pooler {pooler_text} is not one explain knows: no RoI levels or grid")
    else:
        pooler_text, bounds = geo["text"], geo["bounds"]
        roi_level_names = [level_names.get(k, k) for k in geo["keys"]]
        if geo["pyramid"]:
            roi_levels = recorder["roi_heads.roi_levels"]
        else:
            notes.append(
                f"single feature map ({roi_level_names[0]}): every RoI is pooled from it, "
                "so there is no level assignment to show"
            )
        if proposals.shape[0] > 0:
            if roi_index is None:
                roi_index = (
                    int(proposal_index[dets["scores"].argmax()])
                    if dets["scores"].numel()
                    else int(proposal_scores.argmax())
                )
            if not 0 <= roi_index < proposals.shape[0]:
                raise ConfigError(f"roi_index {roi_index}: there are {proposals.shape[0]} proposals")
            lv = 0 if roi_levels is None else int(roi_levels[roi_index])
            fmap = features[geo["keys"][lv]][0].float()
            scale = geo["scales"][lv]
            grid = roi_sampling_grid(
                proposals[roi_index].cpu(),
                output_size=geo["output_size"],
                spatial_scale=scale,
                sampling_ratio=geo["sampling_ratio"],
                aligned=geo["aligned"],
                op=geo["op"],
                feature_size=tuple(fmap.shape[-2:]),
            )
            roi = RoIGrid(
                roi_index,
                proposals[roi_index].cpu(),
                roi_level_names[lv],
                scale,
                grid["offset"],
                geo["op"],
                geo["output_size"],
                geo["sampling_ratio"],
                grid["grid"],
                grid["bins_y"],
                grid["bins_x"],
                grid["samples_y"],
                grid["samples_x"],
                fmap.mean(0).cpu(),
                pooled[roi_index].float().mean(0).cpu(),
            )
        if roi_levels is not None:
            roi_levels = roi_levels.cpu()

    # the resized image as the network saw it, without the normalisation
    mean = torch.as_tensor(model.transform.image_mean, device=device)[:, None, None]
    std = torch.as_tensor(model.transform.image_std, device=device)[:, None, None]
    h, w = image_size
    shown = (image_list.tensors[0, :, :h, :w].float() * std + mean).clamp(0, 1)

    if class_names is None:
        class_names = ["__background__"] + [f"class {i}" for i in range(1, num_classes)]
    candidates = recorder["rpn.pre_nms"][0]
    return ExplainTrace(
        original_image=image.float().cpu(),
        image=shown.cpu(),
        original_size=original_size,
        image_size=image_size,
        padded_size=tuple(image_list.tensors.shape[-2:]),
        scale=(h / original_size[0], w / original_size[1]),
        class_names=list(class_names),
        levels=levels,
        rpn_settings={
            "pre_nms_top_n": rpn.pre_nms_top_n(),
            "post_nms_top_n": rpn.post_nms_top_n(),
            "nms_thresh": rpn.nms_thresh,
            "min_size": rpn.min_size,
            "score_thresh": rpn.score_thresh,
        },
        nms_candidates=candidates["boxes"].cpu(),
        nms_candidate_scores=candidates["scores"].cpu(),
        nms_candidate_levels=candidates["levels"].cpu(),
        proposals=proposals.cpu(),
        proposal_scores=proposal_scores.cpu(),
        filter_counts=dict(recorder["rpn.counts"][0]),
        pooler=pooler_text,
        roi_level_names=roi_level_names,
        roi_levels=roi_levels,
        roi_level_bounds=bounds,
        roi=roi,
        roi_labels=roi_labels.cpu(),
        roi_scores=roi_scores.cpu(),
        refined_boxes=refined.cpu(),
        box_settings={
            "score_thresh": heads.score_thresh,
            "nms_thresh": heads.nms_thresh,
            "detections_per_img": heads.detections_per_img,
        },
        detections={k: final[k].cpu() for k in ("boxes", "labels", "scores")},
        detection_boxes_resized=dets["boxes"].cpu(),
        detection_proposal_index=proposal_index.cpu(),
        anchor_labels=None if anchor_labels is None else _to_cpu(anchor_labels),
        cascade_boxes=(
            [b[0].cpu() for b in recorder["roi_heads.cascade_boxes"]] if "roi_heads.cascade_boxes" in recorder else None
        ),
        times={k: clock.times[k] for k in STAGES if k in clock.times},
        notes=notes,
    )


def _gt_to_cpu(g: GtAnchors) -> GtAnchors:
    """``g`` with every tensor field on the CPU, the numbers as they are."""
    tensors: dict[str, Any] = {k: v.cpu() for k, v in vars(g).items() if isinstance(v, torch.Tensor)}
    return replace(g, **tensors)


def _to_cpu(labels: AnchorLabels) -> AnchorLabels:
    per_gt = [_gt_to_cpu(g) for g in labels.per_gt]
    return AnchorLabels(
        labels.fg_iou_thresh,
        labels.bg_iou_thresh,
        labels.gt_boxes.cpu(),
        labels.gt_labels.cpu(),
        labels.labels.cpu(),
        per_gt,
        labels.counts,
    )


# ---- the whole command ------------------------------------------------------------------------------


@dataclass
class Explanation:
    trace: ExplainTrace
    figures: dict  # name -> (path, numbers written on it)
    summary: str
    summary_path: Path


def explain(
    model,
    image: torch.Tensor,
    out_dir,
    *,
    target: dict | None = None,
    class_names: list[str] | None = None,
    level: str | int | None = None,
    score_threshold: float = 0.5,
    roi_index: int | None = None,
) -> Explanation:
    """Trace ``image`` through ``model`` and write one figure per stage and summary.txt into ``out_dir``."""
    from .figures import write_explain_figures, write_summary

    trace = explain_image(model, image, target=target, class_names=class_names, roi_index=roi_index)
    level_index = trace.level_index(level)
    figures = write_explain_figures(trace, out_dir, level=level_index, score_threshold=score_threshold)
    summary_path, text = write_summary(trace, out_dir, score_threshold=score_threshold)
    return Explanation(trace, figures, text, summary_path)
