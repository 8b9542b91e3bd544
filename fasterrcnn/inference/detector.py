"""The Python face of inference: load a detector once, call it on images of any usual kind.

    from fasterrcnn import Detector
    detector = Detector.load("runs/demo/best.pt")            # or torchvision weights, a path or URL
    found = detector("photo.jpg")                             # also a PIL image, a NumPy array, a tensor
    for box, name, score in zip(found.boxes, found.names, found.scores): ...
    many = detector(["a.jpg", "b.png"], batch_size=4)         # a list in, a list out
    for index, frame, found in detector.stream("clip.mp4"):   # a video, a camera ("0") or a stream URL
        ...                                                   # frame: [H, W, 3] uint8 RGB

An image is a path (any file Pillow reads, EXIF orientation applied), a PIL image, a NumPy array
``[H, W]`` / ``[H, W, 3|4]`` (uint8 0..255 or float 0..1) or a tensor ``[3, H, W]`` (uint8 or float
0..1). Boxes come back as xyxy pixels of the image as given, float32 on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.images import load_image
from ..data.video_source import VideoFrame
from ..deploy.runtimes import ExportedFileError, ExportedModel
from ..engine.evaluator import autocast, optimized_for_inference
from ..engine.setup import load_model_for_inference, resolve_device
from ..model.faster_rcnn import FasterRCNN
from ..model.input_checks import image_problem
from ..model.tta import TestTimeAugmentation


@dataclass
class Detections:
    """The detections in one image, best first: boxes [D, 4] xyxy, scores [D], labels [D] (the
    model's label indices, 1..C) and their class names."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to_coco(self, image_id: int, label_to_cat_id: dict[int, int]) -> list[dict]:
        """COCO results records: ``{image_id, category_id, bbox: [x, y, w, h], score}``."""
        out = []
        for (x1, y1, x2, y2), score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_cat_id.get(label, label)),
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(score, 5),
                }
            )
        return out


