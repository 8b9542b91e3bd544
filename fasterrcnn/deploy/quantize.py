"""int8: post-training quantization of an exported detector with OpenVINO's NNCF, calibrated on training images.

    from fasterrcnn.deploy.quantize import quantize
    quantize(model, "detector_int8.xml", calibration_images=images, class_names=names)
    Detector.load("detector_int8.xml", backend="openvino")     # the same Detections, int8 network

    fasterrcnn quantize --weights best.pt --data train.json --out detector_int8.xml [--calibration-images 300]

What is quantized: the network only. The model is first exported (``export`` to ONNX, converted to an
OpenVINO model in memory); NNCF then runs it over the calibration images, records the range of every
activation that enters a convolution, a matrix product (RPN head, box head, predictor) or a residual /
top-down add between feature maps, and inserts int8 quantize steps there (weights per output channel,
activations per tensor, the PERFORMANCE preset: symmetric, what the CPU's int8 kernels take). Everything
else is in NNCF's ignored scope and stays float32: the resize and normalisation of the input, the anchors, box
decoding, clipping, the pooler's level assignment, RoIAlign's sampling positions, softmax, NMS. OpenVINO then
runs the convolutions and matrix products in int8 (AVX-512 VNNI or AMX).

Why NNCF on our IR: our exported graph already holds the whole detector in one file that OpenVINO runs
fastest on x86 CPUs of the runtimes measured (docs/results.md), and NNCF is the quantizer maintained with it.
Why this scope and what int8 gains on which CPU (little over bf16 where the CPU has AMX; 5x over float32):
docs/design-decisions.md, "CPU speed against OpenVINO, and int8".

Shapes: calibration images [3, H, W] float 0..1 (any sizes); the file's input as ``export`` writes it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .export import METADATA_KEY, _quiet_loggers, export, openvino_model, require
from .graph import ExportError

# op types NNCF may quantize the inputs of; every other type is in the ignored scope
QUANTIZED_TYPES = ("Convolution", "GroupConvolution", "MatMul")
# the producers through which an add between feature maps is recognised (a residual or top-down add)
_FEATURE_PASS_THROUGH = ("Relu", "MaxPool", "Interpolate", "Convert", "Clamp", "HSwish")


def _producer(port):
    return port.get_source_output().get_node()


def _is_feature(node, depth: int = 0) -> bool:
    """Whether ``node``'s output is a feature map of the network: a convolution, or an add, activation or
    resampling of feature maps (a conv's bias is an add of a constant)."""
    kind = node.get_type_name()
    if kind in ("Convolution", "GroupConvolution"):
        return True
    if depth > 8:
        return False
    if kind in _FEATURE_PASS_THROUGH:
        return _is_feature(_producer(node.input(0)), depth + 1)
    if kind == "Add":
        inputs = [_producer(i) for i in node.inputs()]
        constant = [n.get_type_name() == "Constant" for n in inputs]
        return not all(constant) and all(c or _is_feature(n, depth + 1) for n, c in zip(inputs, constant))
    return False


def ignored_scope(ov_model):
    """NNCF's ignored scope for our exported graph: every op type but convolutions and matrix products,
    and every add that is not between feature maps (box decoding, the input's normalisation)."""
    nncf = require("nncf", "int8 quantization")
    ops = ov_model.get_ordered_ops()
    types = sorted({op.get_type_name() for op in ops} - set(QUANTIZED_TYPES) - {"Add"})
    adds = [op.get_friendly_name() for op in ops if op.get_type_name() == "Add" and not _is_feature(op)]
    return nncf.IgnoredScope(names=adds, types=types, validate=False)


def _calibration_batches(images: Iterable[torch.Tensor], uint8: bool, limit: int) -> list[np.ndarray]:
    batches = []
    for k, image in enumerate(images):
        if k >= limit:
            break
        if not (isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ExportError(f"calibration image {k}: expected a float tensor [3, H, W] in 0..1, got {shape}")
        x = image.detach().cpu().float()[None]
        if uint8:
            x = x.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        batches.append(np.ascontiguousarray(x.numpy()))
    if not batches:
        raise ExportError("quantize: no calibration images (give some of the training images)")
    return batches


def quantize(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    calibration_images: Iterable[torch.Tensor],
    num_images: int = 300,
    class_names: list[str] | None = None,
    label_to_cat_id: dict[int, int] | None = None,
    arch: str | None = None,
    input_dtype: str = "uint8",
    score_threshold: float | None = None,
    example_size: tuple[int, int] = (480, 640),
    fast_bias_correction: bool = True,
) -> Path:
    """Write ``model`` (a FasterRCNN in float32) as an int8 OpenVINO IR at ``path`` (.xml, .bin beside it),
    calibrated on up to ``num_images`` of ``calibration_images`` (float [3, H, W] in 0..1, e.g. training
    images; 100-300 is NNCF's advice). The other arguments are ``export``'s. -> the .xml written."""
    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"{path}: an int8 model is an OpenVINO IR; give a .xml path (the .bin goes beside it)")
    if num_images < 1:
        raise ExportError(f"num_images must be >= 1, got {num_images}")
    batches = _calibration_batches(calibration_images, input_dtype == "uint8", num_images)
    ov = require("openvino", "int8 quantization")
    nncf = require("nncf", "int8 quantization")
    with tempfile.TemporaryDirectory() as tmp, _quiet_loggers("nncf"):
        onnx_path = export(  # the float graph, converted in memory: no IR written and read back
            model,
            Path(tmp) / "float.onnx",
            format="onnx",
            class_names=class_names,
            label_to_cat_id=label_to_cat_id,
            arch=arch,
            input_dtype=input_dtype,
            score_threshold=score_threshold,
            example_size=example_size,
        )
        ov_model = openvino_model(onnx_path)
        meta = json.loads(ov_model.get_rt_info([METADATA_KEY]).astype(str))
        quantized = nncf.quantize(
            ov_model,
            nncf.Dataset(batches),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(batches),
            fast_bias_correction=fast_bias_correction,
            ignored_scope=ignored_scope(ov_model),
        )
    meta["precision"] = "int8"
    meta["quantization"] = {"tool": f"nncf {nncf.__version__}", "calibration_images": len(batches)}
    quantized.set_rt_info(json.dumps(meta), [METADATA_KEY])
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return path
