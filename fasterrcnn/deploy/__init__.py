"""Deployment: export a trained detector (ONNX, OpenVINO IR, TorchScript) and run the exported file.

    from fasterrcnn.deploy import export
    export(model, "detector.onnx", format="onnx", class_names=names)
    Detector.load("detector.onnx", backend="onnxruntime")      # fasterrcnn.Detector, the same Detections

onnx, onnxscript, onnxruntime and openvino are the optional ``deploy`` extra.
"""

from .export import FORMATS, export
from .graph import DeployGraph, ExportError

__all__ = ["FORMATS", "DeployGraph", "ExportError", "export"]
