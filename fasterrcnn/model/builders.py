"""Builders: one call for each standard layout, optionally loading weights.

    fasterrcnn_resnet{18,34,50,101}_fpn  ResNet + FPN P2..P6, one anchor size per level, RoIAlign 7x7
                                          (torchvision's v1 layout: the R50 state_dict is key-for-key its
                                          fasterrcnn_resnet50_fpn)
    fasterrcnn_resnet50_c4               the original single-map detector: RPN on C4 (stride 16) with
                                          9 anchors, RoIPool or RoIAlign 14x14, res5 as the box head
    fasterrcnn_resnet50_c5               single map C5 (stride 32), 9 anchors, 7x7 pooling, 2-fc head
    fasterrcnn_resnet18_c4               single map C4 of a ResNet-18 (stride 16, 256 channels), 7x7
                                          pooling, 2-fc head: the demo-sized "no FPN" model of the ablation

``weights``: a torchvision-format detector checkpoint (path, URL, or for the R50-FPN v1 and v2 torchvision's
name "DEFAULT" or "COCO_V1", see published.py); it is loaded strictly, the
backbone's norm layers become FrozenBatchNorm2d with eps 0.0 (as torchvision sets for its published
COCO weights) and ``num_classes`` defaults to the checkpoint's. ``weights_backbone``: an ImageNet
ResNet checkpoint (or a name: "DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"); FrozenBatchNorm2d with eps
1e-5. With neither, the model trains from scratch
with ordinary BatchNorm and every layer trainable. Any other keyword goes to ``FasterRCNN``.
"""

import functools
import os
from collections.abc import Callable

from torch import nn

from ..ops import MultiScaleRoIAlign, MultiScaleRoIPool
from .anchors import AnchorGenerator
from .backbone import build_resnet_fpn, resnet_single_map_backbone
from .builder_start import builder_start
from .builders_mobilenet import fasterrcnn_mobilenet_v3_large_320_fpn, fasterrcnn_mobilenet_v3_large_fpn
from .faster_rcnn import FasterRCNN
from .frozen_bn import FrozenBatchNorm2d
from .published import backbone_weights, detector_weights
from .resnet import RESNET_SPECS, Bottleneck, freeze_layers, make_stage
from .roi_heads import ConvFCHead, FastRCNNPredictor, Res5Head, TwoMLPHead
from .rpn import RPNHead
from .single_map_pooler import SingleMapRoIPooler
from .weights import load_backbone_weights, load_detector_weights

PathOrURL = str | os.PathLike | None


def _resolve(
    weights: PathOrURL, weights_backbone: PathOrURL, trainable_backbone_layers: int | None, num_classes: int | None
) -> tuple[Callable[[int], nn.Module], int, int, dict | None]:
    """-> (norm layer, trainable layers, num_classes, detector state_dict or None)."""
    start = builder_start(weights, weights_backbone, trainable_backbone_layers, num_classes, all_layers=5)
    if start.is_trained:
        # torchvision sets eps 0.0 for its published COCO weights; 1e-5 (BatchNorm's) for ImageNet trunks
        norm_layer = functools.partial(FrozenBatchNorm2d, eps=0.0 if weights is not None else 1e-5)
    else:  # training from scratch needs BatchNorm that learns
        norm_layer = nn.BatchNorm2d
    return norm_layer, start.trainable_layers, start.num_classes, start.state_dict


