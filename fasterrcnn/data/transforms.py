"""Transforms ``(image, target) -> (image, target)`` that move boxes with the image.

Every transform returns new objects and never modifies the caller's image tensor or target dict.
Randomness comes from ``generator`` (a ``torch.Generator``) when given, else from torch's global
RNG, so ``torch.manual_seed`` reproduces a run. With DataLoader workers, leave ``generator`` unset:
each worker has its own seeded global RNG, whereas one Generator object is copied into every
worker with the same state (all workers would draw the same numbers).

``SeededAugmentation`` wraps a pipeline so that each sample draws from its own RNG, seeded from
``(seed, epoch, image_id)``: the augmentation of an image then depends on nothing else (not on the
worker process that loads it, nor on how many samples that worker drew before), which is what makes
a training run resumed in the middle of an epoch exactly equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .images import image_to_tensor


def _copy_target(target: dict) -> dict:
    return dict(target)  # a new dict; the tensors in it are replaced, never modified in place


def _rand(generator) -> float:
    return float(torch.rand((), generator=generator))


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class ToTensor:
    """PIL image -> float32 Tensor[3,H,W] in [0,1]; a tensor passes through unchanged."""

    def __call__(self, image, target):
        if not isinstance(image, torch.Tensor):
            image = image_to_tensor(image)
        return image, _copy_target(target)

    def __repr__(self) -> str:
        return "ToTensor()"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``; ``x1' = W - x2``, ``x2' = W - x1``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p
        self.generator = generator

    def __call__(self, image, target):
        target = _copy_target(target)
        if _rand(self.generator) >= self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        if "boxes" in target:
            b = target["boxes"]
            target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize so the short side is one of ``min_sizes`` (chosen uniformly), unless that makes the
    long side exceed ``max_size``, in which case the long side becomes ``max_size``. Boxes and
    ``area`` are scaled with the image (bilinear, antialiased)."""

    def __init__(self, min_sizes, max_size: int, generator: torch.Generator | None = None):
        self.min_sizes = [int(s) for s in (min_sizes if isinstance(min_sizes, (list, tuple)) else [min_sizes])]
        if not self.min_sizes or min(self.min_sizes) <= 0 or max_size <= 0:
            raise ValueError(f"min_sizes and max_size must be positive, got {min_sizes}, {max_size}")
        self.max_size = int(max_size)
        self.generator = generator

    def output_size(self, height: int, width: int, min_size: int) -> tuple[int, int]:
        scale = min_size / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, image, target):
        target = _copy_target(target)
        i = int(torch.randint(len(self.min_sizes), (), generator=self.generator))
        h, w = image.shape[-2:]
        nh, nw = self.output_size(h, w, self.min_sizes[i])
        if (nh, nw) == (h, w):
            return image, target
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[
            0
        ].clamp(0.0, 1.0)
        sx, sy = nw / w, nh / h
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        return image, target

    def __repr__(self) -> str:
        return f"RandomResize(min_sizes={self.min_sizes}, max_size={self.max_size})"


def _gray(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, shape [1,H,W]."""
    r, g, b = image[0], image[1], image[2]
    return (0.299 * r + 0.587 * g + 0.114 * b)[None]


class ColorJitter:
    """Photometric jitter of a [0,1] image: brightness, then contrast, then saturation, each by a
    factor drawn uniformly from ``[max(0, 1 - x), 1 + x]``, clamped to [0,1] after each step.
    Boxes are untouched."""

    def __init__(
        self,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.generator = generator

    def _factor(self, x: float) -> float:
        lo, hi = max(0.0, 1.0 - x), 1.0 + x
        return lo + (hi - lo) * _rand(self.generator)

    def __call__(self, image, target):
        target = _copy_target(target)
        out = image
        if self.brightness > 0:
            out = (out * self._factor(self.brightness)).clamp(0.0, 1.0)
        if self.contrast > 0:
            f = self._factor(self.contrast)
            mean = _gray(out).mean()
            out = ((out - mean) * f + mean).clamp(0.0, 1.0)
        if self.saturation > 0:
            f = self._factor(self.saturation)
            gray = _gray(out)
            out = ((out - gray) * f + gray).clamp(0.0, 1.0)
        return out.clamp(0.0, 1.0), target

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation})"


def train_transforms(min_sizes=None, max_size: int = 1333, flip_p: float = 0.5, jitter: float = 0.0):
    """Training pipeline: optional multi-scale resize, horizontal flip, optional colour jitter."""
    steps: list[Callable[[Any, Any], Any]] = []
    if min_sizes:
        steps.append(RandomResize(min_sizes, max_size))
    if flip_p > 0:
        steps.append(RandomHorizontalFlip(flip_p))
    if jitter > 0:
        steps.append(ColorJitter(jitter, jitter, jitter))
    return Compose(steps)


def augmentation_seed(seed: int, epoch: int, image_id: int) -> int:
    """The seed of one image's random transforms in one epoch."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + image_id) % (2**62)


@contextlib.contextmanager
def _isolated_rngs(seed: int):
    """torch's, Python's and NumPy's global RNGs seeded with ``seed`` inside the block, restored after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededAugmentation:
    """Run ``transforms`` with every global RNG (torch, Python, NumPy) seeded from
    ``augmentation_seed(seed, epoch, target["image_id"])`` and restored afterwards.

    The same image in the same epoch is augmented the same way whichever process or position draws
    it; another epoch draws anew. Call ``set_epoch`` before each epoch's loader is iterated (worker
    processes take a copy of the dataset, with its transforms, when an iterator starts).
    """

    def __init__(self, transforms, seed: int = 0):
        self.transforms = transforms
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, image, target):
        if "image_id" not in target:
            raise KeyError(
                "SeededAugmentation seeds each sample from its target's 'image_id', which is missing "
                f"(keys: {sorted(target)})"
            )
        with _isolated_rngs(augmentation_seed(self.seed, self.epoch, int(target["image_id"]))):
            return self.transforms(image, target)

    def __repr__(self) -> str:
        return f"SeededAugmentation({self.transforms!r}, seed={self.seed})"


def set_augmentation_epoch(dataset, epoch: int) -> None:
    """Tell a dataset's ``SeededAugmentation`` (if it has one, also through ``Subset``) the epoch."""
    while dataset is not None:
        transforms = getattr(dataset, "transforms", None)
        if transforms is not None and hasattr(transforms, "set_epoch"):
            transforms.set_epoch(epoch)
            return
        dataset = getattr(dataset, "dataset", None)
