"""The detector as one exportable graph: a batch of pixels in, a fixed-size table of detections out.

``DeployGraph(model)`` shares the trained model's network (backbone, RPN head, box head and predictor)
and re-states, with tensors of fixed rank, what ``FasterRCNN.forward`` does around it: the image
transform, the anchors, the proposals and the detections. Where the eager model keeps ragged lists
(each image's own number of proposals and detections), the graph keeps every image's rows and a mask
of which are real, so that ``torch.export`` (for ONNX and OpenVINO) and ``torch.jit.script`` (for
TorchScript) can follow it for any batch and image size. The detections are those of the eager model
(tests/deploy compare them).

Shapes: N images of one size H x W, L anchor levels with A anchors per location, k = rpn pre-NMS top-n,
P proposals per image, C classes (background included), D = detections per image.
    images        [N, 3, H, W] uint8 0..255 (or float 0..1 with input_dtype="float32")
    transform     /255, normalise, bilinear resize to (h, w), the eager model's size to the pixel (its
                  double-precision rounding reproduced in integers, resize.py), zero-pad to a multiple
                  of size_divisible
    propose       per level: top-k logits (levels with fewer anchors padded with -inf, masked), decoded,
                  clipped, small and low-scoring boxes masked -> NMS per (image, level) -> the P best
                  per image -> proposals [N, P, 4] and valid [N, P]
    detect        RoIs [N*P, 5] pooled from their level -> box head -> softmax, per-class boxes;
                  candidates score > threshold, not background, real proposal, not tiny -> NMS per
                  (image, class) -> the D best per image
    outputs       boxes [N, D, 4] xyxy in input pixels, scores [N, D], labels [N, D] int64,
                  num_detections [N] int64; rows past num_detections are zeros, best first (no
                  detection: num_detections 0)
"""

import math
from collections import OrderedDict
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.faster_rcnn import FasterRCNN
from ..model.fpn import FeaturePyramidNetwork
from ..ops.box_coder import decode_boxes
from ..ops.boxes import clip_boxes_to_image, min_size_mask
from ..ops.poolers import MultiScalePooler, MultiScaleRoIAlign, MultiScaleRoIPool, assign_fpn_levels
from . import graph_ops
from .resize import EagerResize, floor_divide

INPUT_DTYPES = ("uint8", "float32")


class ExportError(ValueError):
    """A model, or an option, that the exported graph cannot represent."""


