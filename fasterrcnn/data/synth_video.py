"""A synthetic video: the synthetic dataset's shapes moving over its kind of background, as an mp4.

    write_video("shapes.mp4", num_frames=300, image_size=(480, 640), fps=30, seed=0)
    frames, boxes = clip_frames(num_frames=30, ...)   # the frames as arrays, and each frame's true boxes

Each clip has ``num_objects`` shapes of the dataset's classes, each with its own colour, size (the
dataset's range, scaled to the frame: 5% to 40% of the short side), speed, direction and spin; they
bounce off the frame's edges and pass over one another. The background is one of synth.py's fields,
with fresh per-pixel noise in every frame. Everything is drawn from ``numpy.random.default_rng((seed,
"video"))``, so a seed gives the same clip. The demo model, trained on still images of these shapes,
detects them (``fasterrcnn synth-video``, then ``fasterrcnn predict shapes.mp4``): a video anyone can
make on any machine, for the README, the tests and the frame-rate benchmark.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image, ImageDraw

from .report import DataError
from .synth import _UNIT, DEFAULT_CLASSES, SHAPES, _background


@dataclass
class _Mover:
    """One shape of the clip: its outline around its centre (pixels), where it goes and how it turns."""

    label: int
    outline: np.ndarray  # [K, 2], unrotated
    centre: np.ndarray  # [2] x, y
    velocity: np.ndarray  # [2] pixels per frame
    angle: float
    spin: float  # radians per frame
    colour: tuple[int, ...]


def clip_frames(
    *,
    num_frames: int,
    image_size: tuple[int, int] = (480, 640),
    fps: float = 30.0,
    num_objects: int = 4,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    seed: int = 0,
):
    """Yield (frame [H, W, 3] uint8 RGB, [(label, [x1, y1, x2, y2])] of the shapes' outlines) per frame;
    label k is ``classes[k - 1]``. The boxes enclose each whole outline (a shape partly hidden behind a
    later one keeps its full box)."""
    h, w = image_size
    if num_frames < 1 or h < 32 or w < 32 or num_objects < 0 or fps <= 0:
        raise DataError(
            f"synth-video: need num_frames >= 1, a frame of at least 32x32, num_objects >= 0 and fps > 0 "
            f"(got {num_frames}, {h}x{w}, {num_objects}, {fps})"
        )
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or not classes:
        raise DataError(f"synth-video: unknown shape(s) {unknown}; known shapes: {', '.join(SHAPES)}")
    rng = np.random.default_rng([seed, 0x766964])  # 'vid': a stream of its own
    background = _background(rng, h, w)
    short = min(h, w)
    objects = []
    for _ in range(num_objects):
        label = int(rng.integers(len(classes))) + 1
        size = math.exp(rng.uniform(math.log(0.08 * short), math.log(0.4 * short)))
        speed = rng.uniform(0.1, 0.45) * short  # pixels per second
        heading = rng.uniform(0, 2 * math.pi)
        objects.append(
            _Mover(
                label=label,
                outline=_UNIT[classes[label - 1]] * (size / 2),
                centre=np.array([rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)]),
                velocity=np.array([math.cos(heading), math.sin(heading)]) * speed / fps,
                angle=rng.uniform(0, 2 * math.pi),
                spin=rng.uniform(-1.5, 1.5) / fps,  # radians per frame
                colour=tuple(int(v) for v in rng.integers(0, 256, size=3)),
            )
        )
    for _ in range(num_frames):
        canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        boxes = []
        for obj in objects:
            rot = np.array([[math.cos(obj.angle), -math.sin(obj.angle)], [math.sin(obj.angle), math.cos(obj.angle)]])
            pts = obj.outline @ rot.T + obj.centre
            draw.polygon([(float(x), float(y)) for x, y in pts], fill=obj.colour)
            lo, hi = np.clip(pts.min(0), 0, [w - 1, h - 1]), np.clip(pts.max(0), 0, [w - 1, h - 1])
            boxes.append((obj.label, [float(lo[0]), float(lo[1]), float(hi[0]) + 1, float(hi[1]) + 1]))
            # move, bouncing off the edges (the outline's extent along each axis stays inside the frame)
            obj.centre = obj.centre + obj.velocity
            obj.angle += obj.spin
            half = np.abs(pts - obj.centre + obj.velocity).max(0)
            for axis, limit in ((0, w), (1, h)):
                if obj.centre[axis] - half[axis] < 0 or obj.centre[axis] + half[axis] > limit - 1:
                    obj.velocity[axis] *= -1
                    obj.centre[axis] = float(np.clip(obj.centre[axis], half[axis], limit - 1 - half[axis]))
        frame = np.asarray(canvas, np.float32)
        frame += rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(6.0)
        yield np.clip(frame, 0, 255).astype(np.uint8), boxes


def write_video(
    path: str | os.PathLike,
    *,
    num_frames: int = 300,
    image_size: tuple[int, int] = (480, 640),
    fps: float = 30.0,
    num_objects: int = 4,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    seed: int = 0,
) -> int:
    """Write the clip to ``path`` (H.264 mp4, through the video extra's PyAV); returns the frames written."""
    from .video_writer import VideoWriter

    h, w = image_size
    frames = clip_frames(
        num_frames=num_frames, image_size=image_size, fps=fps, num_objects=num_objects, classes=classes, seed=seed
    )
    with VideoWriter(path, width=w, height=h, fps=Fraction(fps).limit_denominator(1001)) as writer:
        for image, _ in frames:
            writer.write(image)
    return writer.frames
