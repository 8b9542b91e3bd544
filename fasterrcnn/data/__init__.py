"""Datasets (COCO, Pascal VOC, synthetic shapes), transforms and batching.

Knows nothing of the model: it speaks images, boxes, labels and files.
"""

from .batching import GroupedBatchSampler, aspect_ratio_groups, collate, make_data_loader, set_epoch
from .check_data import check_dataset
from .coco import CocoDetection
from .report import DataError, Problem, Report
from .synth import generate
from .voc import VOC_CLASSES, VocDetection

__all__ = [
    "VOC_CLASSES",
    "CocoDetection",
    "DataError",
    "GroupedBatchSampler",
    "Problem",
    "Report",
    "VocDetection",
    "aspect_ratio_groups",
    "check_dataset",
    "collate",
    "generate",
    "make_data_loader",
    "set_epoch",
]