def to_image_tensor(image, *, name: str = "image") -> torch.Tensor:
    """Any supported image -> float32 Tensor[3, H, W] in [0, 1]; a clear error naming ``name`` otherwise."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)  # DataError naming the file when it is missing or not an image
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None].repeat(3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"{name}: a NumPy image must be [H, W], [H, W, 3] or [H, W, 4], got {list(image.shape)}")
        tensor = torch.from_numpy(np.array(image[:, :, :3])).permute(2, 0, 1)  # a copy: the caller's array stays theirs
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"{name}: a tensor image must be [3, H, W], got {list(tensor.shape)}")
    else:
        raise TypeError(f"{name}: expected a path, a PIL image, a NumPy array or a tensor, got {type(image).__name__}")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float().div_(255)
    elif not tensor.is_floating_point():
        raise ValueError(f"{name}: expected uint8 (0..255) or float (0..1) pixels, got {tensor.dtype}")
    tensor = tensor.float()
    problem = image_problem(tensor)  # a side of 0 pixels, NaN or infinite pixels
    if problem is not None:
        raise ValueError(f"{name}: {problem}; the detector cannot use this image")
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise ValueError(
            f"{name}: float pixels must lie in [0, 1] (got {float(tensor.min()):.3g}.."
            f"{float(tensor.max()):.3g}); pass uint8 for 0..255"
        )
    return tensor


def load_weights(
    weights: str | os.PathLike,
    *,
    backend: str = "torch",
    arch: str = "fasterrcnn_resnet50_fpn",
    device: str = "auto",
    threads: int | None = None,
    bf16: bool = False,
) -> tuple[torch.nn.Module | ExportedModel, list[str], dict[int, int], bool]:
    """-> (model, class names, label_to_cat_id, exported): a training or torchvision-format checkpoint built with
    ``arch`` on ``device`` (not yet optimised), or an exported file (``fasterrcnn export`` / ``quantize``) under
    ``backend`` with its own class names (``bf16``: the runtime's bfloat16; on the CPU whatever ``device``).
    An .onnx or .xml given to the "torch" backend is named with the backend that runs it. ``threads``: the
    runtime's threads, or torch's for a checkpoint."""
    from ..deploy.runtimes import BACKENDS, is_torchscript_file, load_exported

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    suffix = Path(weights).suffix.lower() if isinstance(weights, (str, os.PathLike)) else ""
    if backend == "torch" and suffix in (".onnx", ".xml"):
        kind = "an ONNX file" if suffix == ".onnx" else "an OpenVINO IR"
        raise ExportedFileError(
            f"{weights}: this is {kind}; run it with --backend "
            f"{'onnxruntime' if suffix == '.onnx' else 'openvino'} (backend=... in Python)"
        )
    if backend != "torch" or (os.path.isfile(weights) and is_torchscript_file(weights)):
        exported = load_exported(weights, backend, threads=threads, bf16=bf16)
        return exported, exported.class_names, exported.label_to_cat_id, True
    if threads:
        torch.set_num_threads(int(threads))
    model, names, label_to_cat_id = load_model_for_inference(weights, arch=arch, device=resolve_device(device))
    return model, names, label_to_cat_id, False


class Detector:
    """A detector in eval mode with its class names; ``__call__`` runs it on one image or a list.

    With ``optimize`` (the default), the detector runs its own copy of the model prepared by
    ``FasterRCNN.optimize_for_inference``: BatchNorm folded into the convolutions, channels-last, and
    with ``bf16`` the network in bfloat16 (boxes, scores and NMS in float32); the model passed in is
    left as it was. Without it (or for a model that has no such method), ``bf16`` means autocast.
    """

    def __init__(
        self,
        model: torch.nn.Module | ExportedModel,
        class_names: list[str],
        *,
        label_to_cat_id: dict[int, int] | None = None,
        device: torch.device | str = "cpu",
        score_threshold: float = 0.5,
        bf16: bool = False,
        optimize: bool = True,
        tta: bool | dict = False,
    ):
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold}")
        self.device = torch.device(device)
        # the autocast left to do: none for an optimised model (its dtype is set)
        self.amp = "bf16" if bf16 else "none"
        if optimize and isinstance(model, torch.nn.Module):
            model, self.amp = optimized_for_inference(model, self.amp)
        self.model = model.to(self.device).eval()
        if tta:  # test-time augmentation around the (optimised) model: model/tta.py
            if not isinstance(self.model, nn.Module):
                raise ValueError("test-time augmentation runs our eager model; an exported model runs without it")
            self.model = TestTimeAugmentation(self.model, **(tta if isinstance(tta, dict) else {})).eval()
        self.class_names = list(class_names)
        self.label_to_cat_id = dict(label_to_cat_id or {i: i for i in range(1, len(class_names))})
        self.score_threshold = score_threshold
        self.bf16 = bf16

    @classmethod
    def load(
        cls,
        weights: str | os.PathLike,
        *,
        arch: str = "fasterrcnn_resnet50_fpn",
        device: str = "auto",
        score_threshold: float = 0.5,
        bf16: bool = False,
        optimize: bool = True,
        backend: str = "torch",
        threads: int | None = None,
        tta: bool | dict = False,
    ) -> Detector:
        """From one of our training checkpoints (last.pt/best.pt: architecture and class names come
        with it) or a torchvision-format detector checkpoint built with ``arch`` (COCO's names).
        ``weights`` may be a URL: it is read through torch.hub's cache.

        An exported file (``fasterrcnn export``) runs under ``backend``: "onnxruntime" (.onnx), "openvino"
        (.xml IR or .onnx) or "torch" (a TorchScript file); its class names come from the file, ``bf16``
        asks the runtime for bfloat16 (OpenVINO), ``threads`` sets the runtime's threads.

        ``tta``: test-time augmentation (``True``: three sizes, 0.8x, 1x and 1.2x, each also mirrored, merged by
        class-wise NMS; or a dict of ``TestTimeAugmentation``'s arguments: scales, hflip, merge, iou_threshold)."""
        model, names, label_to_cat_id, exported = load_weights(
            weights, backend=backend, arch=arch, device=device, threads=threads, bf16=bf16
        )
        if exported:
            return cls(
                model,
                names,
                label_to_cat_id=label_to_cat_id or None,
                device=device if device != "auto" else "cpu",
                score_threshold=score_threshold,
                optimize=False,
                tta=tta,
            )
        dev = resolve_device(device)
        if optimize and isinstance(model, FasterRCNN):  # ours alone: prepared in place, no copy
            model.optimize_for_inference(dtype=torch.bfloat16 if bf16 else torch.float32)
        return cls(
            model,
            names,
            label_to_cat_id=label_to_cat_id,
            device=dev,
            score_threshold=score_threshold,
            bf16=bf16,
            optimize=optimize,
            tta=tta,
        )

    def __call__(self, images, *, batch_size: int = 1) -> Detections | list[Detections]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1 (images per forward pass), got {batch_size!r}")
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        out: list[Detections] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            tensors = [to_image_tensor(im, name=_describe(im, start + i)) for i, im in enumerate(chunk)]
            out.extend(self.detect(tensors))
        return out[0] if single else out

    @torch.inference_mode()
    def detect(self, images: list[torch.Tensor]) -> list[Detections]:
        """Tensors [3, H, W] in [0, 1] -> one Detections each (scores >= the threshold). An image the
        model cannot use (a side of 0 pixels, NaN or infinite pixels) is a ValueError naming its index."""
        if not images:
            return []
        for i, im in enumerate(images):
            problem = image_problem(im)
            if problem is not None:
                raise ValueError(f"image {i}: {problem}; the detector cannot use this image")
        return self._detect_usable(images)

    @torch.inference_mode()
    def _detect_usable(self, images: list[torch.Tensor]) -> list[Detections]:
        """``detect`` for images known to be usable (video frames: uint8 pictures, no NaN possible)."""
        with autocast(self.device, self.amp):
            raw = self.model([im.to(self.device, non_blocking=True) for im in images])
        results = []
        for d in raw:
            keep = d["scores"] >= self.score_threshold
            boxes, scores, labels = (
                d[k][keep].float().cpu() if d[k].is_floating_point() else d[k][keep].cpu()
                for k in ("boxes", "scores", "labels")
            )
            names = [self.name_of(int(lb)) for lb in labels]
            results.append(Detections(boxes, scores, labels, names))
        return results

    def stream(
        self,
        source: str | os.PathLike,
        *,
        batch_size: int = 1,
        stride: int = 1,
        max_frames: int | None = None,
    ):
        """Yield ``(frame_index, frame, Detections)`` for the frames of a video file, a camera (``"0"``: the
        first) or a stream URL (rtsp://, http://, ...); frame is [H, W, 3] uint8 RGB, frame_index counts
        every frame of the source. Frames are decoded in a background thread (PyAV, the ``video`` extra)
        and run ``batch_size`` at a time; ``stride`` K takes every K-th frame, ``max_frames`` stops after
        that many. A live source never waits for the model: frames it would have to wait for are dropped.
        A source that cannot be opened is a VideoError at once; a file damaged or cut off part-way yields
        the frames before the damage, then raises VideoError saying where it stopped."""
        from ..data.video_source import FrameReader, VideoError

        with FrameReader(source, stride=stride, max_frames=max_frames, queue_size=max(8, 2 * batch_size)) as reader:
            for frame, found in detect_frames(self, reader, batch_size):
                yield frame.index, frame.image, found
        if reader.error:
            raise VideoError(reader.error)

    def categories(self) -> list[dict]:
        """COCO "categories" records of the detector's classes: ``{id, name}``, background left out."""
        return [
            {"id": self.label_to_cat_id.get(label, label), "name": name}
            for label, name in enumerate(self.class_names)
            if label > 0
        ]

    def name_of(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class_{label}"


def _describe(image, index: int) -> str:
    return os.fspath(image) if isinstance(image, (str, Path)) else f"image {index}"


def detect_frames(
    detector: Detector, frames: Iterable[VideoFrame], batch_size: int = 1
) -> Iterator[tuple[VideoFrame, Detections]]:
    """(frame, its detections) for each frame, the model run on ``batch_size`` frames at a time."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1 (frames per forward pass), got {batch_size!r}")
    batch: list[VideoFrame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == batch_size:
            yield from _detect(detector, batch)
            batch = []
    if batch:
        yield from _detect(detector, batch)


def _detect(detector: Detector, batch: list[VideoFrame]) -> list[tuple[VideoFrame, Detections]]:
    return list(zip(batch, detector._detect_usable([frame_tensor(f.image) for f in batch])))


def frame_tensor(image: np.ndarray) -> torch.Tensor:
    """A decoded frame [H, W, 3] uint8 -> Tensor[3, H, W] float32 in [0, 1], the values and layout
    ``to_image_tensor`` gives (so a frame detects as the same picture passed as an image does), without its
    checks for NaN and range, which a uint8 picture cannot fail: 2.6 -> 0.6 ms a 640x480 frame."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
