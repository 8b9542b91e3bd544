"""Frames per second on a 640x480 video, end to end (decode, model, draw, encode), against the model alone.

    .venv/bin/python benchmarks/bench_video.py --demo-checkpoint runs/demo/best.pt \
        --small-checkpoint runs/demo_mobilenet/best.pt
    options: --frames 300 --threads 2 --batch-sizes 1 --dtypes fp32 bf16 --repeats 2 --keep clip.mp4

The clip: ``fasterrcnn synth-video`` (the synthetic shapes moving, 640x480, 30 frames/s, H.264), made once
in a temporary folder. The models: the demo checkpoint (`make demo`: ResNet-18 FPN) and the small
MobileNetV3-Large 320 FPN (`make demo-mobilenet`); without a checkpoint, that architecture with random
weights and 4 classes (the same work per frame, give or take the detections drawn).

For each model and precision, in turns (so a change in machine load hits them alike), the median of
--repeats runs of:
    decode         FrameReader alone: the frames decoded and converted to RGB
    model          the detector on the frames already decoded (the baseline; the same conversion to a
                   tensor as predict_video's, and no checks: uint8 frames cannot hold NaN)
    predict        predict_video: decode (thread), model, draw, json, encode H.264 (thread): what
                   `fasterrcnn predict clip.mp4` does, without the process start and the model loading
    predict/json   the same with --no-video (no drawing, no encoding)
The ratio column is predict's fps over the model's: the share of the model's speed the whole pipeline keeps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fasterrcnn.data.synth_video import write_video
from fasterrcnn.data.video_source import FrameReader
from fasterrcnn.inference.detector import Detector, frame_tensor
from fasterrcnn.inference.predict_video import predict_video


def load(checkpoint: str | None, bf16: bool) -> Detector:
    if checkpoint:
        return Detector.load(checkpoint, device="cpu", bf16=bf16)
    from fasterrcnn.model.builders_mobilenet import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(num_classes=5, weights=None, weights_backbone=None)
    names = ["__background__", "circle", "square", "triangle", "star"]
    model.eval()
    model.optimize_for_inference(dtype=torch.bfloat16 if bf16 else torch.float32)
    return Detector(model, names, device="cpu", bf16=bf16)


def time_decode(clip: Path) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in FrameReader(clip))
    return n / (time.perf_counter() - start)


def time_model(detector: Detector, frames: list, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(frames), batch_size):
        detector._detect_usable([frame_tensor(f) for f in frames[i : i + batch_size]])
    return len(frames) / (time.perf_counter() - start)


def time_predict(detector: Detector, clip: Path, out: Path, batch_size: int, draw: bool) -> float:
    summary = predict_video(detector, clip, out, batch_size=batch_size, draw=draw, show_progress=False)
    return summary.fps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-checkpoint", default=None, help="the demo run's best.pt (ResNet-18 FPN); else left out")
    ap.add_argument("--small-checkpoint", default=None, help="a fasterrcnn_mobilenet_v3_large_320_fpn checkpoint")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", default=None, help="also copy the clip here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench_video_"))
    clip = tmp / "shapes.mp4"
    write_video(clip, num_frames=args.frames, image_size=(480, 640), fps=30, seed=0)
    if args.keep:
        Path(args.keep).write_bytes(clip.read_bytes())
    frames = [f.image for f in FrameReader(clip)]
    print(f"clip: {len(frames)} frames, 640x480, H.264; {args.threads} threads; torch {torch.__version__}")
    print(f"decode alone: {statistics.median(time_decode(clip) for _ in range(3)):.0f} frames/s")

    models = []
    if args.demo_checkpoint:
        models.append(("demo (ResNet-18 FPN)", args.demo_checkpoint))
    small = "MobileNetV3-Large 320 FPN" + ("" if args.small_checkpoint else " (random weights)")
    models.append((small, args.small_checkpoint))

    cells = []
    for label, checkpoint in models:
        for dtype in args.dtypes:
            detector = load(checkpoint, dtype == "bf16")
            detector.detect([frame_tensor(frames[0])])  # warm-up
            for batch_size in args.batch_sizes:
                cells.append((label, dtype, batch_size, detector))
    results: dict[tuple, dict[str, list[float]]] = {}
    for _ in range(args.repeats):
        for label, dtype, batch_size, detector in cells:
            row = results.setdefault((label, dtype, batch_size), {"model": [], "predict": [], "json": []})
            row["model"].append(time_model(detector, frames, batch_size))
            row["predict"].append(time_predict(detector, clip, tmp / "out", batch_size, draw=True))
            row["json"].append(time_predict(detector, clip, tmp / "out", batch_size, draw=False))

    print()
    print("| model | precision | batch | model alone | predict (decode, model, draw, encode) | ratio | --no-video |")
    print("|---|---|---|---|---|---|---|")
    for (label, dtype, batch_size), row in results.items():
        m, p, j = (statistics.median(row[k]) for k in ("model", "predict", "json"))
        print(f"| {label} | {dtype} | {batch_size} | {m:.1f} fps | **{p:.1f} fps** | {p / m:.2f} | {j:.1f} fps |")


if __name__ == "__main__":
    main()
