"""Explain: run a detector on one image stage by stage and keep what each stage saw and decided.

The stages are the model's own modules and methods, called in the order ``FasterRCNN.forward`` calls
them (eval mode, under ``torch.inference_mode``), so the detections are exactly ``model([image])``.
Everything comes back as data (an ``ExplainTrace``, on the CPU); ``fasterrcnn.explain.figures`` draws it.

Shapes: one image [3, H0, W0]; L levels, level l has A anchors per location on an H_l x W_l grid;
N = sum_l H_l W_l A anchors; M boxes enter NMS; P proposals; K classes including background;
G ground-truth boxes; S x S pooled bins.
    transform      [3, H0, W0] -> resized [3, H, W] (scale H / H0), padded [1, 3, Hp, Wp]
    backbone       {key: [1, D, H_l, W_l]}, stride_l = Hp // H_l
    rpn head       objectness [A, H_l, W_l] (sigmoid) per level; anchors [N, 4]
    proposals      decode -> top-k per level, clip, drop small, score -> [M, 4] -> NMS, top-n -> [P, 4]
    anchor labels  (with ground truth) the RPN's matcher on IoU [G, N]: gt index / negative / ignored
    roi pooling    pooler level of each proposal [P]; [P, D, S, S]
    box head       class scores [P, K], refined box per class [P, K, 4]
    postprocess    per-class NMS -> detections [D] (+ the proposal each came from), original pixels
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.rpn import flatten_head_outputs
from ..model.single_map_pooler import SingleMapRoIPooler
from ..model.input_checks import check_images
from ..ops import MultiScaleRoIAlign, assign_fpn_levels, box_iou, clip_boxes_to_image
from ..engine.config import ConfigError

STAGES = ("transform", "backbone", "rpn_head", "anchors", "proposals", "anchor_labels",
          "roi_pooling", "box_head", "postprocess")


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
    labels: torch.Tensor  # [N]: 1 positive, 0 negative, -1 ignored (rpn.assign_targets)
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
    filter_counts: dict[str, int]  # rpn.filter_proposals(return_stats=True)
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


def roi_sampling_grid(box: torch.Tensor, *, output_size: tuple[int, int], spatial_scale: float,
                      sampling_ratio: int, aligned: bool = False, op: str = "roi_align",
                      feature_size: tuple[int, int] | None = None) -> dict:
    """Bins and sampling points of one RoI (``box [4]``, image pixels), in image pixels.

    RoIAlign (ops/roi_align.py): ``start = x1 * s - offset``, ``roi = x2 * s - offset - start`` (at
    least 1 unless aligned), ``bin = roi / S``, ``g = sampling_ratio`` or ``ceil(roi / S)``; sample
    ``i`` of bin ``p`` at ``start + p * bin + (i + 0.5) * bin / g``. RoIPool (ops/roi_pool.py): corners
    rounded to cells, bin ``p`` covers cells ``[floor(p * bin), ceil((p + 1) * bin))`` from the start
    (clamped to ``feature_size``), no sampling points. -> {bins_y [S_h, 2], bins_x [S_w, 2],
    samples_y [S_h, gh] | None, samples_x [S_w, gw] | None, grid (gh, gw) | None, offset}.
    """
    oh, ow = output_size
    box = box.to(torch.float32)
    if op == "roi_pool":
        def c_round(v):  # C's round: halves away from zero
            return torch.sign(v) * torch.floor(v.abs() + 0.5)

        out = {"samples_y": None, "samples_x": None, "grid": None, "offset": 0.0}
        for axis, (lo_i, hi_i), n, limit in (("x", (0, 2), ow, None if feature_size is None else feature_size[1]),
                                            ("y", (1, 3), oh, None if feature_size is None else feature_size[0])):
            start = c_round(box[lo_i] * spatial_scale)
            end = c_round(box[hi_i] * spatial_scale)
            length = torch.clamp(end - start + 1, min=1)
            p = torch.arange(n, dtype=torch.float32)
            lo = torch.floor(p * length / n) + start
            hi = torch.ceil((p + 1) * length / n) + start
            if limit is not None:
                lo, hi = lo.clamp(0, limit), hi.clamp(0, limit)
            # cells [lo, hi) span feature coordinates [lo - 0.5, hi - 0.5]
            out[f"bins_{axis}"] = torch.stack([lo - 0.5, hi - 0.5], dim=1) / spatial_scale
        return out

    offset = 0.5 if aligned else 0.0
    out = {"offset": offset}
    grid = []
    for axis, (lo_i, hi_i), n in (("y", (1, 3), oh), ("x", (0, 2), ow)):
        start = box[lo_i] * spatial_scale - offset
        length = box[hi_i] * spatial_scale - offset - start
        if not aligned:
            length = torch.clamp(length, min=1.0)
        bin_size = length / n
        g = sampling_ratio if sampling_ratio > 0 else max(int(math.ceil(float(length) / n)), 1)
        grid.append(g)
        p = torch.arange(n, dtype=torch.float32)
        i = torch.arange(g, dtype=torch.float32)
        edges = torch.stack([start + p * bin_size, start + (p + 1) * bin_size], dim=1)
        samples = (start + p[:, None] * bin_size) + (i[None, :] + 0.5) * bin_size / g
        out[f"bins_{axis}"] = (edges + offset) / spatial_scale
        out[f"samples_{axis}"] = (samples + offset) / spatial_scale
    out["grid"] = tuple(grid)
    return out


def _pooler_geometry(pooler, features: dict[str, torch.Tensor], image_sizes, level_names: dict[str, str],
                     boxes: torch.Tensor) -> dict | None:
    """How ``pooler`` reads ``boxes`` [P, 4]: {text, keys, scales, levels [P] or None, bounds (sqrt(area)
    where the level changes), op, output_size, sampling_ratio, aligned}; None for an unknown pooler."""
    if isinstance(pooler, MultiScaleRoIAlign):
        keys = list(pooler.featmap_names)
        scales, k_min, k_max = pooler.scales_and_levels([features[k] for k in keys], image_sizes)
        levels, bounds = None, []
        if len(keys) > 1:  # the pooler's own rule (ops/poolers.py), on the boxes it is given
            levels = assign_fpn_levels(boxes, k_min, k_max, pooler.canonical_scale, pooler.canonical_level)
            bounds = [pooler.canonical_scale * 2.0 ** (k - pooler.canonical_level) for k in range(k_min + 1, k_max + 1)]
        names = [level_names.get(k, k) for k in keys]
        size = tuple(pooler.output_size)
        text = (f"RoIAlign {size[0]}x{size[1]} (sampling {pooler.sampling_ratio}) over {', '.join(names)}: k = "
                f"floor({pooler.canonical_level} + log2(sqrt(area) / {pooler.canonical_scale})) in {k_min}..{k_max}")
        return {"text": text, "keys": keys, "scales": scales, "levels": levels, "bounds": bounds, "op": "roi_align",
                "output_size": size, "sampling_ratio": pooler.sampling_ratio, "aligned": False}
    if isinstance(pooler, SingleMapRoIPooler):
        key = pooler.featmap_name
        scale = pooler.infer_scale(features[key], image_sizes)
        size = (pooler.output_size,) * 2 if isinstance(pooler.output_size, int) else tuple(pooler.output_size)
        what = "RoIPool" if pooler.op == "roi_pool" else f"RoIAlign (sampling {pooler.sampling_ratio})"
        text = f"{what} {size[0]}x{size[1]} on the single map {level_names.get(key, key)}"
        return {"text": text, "keys": [key], "scales": [scale], "levels": None, "bounds": [], "op": pooler.op,
                "output_size": size, "sampling_ratio": pooler.sampling_ratio, "aligned": pooler.aligned}
    return None


def _anchor_labels(rpn, anchors: torch.Tensor, target: dict) -> AnchorLabels:
    """The RPN's own labels (rpn.assign_targets) and, per gt box, the anchors its matcher gives it."""
    gt = target["boxes"].to(anchors)
    gt_labels = target["labels"]
    (labels,), _ = rpn.assign_targets([anchors], [{"boxes": gt}])
    matcher = rpn.matcher
    per_gt = []
    low_quality = 0
    if gt.shape[0] > 0:
        iou = box_iou(gt, anchors)  # [G, N]
        matches = matcher(iou)  # gt index, -1 negative, -2 ignored
        best_gt = iou.argmax(dim=0)
        for g in range(gt.shape[0]):
            pos = torch.nonzero(matches == g).flatten()
            ign = torch.nonzero((matches == -2) & (best_gt == g)).flatten()
            neg = torch.nonzero((matches == -1) & (iou[g] > 0)).flatten()
            best = int(iou[g].argmax())
            lq = int((iou[g, pos] < matcher.high_threshold).sum())
            low_quality += lq
            per_gt.append(GtAnchors(pos, iou[g, pos], ign, iou[g, ign], neg, iou[g, neg], best,
                                    float(iou[g, best]), lq))
    counts = {"positive": int((labels == 1).sum()), "negative": int((labels == 0).sum()),
              "ignored": int((labels == -1).sum()), "low_quality": low_quality}
    return AnchorLabels(matcher.high_threshold, matcher.low_threshold, gt, gt_labels, labels, per_gt, counts)


