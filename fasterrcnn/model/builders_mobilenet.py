"""Builders for the MobileNetV3-Large detectors (torchvision's layouts, key for key):

    fasterrcnn_mobilenet_v3_large_fpn       images to 800..1333, 1000 proposals at test time
    fasterrcnn_mobilenet_v3_large_320_fpn   images to 320..640, 150 proposals: real time on a CPU

Both: FPN over blocks 13 and 16 of the trunk plus the "pool" level (three maps, the first two at stride 32),
anchors of 32..512 pixels at ratios 0.5, 1, 2 on every map (15 per location), RoIAlign 7x7 from map "0", the
two-fc head; proposals scoring under 0.05 are dropped. ``anchor_sizes`` and ``aspect_ratios``: the anchors
at every location of every map (scale them with the objects of your data). ``weights``: a detector checkpoint
(path, URL, "DEFAULT" or "COCO_V1"), loaded strictly, the trunk's norm layers FrozenBatchNorm2d (eps 1e-5);
``weights_backbone``: an ImageNet MobileNetV3-Large checkpoint (or "DEFAULT", "IMAGENET1K_V1");
with neither, BatchNorm and every layer trains. ``trainable_backbone_layers``: 0..6 stages from the end
(default 3 with weights). Any other keyword goes to ``FasterRCNN``.
"""

import os

from torch import nn

from ..ops import MultiScaleRoIAlign
from .anchors import AnchorGenerator
from .builder_start import builder_start
from .faster_rcnn import FasterRCNN
from .frozen_bn import FrozenBatchNorm2d
from .mobilenet_backbone import mobilenet_backbone
from .published import backbone_weights, detector_weights
from .weights import load_detector_weights

PathOrURL = str | os.PathLike | None


def fasterrcnn_mobilenet_v3_large_fpn(
    *,
    num_classes: int | None = None,
    weights: PathOrURL = None,
    weights_backbone: PathOrURL = None,
    trainable_backbone_layers: int | None = None,
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    **overrides,
) -> FasterRCNN:
    """Faster R-CNN with a MobileNetV3-Large + FPN backbone (see the module docstring)."""
    return _mobilenet_detector(
        "fasterrcnn_mobilenet_v3_large_fpn",
        {"rpn_score_thresh": 0.05},
        num_classes=num_classes,
        weights=weights,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        anchors=AnchorGenerator((tuple(anchor_sizes),) * 3, (tuple(aspect_ratios),) * 3),
        overrides=overrides,
    )


def fasterrcnn_mobilenet_v3_large_320_fpn(
    *,
    num_classes: int | None = None,
    weights: PathOrURL = None,
    weights_backbone: PathOrURL = None,
    trainable_backbone_layers: int | None = None,
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    **overrides,
) -> FasterRCNN:
    """Faster R-CNN with a MobileNetV3-Large + FPN backbone on images scaled to 320..640 pixels, with 150
    proposals at test time (see the module docstring)."""
    defaults = dict(
        min_size=320, max_size=640, rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=150, rpn_score_thresh=0.05
    )
    return _mobilenet_detector(
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        defaults,
        num_classes=num_classes,
        weights=weights,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        anchors=AnchorGenerator((tuple(anchor_sizes),) * 3, (tuple(aspect_ratios),) * 3),
        overrides=overrides,
    )


def _mobilenet_detector(
    name: str,
    defaults: dict,
    *,
    num_classes: int | None,
    weights: PathOrURL,
    weights_backbone: PathOrURL,
    trainable_backbone_layers: int | None,
    anchors: AnchorGenerator,
    overrides: dict,
) -> FasterRCNN:
    weights = detector_weights(name, weights)
    weights_backbone = None if weights is not None else backbone_weights("mobilenet_v3_large", weights_backbone)
    start = builder_start(weights, weights_backbone, trainable_backbone_layers, num_classes, all_layers=6)
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large",
        weights=weights_backbone,
        fpn=True,
        norm_layer=FrozenBatchNorm2d if start.is_trained else nn.BatchNorm2d,
        trainable_layers=start.trainable_layers,
    )
    overrides.setdefault("rpn_anchor_generator", anchors)
    overrides.setdefault("box_roi_pool", MultiScaleRoIAlign(["0", "1"], output_size=7, sampling_ratio=2))
    model = FasterRCNN(backbone, start.num_classes, **{**defaults, **overrides})
    if weights is not None:
        load_detector_weights(model, weights, state_dict=start.state_dict)
    return model