def fasterrcnn_resnet_fpn(
    depth: int = 50,
    *,
    num_classes: int | None = None,
    weights: PathOrURL = None,
    weights_backbone: PathOrURL = None,
    trainable_backbone_layers: int | None = None,
    fpn_channels: int = 256,
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    fpn_norm: str = "none",
    roi_op: str = "roi_align",
    roi_output_size: int = 7,
    **overrides,
) -> FasterRCNN:
    """Faster R-CNN with a ResNet-``depth`` + FPN backbone (torchvision's v1 layout at depth 50).

    ``anchor_sizes``: one anchor size per pyramid level P2..P6 (each with every aspect ratio); scale
    them with the objects of your data (e.g. 16..256 for objects from 12 pixels up). ``fpn_norm``:
    "none" (torchvision's v1 layout), "bn" or "gn" after each FPN conv, for training from scratch.
    ``roi_op``: "roi_align" (sampling ratio 2) or "roi_pool" on the level of each RoI;
    ``roi_output_size``: the pooled grid (7: the v1 layout; the box head's first fc follows it).
    """
    weights = detector_weights(f"fasterrcnn_resnet{depth}_fpn", weights)
    weights_backbone = backbone_weights(f"resnet{depth}", weights_backbone)
    norm_layer, trainable, num_classes, state_dict = _resolve(
        weights, weights_backbone, trainable_backbone_layers, num_classes
    )
    backbone = build_resnet_fpn(
        depth, norm_layer=norm_layer, trainable_layers=trainable, out_channels=fpn_channels, fpn_norm=fpn_norm
    )
    if weights_backbone is not None and weights is None:
        load_backbone_weights({"": backbone.body}, weights_backbone)
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per level P2..P6 (5), got {anchor_sizes}")
    overrides.setdefault(
        "rpn_anchor_generator", AnchorGenerator(tuple((s,) for s in anchor_sizes), (tuple(aspect_ratios),))
    )
    if roi_op not in ("roi_align", "roi_pool"):
        raise ValueError(f"roi_op must be 'roi_align' or 'roi_pool', got {roi_op!r}")
    pooler = MultiScaleRoIAlign if roi_op == "roi_align" else MultiScaleRoIPool
    overrides.setdefault("box_roi_pool", pooler(["0", "1", "2", "3"], output_size=roi_output_size, sampling_ratio=2))
    model = FasterRCNN(backbone, num_classes, **overrides)
    if weights is not None:
        load_detector_weights(model, weights, state_dict=state_dict)
    return model


fasterrcnn_resnet18_fpn = functools.partial(fasterrcnn_resnet_fpn, 18)
fasterrcnn_resnet34_fpn = functools.partial(fasterrcnn_resnet_fpn, 34)
fasterrcnn_resnet50_fpn = functools.partial(fasterrcnn_resnet_fpn, 50)
fasterrcnn_resnet101_fpn = functools.partial(fasterrcnn_resnet_fpn, 101)
for _depth in (18, 34, 50, 101):
    _f = globals()[f"fasterrcnn_resnet{_depth}_fpn"]
    _f.__name__ = _f.__qualname__ = f"fasterrcnn_resnet{_depth}_fpn"
    _f.__doc__ = f"Faster R-CNN, ResNet-{_depth} + FPN. See ``fasterrcnn_resnet_fpn`` for the arguments."


def fasterrcnn_resnet50_fpn_v2(
    *,
    num_classes: int | None = None,
    weights: PathOrURL = None,
    weights_backbone: PathOrURL = None,
    trainable_backbone_layers: int | None = None,
    **overrides,
) -> FasterRCNN:
    """Faster R-CNN ResNet-50-FPN v2 (Li et al. 2021, "Benchmarking detection transfer learning with vision
    transformers"; torchvision's ``fasterrcnn_resnet50_fpn_v2``, 46.7 COCO box AP): BatchNorm (not frozen) in
    the trunk and after every FPN conv, an RPN head with two 3x3 convs, and a box head of four 3x3 conv +
    BatchNorm + ReLU layers and one fc. ``weights``: a detector checkpoint (path, URL, "DEFAULT", "COCO_V1");
    ``weights_backbone``: an ImageNet ResNet-50 checkpoint ("DEFAULT" = "IMAGENET1K_V2"). Layers
    ``trainable_backbone_layers`` (0..5, default 3 with weights) from layer4 train; the norm layers stay
    BatchNorm even where frozen, as torchvision's."""
    weights = detector_weights("fasterrcnn_resnet50_fpn_v2", weights)
    weights_backbone = None if weights is not None else backbone_weights("resnet50", weights_backbone)
    start = builder_start(weights, weights_backbone, trainable_backbone_layers, num_classes, all_layers=5)
    backbone = build_resnet_fpn(50, norm_layer=nn.BatchNorm2d, trainable_layers=5, fpn_norm="bn")
    if weights_backbone is not None:
        load_backbone_weights({"": backbone.body}, weights_backbone)
    freeze_layers(backbone.body, start.trainable_layers)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),))
    overrides.setdefault("rpn_anchor_generator", anchors)
    overrides.setdefault("rpn_head", RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], 2))
    overrides.setdefault("box_head", ConvFCHead(backbone.out_channels, (7, 7), (256,) * 4, 1024))
    model = FasterRCNN(backbone, start.num_classes, **overrides)
    if weights is not None:
        load_detector_weights(model, weights, state_dict=start.state_dict)
    return model