@torch.inference_mode()
def explain_image(model, image: torch.Tensor, *, target: dict | None = None, class_names: list[str] | None = None,
                  roi_index: int | None = None, warm_up: bool = True) -> ExplainTrace:
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
    check_images([image])
    device = next(model.parameters()).device
    image = image.to(device)
    original_size = tuple(image.shape[-2:])
    clock = _Clock(device)
    rpn, heads = model.rpn, model.roi_heads
    notes = []

    with clock("transform"):
        targets = None if target is None else [{k: v.to(device) for k, v in target.items()
                                                 if k in ("boxes", "labels")}]
        image_list, targets = model.transform([image], targets)
    image_sizes = image_list.image_sizes
    image_size = image_sizes[0]
    with clock("backbone"):
        features = model.features(image_list.tensors)
    feats = list(features.values())

    # the RPN, as RegionProposalNetwork.forward runs it in eval mode
    with clock("rpn_head"):
        logits, deltas = rpn.head(feats)
    with clock("anchors"):
        anchors = rpn.anchor_generator(image_list.tensors, feats)
    num_anchors_per_level = [lg[0].numel() for lg in logits]
    with clock("proposals"):
        objectness, flat_deltas = flatten_head_outputs(logits, deltas)
        decoded = rpn.box_coder.decode(flat_deltas.detach().reshape(-1, 4), torch.cat(anchors)).view(1, -1, 4)
        result, stats = rpn.filter_proposals(decoded, objectness, image_sizes, num_anchors_per_level,
                                             return_stats=True)
    proposals, proposal_scores = result[0]
    candidates = rpn.nms_candidates(decoded, objectness, image_sizes, num_anchors_per_level)[0]

    anchor_labels = None
    if targets is not None:
        with clock("anchor_labels"):
            anchor_labels = _anchor_labels(rpn, anchors[0], targets[0])

    # the second stage, as RoIHeads.forward runs it in eval mode
    with clock("roi_pooling"):
        pooled = heads.box_roi_pool(features, [proposals], image_sizes)
    with clock("box_head"):
        class_logits, box_deltas = heads.box_predictor(heads.box_head(pooled))
    with clock("postprocess"):
        (dets,) = heads.postprocess_detections(class_logits, box_deltas, [proposals], image_sizes,
                                               return_proposal_index=True)
        (final,) = model.transform.postprocess([dets], image_sizes, [original_size])

    # what each proposal became: its best foreground class and the box refined for it
    num_classes = class_logits.shape[-1]
    probs = F.softmax(class_logits, dim=-1)
    roi_scores, roi_labels = probs[:, 1:].max(dim=1)
    roi_labels = roi_labels + 1
    per_class = heads.box_coder.decode(box_deltas, proposals).reshape(-1, num_classes, 4)
    per_class = clip_boxes_to_image(per_class, image_size)
    refined = per_class[torch.arange(per_class.shape[0], device=device), roi_labels]

    # levels: names, strides, anchors, objectness
    grid_sizes = [tuple(f.shape[-2:]) for f in feats]
    strides = rpn.anchor_generator.strides_for(tuple(image_list.tensors.shape[-2:]), grid_sizes)
    names = _level_names(strides)
    gen = rpn.anchor_generator
    levels = []
    for i, (key, lg, anc) in enumerate(zip(features, logits, anchors[0].split(num_anchors_per_level))):
        levels.append(Level(names[i], key, tuple(strides[i]), grid_sizes[i], tuple(gen.sizes[i]),
                            tuple(gen.aspect_ratios[i]), gen.cell_anchors[i].cpu(), anc.cpu(),
                            torch.sigmoid(lg[0].float()).cpu()))
    level_names = dict(zip(features, names))

    # which map each proposal is pooled from, and one RoI's sampling grid
    pooler = heads.box_roi_pool
    geo = _pooler_geometry(pooler, features, image_sizes, level_names, proposals.to(pooled.dtype))
    roi, roi_levels, roi_level_names, bounds, pooler_text = None, None, [], [], type(pooler).__name__
    if geo is None:
        notes.append(f"the pooler {pooler_text} is not one explain knows: no RoI levels or grid")
    else:
        pooler_text, roi_levels, bounds = geo["text"], geo["levels"], geo["bounds"]
        roi_level_names = [level_names.get(k, k) for k in geo["keys"]]
        if roi_levels is None:
            notes.append(f"single feature map ({roi_level_names[0]}): every RoI is pooled from it, "
                         "so there is no level assignment to show")
        if proposals.shape[0] > 0:
            if roi_index is None:
                roi_index = int(dets["proposal_index"][dets["scores"].argmax()]) if dets["scores"].numel() \
                    else int(proposal_scores.argmax())
            if not 0 <= roi_index < proposals.shape[0]:
                raise ConfigError(f"roi_index {roi_index}: there are {proposals.shape[0]} proposals")
            lv = 0 if roi_levels is None else int(roi_levels[roi_index])
            fmap = features[geo["keys"][lv]][0].float()
            scale = geo["scales"][lv]
            grid = roi_sampling_grid(proposals[roi_index].cpu(), output_size=geo["output_size"], spatial_scale=scale,
                                     sampling_ratio=geo["sampling_ratio"], aligned=geo["aligned"], op=geo["op"],
                                     feature_size=tuple(fmap.shape[-2:]))
            roi = RoIGrid(roi_index, proposals[roi_index].cpu(), roi_level_names[lv], scale, grid["offset"],
                          geo["op"], geo["output_size"], geo["sampling_ratio"], grid["grid"], grid["bins_y"],
                          grid["bins_x"], grid["samples_y"], grid["samples_x"], fmap.mean(0).cpu(),
                          pooled[roi_index].float().mean(0).cpu())
        if roi_levels is not None:
            roi_levels = roi_levels.cpu()

    # the resized image as the network saw it, without the normalisation
    mean = torch.as_tensor(model.transform.image_mean, device=device)[:, None, None]
    std = torch.as_tensor(model.transform.image_std, device=device)[:, None, None]
    h, w = image_size
    shown = (image_list.tensors[0, :, :h, :w].float() * std + mean).clamp(0, 1)

    if class_names is None:
        class_names = ["__background__"] + [f"class {i}" for i in range(1, num_classes)]
    return ExplainTrace(
        original_image=image.float().cpu(), image=shown.cpu(), original_size=original_size, image_size=image_size,
        padded_size=tuple(image_list.tensors.shape[-2:]), scale=(h / original_size[0], w / original_size[1]),
        class_names=list(class_names), levels=levels,
        rpn_settings={"pre_nms_top_n": rpn.pre_nms_top_n(), "post_nms_top_n": rpn.post_nms_top_n(),
                      "nms_thresh": rpn.nms_thresh, "min_size": rpn.min_size, "score_thresh": rpn.score_thresh},
        nms_candidates=candidates["boxes"].cpu(), nms_candidate_scores=candidates["scores"].cpu(),
        nms_candidate_levels=candidates["levels"].cpu(),
        proposals=proposals.cpu(), proposal_scores=proposal_scores.cpu(), filter_counts=dict(stats[0]),
        pooler=pooler_text, roi_level_names=roi_level_names, roi_levels=roi_levels, roi_level_bounds=bounds,
        roi=roi,
        roi_labels=roi_labels.cpu(), roi_scores=roi_scores.cpu(), refined_boxes=refined.cpu(),
        box_settings={"score_thresh": heads.score_thresh, "nms_thresh": heads.nms_thresh,
                      "detections_per_img": heads.detections_per_img},
        detections={k: final[k].cpu() for k in ("boxes", "labels", "scores")},
        detection_boxes_resized=dets["boxes"].cpu(), detection_proposal_index=dets["proposal_index"].cpu(),
        anchor_labels=None if anchor_labels is None else _to_cpu(anchor_labels),
        times={k: clock.times[k] for k in STAGES if k in clock.times}, notes=notes)


