"""Detection metrics on plain boxes, labels, scores and files; nothing here knows about the model.

- ``coco``: model-format detections -> COCO results json; ``CocoEvaluator`` runs pycocotools' COCOeval
  over the images it was given and returns ``CocoMetrics`` (the 12 standard numbers, per-class AP/AP50).
- ``voc``: Pascal VOC AP at IoU 0.5, 11-point (VOC2007) and area (VOC2010+): ``evaluate_voc``.
"""

from .coco import COCO_STAT_NAMES, CocoClassAP, CocoEvaluator, CocoMetrics, detections_to_coco_results
from .voc import VocClassResult, VocMetrics, average_precision, evaluate_voc

__all__ = [
    "COCO_STAT_NAMES",
    "CocoClassAP",
    "CocoEvaluator",
    "CocoMetrics",
    "VocClassResult",
    "VocMetrics",
    "average_precision",
    "detections_to_coco_results",
    "evaluate_voc",
]