class _Maps(nn.Module):
    """The backbone, returning its maps as a list in the order of its dict (one map: a list of one)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.body = backbone

    def forward(self, x: Tensor) -> list[Tensor]:
        out = self.body(x)
        return [out] if isinstance(out, Tensor) else list(out.values())


class _InterpolatingFPN(FeaturePyramidNetwork):
    """The FPN with its top-down step as nearest-neighbour upsampling then an add (ONNX Resize + Add, which
    runtimes fuse), instead of the eager path's in-place add through a 6-D broadcast view (``add_upsampled_``),
    which OpenVINO runs as a slow broadcast Add between layout conversions (34 ms of 259 for R50-FPN in bf16).
    The same values: nearest-neighbour at exactly 2x reads the pixel the view reads."""

    def forward(self, x: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        names = list(x.keys())
        feats = list(x.values())
        merged = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](merged)]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[i](feats[i])
            merged = lateral + F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[i](merged))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict(zip(names, results))


def interpolating_fpns(model: nn.Module) -> int:
    """Give every FeaturePyramidNetwork of ``model`` (a copy being exported) the exported form of its top-down
    step, in place (the class changes, the parameters stay). -> how many."""
    count = 0
    for m in model.modules():
        if type(m) is FeaturePyramidNetwork:
            m.__class__ = _InterpolatingFPN
            count += 1
    return count


class DeployGraph(nn.Module):
    # the settings, constants of the graph (TorchScript reads these annotations as the attributes' types)
    mean: Tensor
    std: Tensor
    cell_anchors: Tensor
    pool_maps: list[int]
    pool_scales: list[float]
    k_min: int
    k_max: int
    canonical_scale: int
    canonical_level: int
    output_size: tuple[int, int]
    pool_op: str
    sampling_ratio: int
    aligned: bool

    def __init__(self, model: FasterRCNN, *, input_dtype: str = "uint8", probe_size: int = 320):
        super().__init__()
        if input_dtype not in INPUT_DTYPES:
            raise ExportError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
        transform, rpn, heads = model.transform, model.rpn, model.roi_heads
        self.maps = _Maps(model.backbone)
        self.rpn_head = rpn.head
        self.box_head = heads.box_head
        self.box_predictor = heads.box_predictor

        self.uint8_input = input_dtype == "uint8"
        self.register_buffer("mean", torch.tensor(transform.image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(transform.image_std, dtype=torch.float32).view(1, 3, 1, 1))
        self.min_size = int(transform.min_size[-1])  # the test-time size
        self.max_size = int(transform.max_size)
        self.resize = EagerResize(self.min_size, self.max_size, int(transform.size_divisible))

        generator = rpn.anchor_generator
        per_location = generator.num_anchors_per_location()
        if len(set(per_location)) != 1:
            raise ExportError(f"every level needs the same number of anchors per location, got {per_location}")
        self.register_buffer("cell_anchors", torch.stack([a.float() for a in generator.cell_anchors]))  # [L, A, 4]
        self.pre_nms_top_n = int(rpn._pre_nms_top_n["testing"])
        self.post_nms_top_n = int(rpn._post_nms_top_n["testing"])
        self.rpn_nms_thresh = float(rpn.nms_thresh)
        self.rpn_score_thresh = float(rpn.score_thresh)
        self.rpn_min_size = float(rpn.min_size)
        self.rpn_weights = rpn.box_coder.weights
        self.rpn_clip = float(rpn.box_coder.bbox_xform_clip)

        self.box_weights = heads.box_coder.weights
        self.box_clip = float(heads.box_coder.bbox_xform_clip)
        self.box_score_thresh = float(heads.score_thresh)
        if hasattr(heads, "later_heads"):
            raise ExportError(
                "a Cascade R-CNN model (cascade_iou) has no exported form yet; run it eagerly (the Python API, "
                "fasterrcnn predict / evaluate with the checkpoint)"
            )
        if getattr(heads, "nms", "nms") != "nms":
            raise ExportError(
                f"box_nms={heads.nms}: Soft-NMS has no exported form yet; export the model with box_nms=nms "
                "(model.roi_heads.nms = 'nms'), or run it eagerly"
            )
        self.box_nms_thresh = float(heads.nms_thresh)
        self.detections_per_img = int(heads.detections_per_img)
        self.num_classes = int(model.num_classes)
        self._set_pooler(heads.box_roi_pool, model.backbone, probe_size)

    def _set_pooler(self, pooler: nn.Module, backbone: nn.Module, probe_size: int) -> None:
        """The pooler's settings as constants: which of the backbone's maps it reads, their strides (measured
        once on a probe image; they do not depend on the image size), the op and its parameters."""
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            param = next(backbone.parameters())
            out = backbone(torch.zeros(1, 3, probe_size, probe_size, dtype=param.dtype, device=param.device))
        backbone.train(was_training)
        names = ["0"] if isinstance(out, Tensor) else list(out)
        maps = [out] if isinstance(out, Tensor) else list(out.values())
        if isinstance(pooler, MultiScalePooler):
            wanted = [n for n in pooler.featmap_names if n in names]
            chosen = [maps[names.index(n)] for n in wanted]
            scales, k_min, k_max = pooler.scales_and_levels(chosen, [(probe_size, probe_size)])
            self.pool_maps = [names.index(n) for n in wanted][: k_max - k_min + 1]
            self.pool_scales = scales[: k_max - k_min + 1]
            self.k_min, self.k_max = k_min, k_max
            self.canonical_scale, self.canonical_level = pooler.canonical_scale, pooler.canonical_level
            self.output_size = pooler.output_size
            if isinstance(pooler, MultiScaleRoIAlign):
                self.pool_op, self.sampling_ratio, self.aligned = "roi_align", pooler.sampling_ratio, False
            elif isinstance(pooler, MultiScaleRoIPool):
                self.pool_op, self.sampling_ratio, self.aligned = "roi_pool", 0, False
            else:
                raise ExportError(f"the pooler {type(pooler).__name__} has no exported form")
        elif type(pooler).__name__ == "SingleMapRoIPooler":
            from ..ops._utils import pair
            from ..ops.poolers import infer_scale

            index = names.index(pooler.featmap_name)
            self.pool_maps = [index]
            self.pool_scales = [infer_scale(maps[index], [(probe_size, probe_size)])]
            self.k_min = self.k_max = 0
            self.canonical_scale, self.canonical_level = 224, 4
            self.output_size = pair(cast(int, pooler.output_size), "SingleMapRoIPooler")
            self.pool_op = str(pooler.op)
            self.sampling_ratio, self.aligned = int(cast(int, pooler.sampling_ratio)), bool(pooler.aligned)
        else:
            raise ExportError(f"the pooler {type(pooler).__name__} has no exported form")

    # ---- the stages ------------------------------------------------------------------------------
    def preprocess(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[N, 3, H, W] pixels -> (normalised, resized and padded batch [N, 3, Hp, Wp], the resized h and w as
        0-d int64 tensors: the eager transform's sizes, see resize.py)."""
        x = images.to(torch.float32)
        if self.uint8_input:
            x = x / 255.0
        return self.resize((x - self.mean) / self.std)

    def anchors(self, level: int, grid_h: int, grid_w: int, stride_h: int, stride_w: int) -> Tensor:
        """The level's anchors [grid_h * grid_w * A, 4], in the eager generator's order (y, x, anchor)."""
        base = self.cell_anchors[level]  # [A, 4]
        xs = torch.arange(grid_w, device=base.device).to(torch.float32) * stride_w
        ys = torch.arange(grid_h, device=base.device).to(torch.float32) * stride_h
        shift_x = xs[None, :].expand(grid_h, grid_w).reshape(-1)
        shift_y = ys[:, None].expand(grid_h, grid_w).reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)

    def propose(self, maps: list[Tensor], padded_h: int, padded_w: int, h: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """-> (proposals [N, P, 4] in resized pixels, valid [N, P] bool), best first."""
        logits, deltas = self.rpn_head(maps)
        k = self.pre_nms_top_n
        level_boxes: list[Tensor] = []
        level_scores: list[Tensor] = []
        for level in range(len(logits)):
            lg, dl = logits[level], deltas[level]
            n, a, gh, gw = lg.shape
            objectness = lg.permute(0, 2, 3, 1).reshape(n, gh * gw * a).to(torch.float32)
            box_deltas = dl.reshape(n, a, 4, gh, gw).permute(0, 3, 4, 1, 2).reshape(n, gh * gw * a, 4)
            anchors = self.anchors(level, gh, gw, padded_h // gh, padded_w // gw)
            # a level with fewer than k anchors is padded with -inf logits: they rank last and are masked
            top, index = F.pad(objectness, [0, k], value=-math.inf).topk(k, dim=1)
            real = index < gh * gw * a
            index = torch.where(real, index, 0)
            picked = box_deltas.to(torch.float32).gather(1, index[:, :, None].expand(n, k, 4))
            boxes = decode_boxes(picked.reshape(n * k, 4), anchors[index.reshape(-1)], self.rpn_weights, self.rpn_clip)
            boxes = clip_boxes_to_image(boxes.reshape(n, k, 4), torch.stack((h, w)))
            scores = torch.sigmoid(top)
            alive = real & min_size_mask(boxes, self.rpn_min_size) & (scores >= self.rpn_score_thresh)
            level_boxes.append(boxes)
            level_scores.append(torch.where(alive, scores, -1.0))
        num_levels = len(level_boxes)
        boxes = torch.stack(level_boxes, dim=1)  # [N, L, k, 4]
        scores = torch.stack(level_scores, dim=1)  # [N, L, k]
        n = boxes.shape[0]
        kept = graph_ops.group_nms(
            boxes.reshape(n * num_levels, k, 4),
            scores.reshape(n * num_levels, k),
            self.rpn_nms_thresh,
            self.post_nms_top_n,
        )
        top, index = _best_kept(scores.reshape(-1), kept, k, n, num_levels * k, self.post_nms_top_n)
        proposals = boxes.reshape(n, num_levels * k, 4).gather(1, index[:, :, None].expand(-1, -1, 4))
        valid = top >= 0
        return torch.where(valid[:, :, None], proposals, 0.0), valid

    def pool(self, maps: list[Tensor], rois: Tensor) -> Tensor:
        """RoIs [R, 5] -> [R, C, oh, ow], each from the map of its level (FPN's rule) or the one map."""
        oh, ow = self.output_size
        if len(self.pool_maps) == 1:
            return self._pool_one(maps[self.pool_maps[0]], rois, self.pool_scales[0], oh, ow)
        levels = assign_fpn_levels(rois[:, 1:], self.k_min, self.k_max, self.canonical_scale, self.canonical_level)
        # each level's RoIs pooled from its map, the results concatenated, then put back in the RoIs' order by
        # one gather: a zero-filled [R, C, oh, ow] buffer written level by level costs runtimes a full copy of
        # it per level (ONNX's ScatterND is not in place)
        indices, pooled = [], []
        for level in range(len(self.pool_maps)):
            index = torch.nonzero(levels == level).flatten()
            indices.append(index)
            pooled.append(self._pool_one(maps[self.pool_maps[level]], rois[index], self.pool_scales[level], oh, ow))
        order = torch.cat(indices)  # a permutation of 0..R-1: every RoI has exactly one level
        position = torch.zeros_like(order).scatter(0, order, torch.arange(order.shape[0], device=order.device))
        return torch.cat(pooled).index_select(0, position)

    def _pool_one(self, feature: Tensor, rois: Tensor, scale: float, oh: int, ow: int) -> Tensor:
        if self.pool_op == "roi_pool":
            return graph_ops.roi_pool(feature, rois.to(feature.dtype), scale, oh, ow)
        return graph_ops.roi_align(feature, rois.to(feature.dtype), scale, oh, ow, self.sampling_ratio, self.aligned)

    def detect(
        self, maps: list[Tensor], proposals: Tensor, valid: Tensor, h: Tensor, w: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (boxes [N, D, 4] in resized pixels, scores [N, D], labels [N, D], num_detections [N])."""
        n, p = proposals.shape[0], proposals.shape[1]
        image = torch.arange(n, device=proposals.device).to(torch.float32)[:, None, None].expand(n, p, 1)
        rois = torch.cat((image, proposals), dim=2).reshape(n * p, 5)
        class_logits, box_deltas = self.box_predictor(self.box_head(self.pool(maps, rois)))
        c = self.num_classes
        scores = F.softmax(class_logits.to(torch.float32), dim=-1).reshape(n, p, c)[:, :, 1:]  # [N, P, C-1]
        boxes = decode_boxes(box_deltas.to(torch.float32), rois[:, 1:], self.box_weights, self.box_clip)
        boxes = clip_boxes_to_image(boxes.reshape(n, p, c, 4)[:, :, 1:], torch.stack((h, w)))  # [N, P, C-1, 4]
        alive = (scores > self.box_score_thresh) & valid[:, :, None] & min_size_mask(boxes, 1e-2)
        # groups (image, class) of P boxes each
        group_boxes = boxes.permute(0, 2, 1, 3).reshape(n * (c - 1), p, 4)
        group_scores = torch.where(alive, scores, -1.0).permute(0, 2, 1).reshape(n * (c - 1), p)
        kept = graph_ops.group_nms(group_boxes, group_scores, self.box_nms_thresh, self.detections_per_img)
        top, index = _best_kept(group_scores.reshape(-1), kept, p, n, (c - 1) * p, self.detections_per_img)
        found = top >= 0
        out_boxes = group_boxes.reshape(n, (c - 1) * p, 4).gather(1, index[:, :, None].expand(-1, -1, 4))
        out_boxes = torch.where(found[:, :, None], out_boxes, 0.0)
        labels = torch.where(found, floor_divide(index, torch.full_like(index, p)) + 1, 0)
        return out_boxes, torch.where(found, top, 0.0), labels, found.sum(dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """images [N, 3, H, W] -> (boxes [N, D, 4], scores [N, D], labels [N, D], num_detections [N])."""
        height, width = images.shape[2], images.shape[3]
        x, h, w = self.preprocess(images)
        maps = self.maps(x)
        proposals, valid = self.propose(maps, x.shape[2], x.shape[3], h, w)
        boxes, scores, labels, count = self.detect(maps, proposals, valid, h, w)
        # back to the input's pixels, with the eager model's float32 ratios
        one = torch.ones((), dtype=torch.float32, device=boxes.device)
        x = boxes[..., 0::2] * ((one * width) / w.to(torch.float32))
        y = boxes[..., 1::2] * ((one * height) / h.to(torch.float32))
        boxes = torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)
        return boxes, scores, labels, count


def _best_kept(
    scores: Tensor, kept: Tensor, group_size: int, n: int, per_image: int, top_n: int
) -> tuple[Tensor, Tensor]:
    """The ``top_n`` best boxes NMS kept in each image: ``scores`` of all boxes, flat [N * per_image] (groups of
    ``group_size`` in image-major order), ``kept`` [M, 2] (group, index) -> (scores [N, T], index [N, T] into
    the image's ``per_image`` boxes); a score of -1: no box (fewer kept than T)."""
    flat = kept[:, 0] * group_size + kept[:, 1]
    dense = torch.full_like(scores, -1.0).index_put((flat,), scores[flat])
    return dense.reshape(n, per_image).topk(min(top_n, per_image), dim=1)