def _to_cpu(labels: AnchorLabels) -> AnchorLabels:
    per_gt = [GtAnchors(*(v.cpu() if isinstance(v, torch.Tensor) else v for v in vars(g).values()))
              for g in labels.per_gt]
    return AnchorLabels(labels.fg_iou_thresh, labels.bg_iou_thresh, labels.gt_boxes.cpu(), labels.gt_labels.cpu(),
                        labels.labels.cpu(), per_gt, labels.counts)


# ---- ground truth for one image -------------------------------------------------------------------


class _OneRecord:
    """One record of a dataset, in the shape ``targets_in_model_labels`` reads."""

    def __init__(self, dataset, index: int):
        self.dataset, self.index = dataset, index
        self.label_to_cat_id = getattr(dataset, "label_to_cat_id", None)

    def __len__(self) -> int:
        return 1

    def target(self, i: int) -> dict:
        return self.dataset.target(self.index)


def _coco_target(ann_file: Path, image_path: Path, image_size: tuple[int, int],
                 label_to_cat_id: dict[int, int]) -> tuple[dict, list[str]]:
    from ..data import CocoDetection
    from ..data.report import DataError
    from ..engine.evaluator import targets_in_model_labels

    dataset = CocoDetection(ann_file, image_root=image_path.parent)
    matches = [i for i, r in enumerate(dataset.records) if Path(r.path).name == image_path.name]
    if not matches:
        raise DataError(f"{ann_file}: no image record with file_name {image_path.name!r} "
                        f"(the image explained is {image_path})")
    exact = [i for i in matches if Path(dataset.records[i].path).resolve() == image_path.resolve()]
    if len(matches) > 1 and len(exact) != 1:
        names = ", ".join(repr(str(dataset.records[i].path)) for i in matches[:5])
        raise DataError(f"{ann_file}: {len(matches)} image records match {image_path.name!r} ({names}); "
                        "put the image where its file_name says, relative to the json's image folder")
    index = exact[0] if len(matches) > 1 else matches[0]
    record = dataset.records[index]
    if (record.height, record.width) != tuple(image_size):
        raise DataError(f"{ann_file}: {record.record}: width x height {record.width}x{record.height} but "
                        f"{image_path} is {image_size[1]}x{image_size[0]}")
    (target,) = targets_in_model_labels(_OneRecord(dataset, index), label_to_cat_id)
    notes = [dataset.report.summary()] if len(dataset.report) else []
    dropped = len(record.labels) - len(target["labels"])
    if dropped:
        notes.append(f"{dropped} object(s) of categories the model does not know are left out")
    return {"boxes": target["boxes"], "labels": target["labels"]}, notes


