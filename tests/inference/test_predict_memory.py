"""Long-running stability: predicting over a stream of 1000 images keeps resident memory flat
(under 5% growth from image 100 to image 1000), drawings and json included."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn.inference.detector import Detector
from fasterrcnn.inference.predict_files import predict_files

from ..model.helpers import tiny_model


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_stays_flat_over_1000_images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "stream"
    folder.mkdir()
    paths = []
    for i in range(1000):  # a few distinct sizes, as a real folder has
        h, w = (24, 32) if i % 3 else (32, 24)
        path = folder / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    torch.manual_seed(0)
    model = tiny_model(num_classes=4, min_size=32, max_size=48, box_score_thresh=0.0)
    detector = Detector(model, ["__background__", "a", "b", "c"], score_threshold=0.0)
    samples = []
    detect = detector.detect

    def measured(images):
        out = detect(images)
        samples.append(resident_bytes())
        return out

    detector.detect = measured
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is as fast, and robust on a busy machine
    try:
        summary = predict_files(detector, paths, tmp_path / "out", batch_size=1, workers=0, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary.num_images == 1000 and summary.num_detections > 1000  # every image gave results to keep
    growth = samples[999] / samples[99] - 1
    print(
        f"resident memory: {samples[99] / 2**20:.1f} MiB at image 100, {samples[999] / 2**20:.1f} MiB at 1000 "
        f"({growth:+.2%})"
    )
    assert growth < 0.05


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_stays_flat_over_a_long_video(tmp_path):
    """Issue 17: the per-frame json is streamed, the decoder's and the encoder's queues are bounded."""
    pytest.importorskip("av")
    from fasterrcnn.data.synth_video import write_video
    from fasterrcnn.inference.predict_video import predict_video

    clip = tmp_path / "long.mp4"
    write_video(clip, num_frames=600, image_size=(32, 48), fps=30, num_objects=3, seed=0)
    torch.manual_seed(0)
    model = tiny_model(num_classes=4, min_size=32, max_size=48, box_score_thresh=0.0)
    detector = Detector(model, ["__background__", "a", "b", "c"], score_threshold=0.0)
    samples = []
    detect = detector._detect_usable

    def measured(images):
        out = detect(images)
        samples.append(resident_bytes())
        return out

    detector._detect_usable = measured  # type: ignore[method-assign]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = predict_video(detector, clip, tmp_path / "out", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary.frames == 600 and summary.detections > 600
    growth = samples[599] / samples[99] - 1
    print(
        f"resident memory: {samples[99] / 2**20:.1f} MiB at frame 100, {samples[599] / 2**20:.1f} MiB at 600 "
        f"({growth:+.2%})"
    )
    assert growth < 0.05
