"""Export a trained detector: ONNX, OpenVINO IR or TorchScript, each with its class names inside.

    from fasterrcnn.deploy import export
    export(model, "detector.onnx", format="onnx", class_names=names)

What is exported is ``DeployGraph`` (graph.py) around a copy of the model with every BatchNorm folded into
the convolution before it: pixels in (``[N, 3, H, W]``, any N, H and W), the table of detections out.

- ONNX (opset 18): through ``torch.export`` (``torch.onnx.export(..., dynamo=True)``); NMS, RoIAlign and
  RoIPool become the standard ONNX operators (graph_ops.py). The metadata (``metadata_props``) holds the
  class names and the settings as JSON under the key ``fasterrcnn``.
- OpenVINO IR (``.xml`` + ``.bin``): the ONNX graph converted by OpenVINO's own converter
  (``openvino.convert_model``), weights kept in float32; the metadata is in the IR's ``rt_info``.
- TorchScript: ``torch.jit.script`` of the graph, its network (backbone, RPN head, box head) traced
  first; NMS and RoIAlign are scripted functions, so the file runs under ``torch.jit.load`` (or LibTorch)
  without fasterrcnn. The metadata is the extra file ``fasterrcnn.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..model.fast_path import fold_batchnorm
from ..model.faster_rcnn import FasterRCNN
from .graph import INPUT_DTYPES, DeployGraph, ExportError, interpolating_fpns

FORMATS = ("onnx", "openvino", "torchscript")
OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]
METADATA_KEY = "fasterrcnn"
METADATA_VERSION = 1
ONNX_OPSET = 18
DEPLOY_EXTRA = "pip install 'fasterrcnn[deploy]' (onnx, onnxscript, onnxruntime, openvino)"


class MissingExtraError(ImportError):
    """An optional package of the ``deploy`` extra is not installed."""


def require(module: str, purpose: str):
    """Import an optional dependency of the ``deploy`` extra, or say which extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs the Python package {module!r}, which is not installed: {DEPLOY_EXTRA}"
        ) from None


def prepare_graph(model: nn.Module, *, input_dtype: str = "uint8", score_threshold: float | None = None) -> DeployGraph:
    """The exportable graph of a copy of ``model`` (eval mode, BatchNorm folded); ``score_threshold``
    replaces the model's ``box_score_thresh`` in the copy (detections scoring at most this are dropped)."""
    if not all(hasattr(model, part) for part in ("transform", "backbone", "rpn", "roi_heads")):
        raise ExportError(f"expected a fasterrcnn FasterRCNN, got {type(model).__name__}")
    if getattr(model, "inference_only", False):
        raise ExportError(
            "this model was prepared by optimize_for_inference(); export the model as loaded (export folds the "
            "BatchNorm itself)"
        )
    model = cast(FasterRCNN, copy.deepcopy(model).float().cpu().eval())
    fold_batchnorm(model)
    interpolating_fpns(model)
    if score_threshold is not None:
        if not 0.0 <= score_threshold < 1.0:
            raise ExportError(f"score_threshold must lie in [0, 1), got {score_threshold}")
        model.roi_heads.score_thresh = float(score_threshold)
    for p in model.parameters():
        p.requires_grad_(False)
    return DeployGraph(model, input_dtype=input_dtype).eval()


