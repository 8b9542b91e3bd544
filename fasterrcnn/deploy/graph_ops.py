"""The three operators of the exported graph that have no plain-tensor form: NMS over groups of boxes,
RoIAlign and RoIPool. Each exists three ways:

- a PyTorch custom op (``torch.ops.fasterrcnn.*``): in eager mode it runs our own kernels
  (``fasterrcnn.ops``), and ``torch.export`` sees an opaque node with a known output shape;
- an ONNX translation (``onnx_translations``) to the standard ONNX operator that every runtime
  implements natively (NonMaxSuppression, RoiAlign, MaxRoiPool);
- a TorchScript function written in the scriptable subset (``*_script``), so that a scripted file
  runs in a process that has never imported fasterrcnn.

``group_nms``, ``roi_align`` and ``roi_pool`` pick the right one; the graph calls only those.

Shapes: G groups of N boxes each; K RoIs ``[K, 5]`` rows ``(image index, x1, y1, x2, y2)``.
    group_nms: boxes [G, N, 4], scores [G, N] (a negative score: not a candidate) -> int64 [M, 2]
               (group, index) of the boxes kept, at most ``max_per_group`` per group
    roi_align / roi_pool: feature [B, C, H, W], rois [K, 5] -> [K, C, oh, ow]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..model.per_image import top_n_per_image

# ---- custom ops: our kernels in eager mode, opaque nodes for torch.export --------------------------------


@torch.library.custom_op("fasterrcnn::group_nms", mutates_args=())
def _group_nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float, max_per_group: int) -> Tensor:
    group, index = torch.nonzero(scores >= 0).unbind(1)
    keep = ops.batched_nms(boxes[group, index], scores[group, index], group, iou_threshold)  # by score
    keep, _ = top_n_per_image(keep, group[keep], scores.shape[0], max_per_group)
    return torch.stack((group[keep], index[keep]), dim=1)


@_group_nms_op.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float, max_per_group: int) -> Tensor:
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept, 2), dtype=torch.int64)


@torch.library.custom_op("fasterrcnn::roi_align", mutates_args=())
def _roi_align_op(
    feature: Tensor,
    rois: Tensor,
    spatial_scale: float,
    output_height: int,
    output_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    return ops.roi_align(feature, rois, (output_height, output_width), spatial_scale, sampling_ratio, aligned)


@_roi_align_op.register_fake
def _(feature, rois, spatial_scale, output_height, output_width, sampling_ratio, aligned):
    return feature.new_empty((rois.shape[0], feature.shape[1], output_height, output_width))


@torch.library.custom_op("fasterrcnn::roi_pool", mutates_args=())
def _roi_pool_op(feature: Tensor, rois: Tensor, spatial_scale: float, output_height: int, output_width: int) -> Tensor:
    return ops.roi_pool(feature, rois, (output_height, output_width), spatial_scale)


@_roi_pool_op.register_fake
def _(feature, rois, spatial_scale, output_height, output_width):
    return feature.new_empty((rois.shape[0], feature.shape[1], output_height, output_width))


# ---- TorchScript forms ----------------------------------------------------------------------------------


def group_nms_script(boxes: Tensor, scores: Tensor, iou_threshold: float, max_per_group: int) -> Tensor:
    """``group_nms`` in the scriptable subset: per group with candidates, the exact greedy answer as the fixed
    point of ``keep = alive & no kept higher-ranked box suppresses it`` on the group's IoU matrix."""
    found: list[Tensor] = []
    for g in range(scores.shape[0]):
        index = torch.nonzero(scores[g] >= 0).flatten()
        if index.numel() == 0:
            continue
        order = torch.sort(scores[g][index], descending=True, stable=True).indices
        index = index[order]
        b = boxes[g][index]
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        lt = torch.maximum(b[:, None, :2], b[None, :, :2])
        rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        union = area[:, None] + area[None, :] - inter
        iou = torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)), 0.0)
        n = index.numel()
        rank = torch.arange(n, device=b.device)
        # sup[j, i]: box j ranks above box i and would suppress it
        sup = ((iou > iou_threshold) & (rank[:, None] < rank[None, :])).to(torch.float32)
        keep = torch.ones(n, dtype=torch.float32, device=b.device)
        for _ in range(n + 1):
            new = (torch.mv(sup.t(), keep) == 0).to(torch.float32)
            if bool(torch.equal(new, keep)):
                break
            keep = new
        kept = index[keep > 0][:max_per_group]
        found.append(torch.stack((torch.full_like(kept, g), kept), dim=1))
    if len(found) == 0:
        return torch.zeros((0, 2), dtype=torch.int64, device=boxes.device)
    return torch.cat(found)


