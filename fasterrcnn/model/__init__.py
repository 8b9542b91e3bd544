"""The detector: backbone, RPN, RoI heads, transform, and the builders that assemble them."""

from .anchors import AnchorGenerator
from .backbone import (
    BackboneWithFPN,
    SingleMapBackbone,
    build_resnet_fpn,
    resnet_fpn_backbone,
    resnet_single_map_backbone,
)
from .builders import (
    BUILDERS,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet18_c4,
    fasterrcnn_resnet18_fpn,
    fasterrcnn_resnet34_fpn,
    fasterrcnn_resnet50_c4,
    fasterrcnn_resnet50_c5,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
    fasterrcnn_resnet50_single_map,
    fasterrcnn_resnet101_fpn,
    fasterrcnn_resnet_fpn,
)
from .faster_rcnn import FasterRCNN
from .fpn import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7
from .frozen_bn import FrozenBatchNorm2d
from .matcher import Matcher
from .mobilenet import MobileNetV3Body
from .mobilenet_backbone import mobilenet_backbone
from .recorder import Recorder
from .resnet import ResNetBody
from .roi_heads import ConvFCHead, FastRCNNPredictor, Res5Head, RoIHeads, TwoMLPHead
from .rpn import RegionProposalNetwork, RPNHead
from .sampler import BalancedPositiveNegativeSampler
from .single_map_pooler import SingleMapRoIPooler
from .transform import DetectionTransform, ImageList
from .weights import WeightsError, load_backbone_weights, load_detector_weights, read_state_dict