def metadata(
    graph: DeployGraph, class_names: list[str], label_to_cat_id: dict[int, int] | None, arch: str | None
) -> dict:
    if len(class_names) != graph.num_classes:
        raise ExportError(
            f"class_names: {len(class_names)} names for a model of {graph.num_classes} classes (background first)"
        )
    return {
        "format_version": METADATA_VERSION,
        "producer": f"fasterrcnn {_version()}",
        "arch": arch,
        "class_names": list(class_names),
        "label_to_cat_id": {str(k): int(v) for k, v in (label_to_cat_id or {}).items()},
        "input": {"name": "images", "shape": ["N", 3, "H", "W"], "dtype": "uint8" if graph.uint8_input else "float32"},
        "outputs": OUTPUT_NAMES,
        "min_size": graph.min_size,
        "max_size": graph.max_size,
        "score_threshold": graph.box_score_thresh,
        "detections_per_img": graph.detections_per_img,
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fasterrcnn")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "onnx",
    class_names: list[str] | None = None,
    label_to_cat_id: dict[int, int] | None = None,
    arch: str | None = None,
    input_dtype: str = "uint8",
    score_threshold: float | None = None,
    example_size: tuple[int, int] = (480, 640),
) -> Path:
    """Write ``model`` (a FasterRCNN) to ``path`` in ``format`` ("onnx", "openvino" (``path`` is the .xml;
    the .bin is written beside it) or "torchscript"). ``class_names``: background first (default
    ``class_0..``); ``input_dtype``: "uint8" (pixels 0..255) or "float32" (0..1); ``example_size``: the
    (H, W) traced (any size runs). -> the file written."""
    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    graph = prepare_graph(model, input_dtype=input_dtype, score_threshold=score_threshold)
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(graph.num_classes)]
    meta = metadata(graph, names, label_to_cat_id, arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _example(graph, example_size)
    if format == "onnx":
        _export_onnx(graph, example, path, meta)
    elif format == "openvino":
        require("openvino", "exporting to OpenVINO")
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            _export_onnx(graph, example, onnx_path, meta)
            openvino_from_onnx(onnx_path, path)
    else:
        _export_torchscript(graph, example, path, meta)
    return path


def _example(graph: DeployGraph, size: tuple[int, int]) -> torch.Tensor:
    """Two images (a batch of one would fix the batch size: torch.export specialises sizes 0 and 1)."""
    h, w = size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, h, w), generator=generator, dtype=torch.uint8)
    return pixels if graph.uint8_input else pixels.float() / 255


def _export_onnx(graph: DeployGraph, example: torch.Tensor, path: Path, meta: dict) -> None:
    onnx = require("onnx", "exporting to ONNX")
    require("onnxscript", "exporting to ONNX")
    from .graph_ops import onnx_translations

    dim = torch.export.Dim
    shapes = {"images": {0: dim("batch", min=1, max=1024), 2: dim("height", min=1), 3: dim("width", min=1)}}
    with warnings.catch_warnings(), _quiet_loggers("onnx_ir", "onnxscript", "torch.onnx"):
        warnings.simplefilter("ignore")  # the exporter's deprecation and progress chatter
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            dynamic_shapes=shapes,
            custom_translation_table=onnx_translations(),
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=OUTPUT_NAMES,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The ONNX tool chain logs each graph rewrite at INFO or WARNING; only its errors are shown."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def openvino_model(onnx_path: str | os.PathLike):
    """An ONNX file written by ``export`` -> the OpenVINO model in memory (``openvino.Model``), converted by
    OpenVINO's own converter, the metadata carried over into its rt_info."""
    ov = require("openvino", "exporting to OpenVINO")
    onnx = require("onnx", "reading an ONNX file's metadata")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    raw = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    if raw is None:
        raise ExportError(f"{onnx_path}: no fasterrcnn metadata; convert a file written by `fasterrcnn export`")
    ir = ov.convert_model(str(onnx_path))
    ir.set_rt_info(raw, [METADATA_KEY])
    return ir


def openvino_from_onnx(onnx_path: str | os.PathLike, path: str | os.PathLike) -> Path:
    """An ONNX file written by ``export`` -> the OpenVINO IR at ``path`` (.xml, its .bin beside it), float32
    weights kept (``openvino_model`` saved)."""
    ov = require("openvino", "exporting to OpenVINO")
    ov.save_model(openvino_model(onnx_path), str(path), compress_to_fp16=False)
    return Path(path)


def _export_torchscript(graph: DeployGraph, example: torch.Tensor, path: Path, meta: dict) -> None:
    if graph.pool_op == "roi_pool" or graph.sampling_ratio <= 0:
        raise ExportError(
            f"TorchScript export covers RoIAlign with a fixed sampling ratio; this model pools with {graph.pool_op} "
            f"(sampling ratio {graph.sampling_ratio}): export it to ONNX or OpenVINO"
        )
    graph = copy.deepcopy(graph)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about shapes read as Python ints
        x, _, _ = graph.preprocess(example)
        maps = graph.maps(x)
        traced_maps = torch.jit.trace(graph.maps, (x,), strict=False)
        traced_rpn = torch.jit.trace(graph.rpn_head, (maps,), strict=False)
        pooled = torch.zeros((3, maps[0].shape[1], *graph.output_size))
        features = graph.box_head(pooled)
        traced_head = torch.jit.trace(graph.box_head, (pooled,))
        traced_predictor = torch.jit.trace(graph.box_predictor, (features,))
        graph.maps, graph.rpn_head = traced_maps, traced_rpn
        graph.box_head, graph.box_predictor = traced_head, traced_predictor
        scripted = torch.jit.script(graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated; the user chose it
        torch.jit.save(scripted, str(path), _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
