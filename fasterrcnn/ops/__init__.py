"""Detection operators on plain tensors: box geometry, box coding, NMS and Soft-NMS, GIoU, RoIAlign / RoIPool.

Boxes are ``Tensor[N, 4]`` in ``(x1, y1, x2, y2)`` absolute pixels. Nothing here knows about the model.
"""

from .box_coder import BoxCoder
from .boxes import box_area, box_iou, clip_boxes_to_image, min_size_mask, remove_small_boxes
from .giou import generalized_box_iou_pairs, giou_loss
from .nms import batched_nms, nms
from .poolers import MultiScalePooler, MultiScaleRoIAlign, MultiScaleRoIPool, assign_fpn_levels, infer_scale
from .roi_align import roi_align
from .roi_pool import roi_pool
from .soft_nms import batched_soft_nms, soft_nms

__all__ = [
    "BoxCoder",
    "MultiScalePooler",
    "MultiScaleRoIAlign",
    "MultiScaleRoIPool",
    "assign_fpn_levels",
    "batched_nms",
    "batched_soft_nms",
    "box_area",
    "box_iou",
    "clip_boxes_to_image",
    "generalized_box_iou_pairs",
    "giou_loss",
    "infer_scale",
    "min_size_mask",
    "nms",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
    "soft_nms",
]