def _axis_taps(
    start: Tensor, bin_size: Tensor, bins: int, ratio: int, size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample points along one axis of each RoI and their two bilinear taps: ``start, bin_size [K]`` ->
    (low index, high index, low weight, high weight), each ``[K, bins, ratio]``; a sample outside
    ``[-1, size]`` weighs 0, as in RoIAlign."""
    step = torch.arange(ratio, device=start.device, dtype=start.dtype)
    cell = torch.arange(bins, device=start.device, dtype=start.dtype)
    pos = (
        start[:, None, None]
        + cell[None, :, None] * bin_size[:, None, None]
        + (step[None, None, :] + 0.5) * bin_size[:, None, None] / ratio
    )
    inside = ((pos >= -1.0) & (pos <= float(size))).to(start.dtype)
    pos = pos.clamp(min=0.0)
    low = pos.floor().to(torch.int64)
    at_end = low >= size - 1
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, size - 1, low + 1)
    pos = torch.where(at_end, low.to(start.dtype), pos)
    frac = pos - low.to(start.dtype)
    return low, high, (1.0 - frac) * inside, frac * inside


def roi_align_script(
    feature: Tensor,
    rois: Tensor,
    spatial_scale: float,
    output_height: int,
    output_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign with a fixed sampling grid (``sampling_ratio > 0``) in the scriptable subset: each output cell
    is the mean of ``ratio x ratio`` bilinear samples, computed as one weighted gather (``embedding_bag``)."""
    b, c, height, width = feature.shape
    k = rois.shape[0]
    if k == 0:
        return feature.new_zeros((0, c, output_height, output_width))
    r = sampling_ratio
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    ylo, yhi, wylo, wyhi = _axis_taps(y1, roi_h / output_height, output_height, r, height)
    xlo, xhi, wxlo, wxhi = _axis_taps(x1, roi_w / output_width, output_width, r, width)
    # per RoI and output row: the 2r row taps [K, oh, 2r]; per output column the 2r column taps [K, ow, 2r]
    rows = torch.cat((ylo, yhi), dim=2) * width + rois[:, 0].to(torch.int64)[:, None, None] * (height * width)
    wy = torch.cat((wylo, wyhi), dim=2) / float(r * r)
    cols = torch.cat((xlo, xhi), dim=2)
    wx = torch.cat((wxlo, wxhi), dim=2)
    index = rows[:, :, None, :, None] + cols[:, None, :, None, :]  # [K, oh, ow, 2r, 2r]
    weight = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    table = feature.permute(0, 2, 3, 1).reshape(b * height * width, c)
    out = torch.nn.functional.embedding_bag(
        index.reshape(k * output_height * output_width, 4 * r * r),
        table,
        mode="sum",
        per_sample_weights=weight.reshape(k * output_height * output_width, 4 * r * r).to(table.dtype),
    )
    return out.view(k, output_height, output_width, c).permute(0, 3, 1, 2).contiguous()


# ---- what the graph calls -------------------------------------------------------------------------------


def group_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_per_group: int) -> Tensor:
    if torch.jit.is_scripting():
        return group_nms_script(boxes, scores, iou_threshold, max_per_group)
    return torch.ops.fasterrcnn.group_nms(boxes, scores, iou_threshold, max_per_group)


def roi_align(
    feature: Tensor,
    rois: Tensor,
    spatial_scale: float,
    output_height: int,
    output_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    if torch.jit.is_scripting():
        return roi_align_script(feature, rois, spatial_scale, output_height, output_width, sampling_ratio, aligned)
    return torch.ops.fasterrcnn.roi_align(
        feature, rois, spatial_scale, output_height, output_width, sampling_ratio, aligned
    )


def roi_pool(feature: Tensor, rois: Tensor, spatial_scale: float, output_height: int, output_width: int) -> Tensor:
    if torch.jit.is_scripting():
        raise RuntimeError("RoIPool has no TorchScript form; export this model to ONNX or OpenVINO")
    return torch.ops.fasterrcnn.roi_pool(feature, rois, spatial_scale, output_height, output_width)


# ---- ONNX -----------------------------------------------------------------------------------------------


def onnx_translations() -> dict:
    """The ONNX form of each custom op, for ``torch.onnx.export(..., custom_translation_table=...)``
    (needs onnxscript, which the ``deploy`` extra installs)."""
    from onnx import TensorProto
    from onnxscript import opset18

    # onnxscript's typed opset wants each input's ONNX type spelled out; these functions are traced by the
    # exporter with the values it has, so the opset is used untyped
    op: Any = opset18

    def group_nms_onnx(boxes, scores, iou_threshold: float, max_per_group: int):
        selected = op.NonMaxSuppression(
            boxes,
            op.Unsqueeze(scores, op.Constant(value_ints=[1])),
            op.Constant(value_ints=[max_per_group]),
            op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[-0.5]),  # negative scores are not candidates
        )  # [M, 3]: (group, class 0, index)
        return op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)

    def rois_split(rois):
        boxes = op.Slice(rois, op.Constant(value_ints=[1]), op.Constant(value_ints=[5]), op.Constant(value_ints=[1]))
        image = op.Slice(rois, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), op.Constant(value_ints=[1]))
        return boxes, op.Cast(op.Squeeze(image, op.Constant(value_ints=[1])), to=TensorProto.INT64)

    def roi_align_onnx(
        feature,
        rois,
        spatial_scale: float,
        output_height: int,
        output_width: int,
        sampling_ratio: int,
        aligned: bool,
    ):
        boxes, image = rois_split(rois)
        return op.RoiAlign(
            feature,
            boxes,
            image,
            coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
            mode="avg",
            output_height=output_height,
            output_width=output_width,
            sampling_ratio=sampling_ratio,
            spatial_scale=spatial_scale,
        )

    def roi_pool_onnx(feature, rois, spatial_scale: float, output_height: int, output_width: int):
        return op.MaxRoiPool(feature, rois, pooled_shape=[output_height, output_width], spatial_scale=spatial_scale)

    return {
        torch.ops.fasterrcnn.group_nms.default: group_nms_onnx,
        torch.ops.fasterrcnn.roi_align.default: roi_align_onnx,
        torch.ops.fasterrcnn.roi_pool.default: roi_pool_onnx,
    }
