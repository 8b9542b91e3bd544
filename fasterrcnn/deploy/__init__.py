"""Deployment: export a trained detector (ONNX, OpenVINO IR, TorchScript) and run the exported file.

    from fasterrcnn.deploy import export
    export(model, "detector.onnx", format="onnx", class_names=names)
    Detector.load("detector.onnx", backend="onnxruntime")      # fasterrcnn.Detector, the same Detections
    quantize(model, "detector_int8.xml", calibration_images=images)   # int8 (NNCF), run by backend="openvino"

onnx, onnxscript, onnxruntime, openvino and nncf are the optional ``deploy`` extra.
"""

from .export import FORMATS, export
from .graph import DeployGraph, ExportError
from .quantize import quantize

__all__ = ["FORMATS", "DeployGraph", "ExportError", "export", "quantize"]