# The paper's single-map defaults (Ren et al. 2015, Sec. 3.1 and 4): images scaled to a shorter side
# of 600 (at most 1000), anchors of 128, 256 and 512 pixels at three aspect ratios, 2000 proposals
# for training and 300 for testing, from up to 12000 / 6000 boxes before NMS.
SINGLE_MAP_DEFAULTS = dict(
    min_size=600,
    max_size=1000,
    rpn_pre_nms_top_n_train=12000,
    rpn_pre_nms_top_n_test=6000,
    rpn_post_nms_top_n_train=2000,
    rpn_post_nms_top_n_test=300,
)


def fasterrcnn_resnet50_single_map(
    *,
    feature: str = "c4",
    roi_op: str = "roi_pool",
    num_classes: int | None = None,
    weights: PathOrURL = None,
    weights_backbone: PathOrURL = None,
    trainable_backbone_layers: int | None = None,
    anchor_sizes: tuple[int, ...] = (128, 256, 512),
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    fpn_norm: str = "none",
    **overrides,
) -> FasterRCNN:
    """Faster R-CNN on one ResNet-50 feature map, with 9 anchors per location.

    ``feature="c4"``: the RPN and RoI pooling read C4 (stride 16, 1024 channels); each RoI is pooled to
    14x14 and the network's own res5 stage (stride 2) with global average pooling is the box head, the
    ResNet detector of He et al. 2016. ``feature="c5"``: C5 (stride 32, 2048 channels), 7x7 pooling and
    the two-fc head. ``roi_op``: "roi_pool" (the original, quantised max) or "roi_align".
    """
    weights = detector_weights(f"fasterrcnn_resnet50_{feature}", weights)
    weights_backbone = backbone_weights("resnet50", weights_backbone)
    norm_layer, trainable, num_classes, state_dict = _resolve(
        weights, weights_backbone, trainable_backbone_layers, num_classes
    )
    backbone = resnet_single_map_backbone(50, feature=feature, norm_layer=norm_layer, trainable_layers=trainable)
    anchor_generator = AnchorGenerator((tuple(anchor_sizes),), (tuple(aspect_ratios),))
    rpn_head = RPNHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0])
    if feature == "c4":
        pooler = SingleMapRoIPooler("0", 14, op=roi_op)
        _, blocks = RESNET_SPECS[50]
        head = Res5Head(make_stage(Bottleneck, 1024, 512, blocks[3], 2, norm_layer), out_features=2048)
        if trainable < 1:  # res5 counts as the backbone's last layer for freezing
            head.requires_grad_(False)
        backbone_parts = {"": backbone.body, "layer4.": head}
    else:
        pooler = SingleMapRoIPooler("0", 7, op=roi_op)
        head = TwoMLPHead(backbone.out_channels * 7 * 7, overrides.pop("representation_size", 1024))
        backbone_parts = {"": backbone.body}
    if weights_backbone is not None and weights is None:
        load_backbone_weights(backbone_parts, weights_backbone)
    return _single_map_model(
        backbone,
        anchor_generator,
        rpn_head,
        pooler,
        head,
        num_classes=num_classes,
        overrides=overrides,
        weights=weights,
        state_dict=state_dict,
    )


