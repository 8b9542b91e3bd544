"""fasterrcnn: a from-scratch Faster R-CNN on PyTorch.

    import fasterrcnn
    model = fasterrcnn.fasterrcnn_resnet50_fpn(weights="fasterrcnn_resnet50_fpn_coco.pth").eval()
    detections = model([image])  # image: Tensor[3, H, W] in [0, 1]

    detector = fasterrcnn.Detector.load("runs/demo/best.pt")  # weights and class names, once
    found = detector("photo.jpg")  # or a PIL image, a NumPy array, a tensor; .boxes .scores .names

The builders are imported on first use, so that ``fasterrcnn.data`` and the command line start
without loading the model code.
"""

import importlib

__version__ = "0.1.0"

_MODEL_EXPORTS = {
    "FasterRCNN",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_resnet18_c4",
    "fasterrcnn_resnet18_fpn",
    "fasterrcnn_resnet34_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet101_fpn",
    "fasterrcnn_resnet50_c4",
    "fasterrcnn_resnet50_c5",
    "fasterrcnn_resnet50_single_map",
}
_ENGINE_EXPORTS = {"Detector": ".inference.detector", "Detections": ".inference.detector"}
__all__ = sorted(_MODEL_EXPORTS | set(_ENGINE_EXPORTS))


def __getattr__(name: str):
    if name in _MODEL_EXPORTS:
        return getattr(importlib.import_module(".model", __name__), name)
    if name in _ENGINE_EXPORTS:
        return getattr(importlib.import_module(_ENGINE_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'fasterrcnn' has no attribute {name!r}")