def _voc_target(xml_file: Path, image_size: tuple[int, int], class_names: list[str]) -> tuple[dict, list[str]]:
    from ..data.report import DataError, Report, where
    from ..data.voc import parse_objects, parse_xml

    ann = parse_xml(xml_file)
    height, width = image_size
    size = ann.find("size")
    if size is not None and size.findtext("width") and size.findtext("height"):
        try:
            declared = (int(float(size.findtext("height"))), int(float(size.findtext("width"))))
        except ValueError:
            raise DataError(f"{where(xml_file, None, 'size')}: expected integer <width> and <height>") from None
        if declared != (height, width):
            raise DataError(f"{where(xml_file, None, 'size')}: {declared[1]}x{declared[0]} (width x height) but "
                            f"the image is {width}x{height}")
    report = Report(source=str(xml_file))
    labels = {name: i for i, name in enumerate(class_names) if i > 0}
    objects = parse_objects(ann, xml_file, f"image {xml_file.stem}", width, height, labels, report)
    boxes = torch.tensor([o[0] for o in objects], dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor([o[1] for o in objects], dtype=torch.int64)}, \
        [str(p) for p in report]


def load_annotations(path, image_path, *, image_size: tuple[int, int], class_names: list[str],
                     label_to_cat_id: dict[int, int]) -> tuple[dict, list[str]]:
    """Ground truth of one image in the model's labels: -> ({boxes [G, 4] image pixels, labels [G]}, notes).

    ``path``: a COCO instances json (the record whose file_name has the image's name; labels through the
    category ids, as the evaluator maps them) or a Pascal VOC xml (class names matched to the model's).
    Objects the model has no class for are left out, with a note.
    """
    from ..data.report import DataError

    path, image_path = Path(path), Path(image_path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    if path.suffix.lower() == ".json":
        return _coco_target(path, image_path, image_size, label_to_cat_id)
    if path.suffix.lower() == ".xml":
        return _voc_target(path, image_size, class_names)
    raise DataError(f"{path}: expected a COCO instances .json or a Pascal VOC .xml annotation file")


# ---- the whole command ------------------------------------------------------------------------------


@dataclass
class Explanation:
    trace: ExplainTrace
    figures: dict  # name -> (path, numbers written on it)
    summary: str
    summary_path: Path


def explain(model, image: torch.Tensor, out_dir, *, target: dict | None = None,
            class_names: list[str] | None = None, level: str | int | None = None,
            score_threshold: float = 0.5, roi_index: int | None = None) -> Explanation:
    """Trace ``image`` through ``model`` and write one figure per stage and summary.txt into ``out_dir``."""
    from .figures import write_explain_figures, write_summary

    trace = explain_image(model, image, target=target, class_names=class_names, roi_index=roi_index)
    level_index = trace.level_index(level)
    figures = write_explain_figures(trace, out_dir, level=level_index, score_threshold=score_threshold)
    summary_path, text = write_summary(trace, out_dir, score_threshold=score_threshold)
    return Explanation(trace, figures, text, summary_path)
