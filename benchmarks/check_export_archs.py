"""Every builder exports: for each, a checkpoint that detects (benchmarks/bench_models.py's recipe), exported to
ONNX and run under ONNX Runtime on images of two sizes other than the export example's (batch 2 and batch 1),
against the eager model (same label, IoU >= 0.99, score within 1e-3; both ways).

    .venv/bin/python benchmarks/check_export_archs.py                 # every builder in BUILDERS
    .venv/bin/python benchmarks/check_export_archs.py fasterrcnn_resnet50_c4 --min-size 320 --max-size 480

Small images (min size 320 by default) keep it to about half a minute per builder, most of it the export.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_inference import reproduced, structured_images
from bench_models import detecting_checkpoint

from fasterrcnn.deploy import export
from fasterrcnn.deploy.runtimes import load_exported
from fasterrcnn.model.builders import BUILDERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("archs", nargs="*", default=sorted(BUILDERS))
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=480)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    groups = [
        [im.mul(255).round().div(255) for im in structured_images(2, seed=3, size=(300, 200))],
        [im.mul(255).round().div(255) for im in structured_images(2, seed=4, size=(150, 260))],
    ]
    print(f"min/max size {args.min_size}/{args.max_size}, images 300x200 and 150x260 (export example 240x320)")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            start = time.perf_counter()
            weights = Path(tmp) / f"{arch}.pth"
            detecting_checkpoint(arch, weights)
            model = BUILDERS[arch](weights=str(weights), min_size=args.min_size, max_size=args.max_size).eval()
            path = export(model, Path(tmp) / f"{arch}.onnx", example_size=(240, 320))
            runner = load_exported(path, "onnxruntime", threads=args.threads)
            eager, batch_2, batch_1 = [], [], []
            with torch.no_grad():
                for ims in groups:
                    eager += model(ims)
                    batch_2 += runner(ims)
                    batch_1 += [runner([im])[0] for im in ims]
            rates = []
            for found in (batch_2, batch_1):
                (a, n), (b, _) = (
                    reproduced(eager, found, iou_min=0.99, score_tol=1e-3),
                    reproduced(found, eager, iou_min=0.99, score_tol=1e-3),
                )
                rates.append(f"{a:.1%} / {b:.1%}")
            print(
                f"{arch:40s} {n:4d} detections; batch 2: {rates[0]}, batch 1: {rates[1]} "
                f"(eager's in the file / the file's in eager); {time.perf_counter() - start:.0f} s"
            )


if __name__ == "__main__":
    main()
