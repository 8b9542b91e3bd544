"""Run an exported detector: ONNX Runtime, OpenVINO or TorchScript behind the eager model's interface.

    model = load_exported("detector.onnx", backend="onnxruntime", threads=2)
    model([image])          # images [3, H, W] float in [0, 1] -> [{boxes, scores, labels}], as the eager model
    model.metadata          # class names and settings written at export

``Detector.load(path, backend=...)`` wraps this in the usual ``Detector``. Images of one size are run as one
batch; a list of mixed sizes is run size by size (the graph takes a batch of one size), results in order.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .export import METADATA_KEY, require

BACKENDS = ("torch", "onnxruntime", "openvino")


class ExportedFileError(ValueError):
    """An exported file that cannot be read (missing, truncated, corrupt, or not one of ours)."""


class BackendOptionError(ValueError):
    """An option the chosen runtime does not have (bfloat16 under ONNX Runtime, a GPU device)."""


def is_torchscript_file(path: str | os.PathLike) -> bool:
    """A TorchScript archive written by ``export`` (a zip with our metadata as an extra file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"/extra/{METADATA_KEY}.json") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class ExportedModel:
    """An exported detector called like the eager model. ``run(batch)`` is the backend's: a NumPy batch
    ``[N, 3, H, W]`` in the file's input dtype -> (boxes, scores, labels, num_detections) arrays."""

    backend = ""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.metadata = meta
        self.uint8_input = meta["input"]["dtype"] == "uint8"
        self.class_names: list[str] = list(meta["class_names"])
        self.label_to_cat_id = {int(k): int(v) for k, v in meta.get("label_to_cat_id", {}).items()}

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def to(self, device) -> ExportedModel:
        if torch.device(device).type != "cpu":
            raise BackendOptionError(f"the {self.backend} backend runs on the CPU here; got device {device}")
        return self

    training = False  # an exported model only infers; code that saves and restores a module's mode works

    def eval(self) -> ExportedModel:
        return self

    def train(self, mode: bool = True) -> ExportedModel:
        if mode:
            raise BackendOptionError(f"{self.path}: an exported model cannot train; train the checkpoint it came from")
        return self

    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        out: list[dict] = [{} for _ in images]
        start = 0
        while start < len(images):  # runs of consecutive images of one size, one batch each
            size = tuple(images[start].shape[-2:])
            end = start
            while end < len(images) and tuple(images[end].shape[-2:]) == size:
                end += 1
            batch = torch.stack([im.detach().cpu().float() for im in images[start:end]])
            if self.uint8_input:
                batch = batch.mul(255).round_().clamp_(0, 255).to(torch.uint8)
            boxes, scores, labels, counts = self.run(np.ascontiguousarray(batch.numpy()))
            for i in range(end - start):
                n = int(counts[i])
                out[start + i] = {
                    "boxes": torch.from_numpy(np.array(boxes[i, :n], dtype=np.float32)),
                    "scores": torch.from_numpy(np.array(scores[i, :n], dtype=np.float32)),
                    "labels": torch.from_numpy(np.array(labels[i, :n], dtype=np.int64)),
                }
            start = end
        return out


class OnnxRuntimeModel(ExportedModel):
    backend = "onnxruntime"

    def __init__(self, path: Path, *, threads: int | None = None, bf16: bool = False):
        ort = require("onnxruntime", "the onnxruntime backend")
        if bf16:
            raise BackendOptionError(
                "onnxruntime has no bfloat16 path for this model on the CPU; run it in float32, "
                "or use --backend openvino"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExportedFileError(f"{path}: onnxruntime cannot load this file as an ONNX model ({e})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        super().__init__(path, _parse_metadata(raw, path))

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"images": batch})


class OpenVinoModel(ExportedModel):
    backend = "openvino"

    def __init__(self, path: Path, *, threads: int | None = None, bf16: bool = False):
        ov = require("openvino", "the openvino backend")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as e:  # OpenVINO raises RuntimeError and its own types
            raise ExportedFileError(f"{path}: OpenVINO cannot read this file as an IR or ONNX model ({e})") from None
        if model.has_rt_info([METADATA_KEY]):
            raw = model.get_rt_info([METADATA_KEY]).astype(str)
        else:  # an ONNX file read by OpenVINO: its metadata_props
            raw = _onnx_metadata(path)
        super().__init__(path, _parse_metadata(raw, path))
        config: dict[str, str | int] = {
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:
            raise ExportedFileError(f"{path}: OpenVINO cannot compile this model ({e})") from None
        self.request = self.compiled.create_infer_request()

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer({0: batch})
        return [result[out] for out in self.compiled.outputs]


class TorchScriptModel(ExportedModel):
    backend = "torch"

    def __init__(self, path: Path, *, threads: int | None = None, bf16: bool = False):
        if bf16:
            raise BackendOptionError(
                "the TorchScript file runs in float32; for bfloat16 run the checkpoint (--backend torch)"
            )
        files = {f"{METADATA_KEY}.json": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated; the user chose it
                self.module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        except Exception as e:  # torch.jit raises RuntimeError and others on a damaged archive
            raise ExportedFileError(f"{path}: torch.jit.load cannot read this TorchScript file ({e})") from None
        if threads:
            torch.set_num_threads(int(threads))
        super().__init__(path, _parse_metadata(files[f"{METADATA_KEY}.json"] or None, path))

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            return [t.numpy() for t in self.module(torch.from_numpy(batch))]


def load_exported(
    path: str | os.PathLike, backend: str, *, threads: int | None = None, bf16: bool = False
) -> ExportedModel:
    """The exported file at ``path`` run by ``backend``: "onnxruntime" (.onnx), "openvino" (.xml IR or
    .onnx) or "torch" (a TorchScript file from ``export``)."""
    path = Path(path)
    if backend not in BACKENDS:
        raise BackendOptionError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not path.is_file():
        raise ExportedFileError(f"{path}: no such file")
    if backend == "onnxruntime":
        if path.suffix.lower() != ".onnx":
            raise ExportedFileError(f"{path}: the onnxruntime backend runs .onnx files (export with --format onnx)")
        return OnnxRuntimeModel(path, threads=threads, bf16=bf16)
    if backend == "openvino":
        if path.suffix.lower() not in (".xml", ".onnx"):
            raise ExportedFileError(f"{path}: the openvino backend runs an IR (.xml beside its .bin) or an .onnx file")
        return OpenVinoModel(path, threads=threads, bf16=bf16)
    if not is_torchscript_file(path):
        raise ExportedFileError(f"{path}: not a TorchScript file written by fasterrcnn export (or it is damaged)")
    return TorchScriptModel(path, threads=threads, bf16=bf16)


def _onnx_metadata(path: Path) -> str | None:
    onnx = require("onnx", "reading an ONNX file's metadata")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportedFileError(f"{path}: not a readable ONNX file ({e})") from None
    return next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)


def _parse_metadata(raw: str | None, path: Path) -> dict:
    if not raw:
        raise ExportedFileError(
            f"{path}: no fasterrcnn metadata (class names, input type) in this file; was it written by "
            "`fasterrcnn export`?"
        )
    try:
        meta = json.loads(raw)
        _ = meta["class_names"], meta["input"]["dtype"]  # the fields the runtime reads
    except (ValueError, KeyError, TypeError) as e:
        raise ExportedFileError(f"{path}: its fasterrcnn metadata is not readable ({e})") from None
    return meta
