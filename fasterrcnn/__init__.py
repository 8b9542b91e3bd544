"""fasterrcnn: a from-scratch Faster R-CNN on PyTorch.

    import fasterrcnn
    model = fasterrcnn.fasterrcnn_resnet50_fpn(weights="fasterrcnn_resnet50_fpn_coco.pth").eval()
    detections = model([image])  # image: Tensor[3, H, W] in [0, 1]
"""
from .model import (
    FasterRCNN,
    fasterrcnn_resnet18_fpn,
    fasterrcnn_resnet34_fpn,
    fasterrcnn_resnet50_c4,
    fasterrcnn_resnet50_c5,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_single_map,
    fasterrcnn_resnet101_fpn,
)

__version__ = "0.1.0"