def _single_map_model(
    backbone,
    anchor_generator,
    rpn_head,
    pooler,
    head,
    *,
    num_classes: int,
    overrides: dict,
    weights: PathOrURL,
    state_dict,
) -> FasterRCNN:
    """The detector around one feature map's parts, with the single-map defaults, loaded from ``weights``."""
    options = {**SINGLE_MAP_DEFAULTS, **overrides}
    model = FasterRCNN(
        backbone,
        None,
        rpn_anchor_generator=anchor_generator,
        rpn_head=rpn_head,
        box_roi_pool=pooler,
        box_head=head,
        box_predictor=FastRCNNPredictor(head.out_features, num_classes),
        **options,
    )
    if weights is not None:
        load_detector_weights(model, weights, state_dict=state_dict)
    return model


fasterrcnn_resnet50_c4 = functools.partial(fasterrcnn_resnet50_single_map, feature="c4")
fasterrcnn_resnet50_c5 = functools.partial(fasterrcnn_resnet50_single_map, feature="c5")
fasterrcnn_resnet50_c4.__doc__ = "Faster R-CNN on ResNet-50 C4 with a res5 head (see fasterrcnn_resnet50_single_map)."
fasterrcnn_resnet50_c5.__doc__ = "Faster R-CNN on ResNet-50 C5 with a 2-fc head (see fasterrcnn_resnet50_single_map)."


def fasterrcnn_resnet18_c4(
    *,
    roi_op: str = "roi_align",
    roi_output_size: int = 7,
    num_classes: int | None = None,
    weights: PathOrURL = None,
    weights_backbone: PathOrURL = None,
    trainable_backbone_layers: int | None = None,
    anchor_sizes: tuple[int, ...] = (128, 256, 512),
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    representation_size: int = 1024,
    **overrides,
) -> FasterRCNN:
    """Faster R-CNN on the C4 map of a ResNet-18 (stride 16, 256 channels): the RPN with
    ``len(anchor_sizes) * len(aspect_ratios)`` anchors per location, ``roi_op`` to
    ``roi_output_size`` squared bins, and the two-fc head (a res5 head per RoI would cost a CPU far
    more than the rest of the model). The single-map counterpart of ``fasterrcnn_resnet18_fpn``."""
    weights = detector_weights("fasterrcnn_resnet18_c4", weights)
    weights_backbone = backbone_weights("resnet18", weights_backbone)
    norm_layer, trainable, num_classes, state_dict = _resolve(
        weights, weights_backbone, trainable_backbone_layers, num_classes
    )
    backbone = resnet_single_map_backbone(18, feature="c4", norm_layer=norm_layer, trainable_layers=trainable)
    if weights_backbone is not None and weights is None:  # an ImageNet ResNet-18's layer4 is not part of it
        load_backbone_weights({"": backbone.body}, weights_backbone, skip=("layer4.",))
    anchor_generator = AnchorGenerator((tuple(anchor_sizes),), (tuple(aspect_ratios),))
    rpn_head = RPNHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0])
    pooler = SingleMapRoIPooler("0", roi_output_size, op=roi_op, sampling_ratio=2)
    head = TwoMLPHead(backbone.out_channels * roi_output_size**2, representation_size)
    return _single_map_model(
        backbone,
        anchor_generator,
        rpn_head,
        pooler,
        head,
        num_classes=num_classes,
        overrides=overrides,
        weights=weights,
        state_dict=state_dict,
    )


BUILDERS = {
    "fasterrcnn_resnet18_fpn": fasterrcnn_resnet18_fpn,
    "fasterrcnn_resnet34_fpn": fasterrcnn_resnet34_fpn,
    "fasterrcnn_resnet50_fpn": fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_resnet101_fpn": fasterrcnn_resnet101_fpn,
    "fasterrcnn_resnet50_c4": fasterrcnn_resnet50_c4,
    "fasterrcnn_resnet50_c5": fasterrcnn_resnet50_c5,
    "fasterrcnn_resnet18_c4": fasterrcnn_resnet18_c4,
    "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_320_fpn": fasterrcnn_mobilenet_v3_large_320_fpn,
}
