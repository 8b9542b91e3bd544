"""Exported detectors against our eager fast path: our ONNX file under ONNX Runtime, our OpenVINO IR under
OpenVINO (float32, bfloat16 and int8 from `deploy.quantize`), and, in the reference environment, torchvision's
eager model and its model exported to ONNX under the same runtimes (OpenVINO with dynamic shapes and reshaped
to the image's static shape, its best case; the LATENCY hint); the same weights in every column, in one run.

    .venv/bin/python benchmarks/bench_export.py --models r50 demo --demo-checkpoint runs/demo/best.pt
    PYTHONPATH=. ~/.cache/fasterrcnn-reference-env/bin/python benchmarks/bench_export.py --models r50
        (the torchvision columns; the reference env needs `pip install onnx onnxscript onnxruntime openvino`)
    options: --repeats 5 --threads 2 --batch 1 --no-bf16 --no-int8 --no-agreement (time only)
             --keep DIR (keep the exported files there)
             --no-fuse, --no-reuse-memory: our eager path without fused convolutions / without kept memory
             (cpu_memory.py is process-wide, so its effect is measured by two runs)

Models: "r50" is fasterrcnn_resnet50_fpn with the detecting random weights of benchmarks/bench_inference.py
(torchvision's published COCO weights need a download this machine cannot make), on 480x640 images resized to
800x1066 inside every model; "demo" is a trained demo checkpoint (`make demo`) on the synthetic 256x320 images.

Agreement, the criterion of issue 15: the share of the eager model's detections that each exported file
reproduces (same label, IoU >= 0.99, score within 1e-3) and the share of the file's that the eager model has,
over portrait, landscape and small images at batch 1 and 2 (none of them the export example's size).
Timing: after a warm-up, the columns run in turns (a change in machine load hits them alike) and the median of
--repeats calls is printed with its ratio to our eager float32 fast path (below 1 is faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_inference import bf16_supported, detecting_checkpoint, reproduced, structured_images, torchvision_model

from fasterrcnn.data.synth import SynthParams, draw_image
from fasterrcnn.deploy import export
from fasterrcnn.deploy.quantize import quantize
from fasterrcnn.deploy.runtimes import load_exported
from fasterrcnn.engine.setup import load_model_for_inference
from fasterrcnn.model.builders import fasterrcnn_resnet50_fpn

try:
    import torchvision
except ImportError:  # the peer we measure against, never a dependency
    torchvision = None


def synth_images(count: int, size: tuple[int, int], seed: int = 7) -> list[torch.Tensor]:
    """The demo's own kind of image (the synthetic shapes), float [3, H, W] in [0, 1], rounded from uint8."""
    params = SynthParams(image_size=size, seed=seed)
    return [
        torch.from_numpy(np.ascontiguousarray(draw_image(params, i)[0])).permute(2, 0, 1) / 255.0 for i in range(count)
    ]


def rounded(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Images as uint8 would give them (the files take uint8), so that every column sees the same pixels."""
    return [im.mul(255).round().div(255) for im in images]


def time_columns(fns: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                # a pause first: the previous column's runtime threads (OpenMP, ONNX Runtime) spin-wait for a
                # while after a call and would take the cores from the next column's threads
                time.sleep(0.3)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def torchvision_onnx(checkpoint: Path, path: Path, example: torch.Tensor) -> Path:
    """torchvision's R50-FPN with the same weights exported as its documentation does it (the TorchScript-based
    exporter, opset 17; its dynamo exporter fails on this model), dynamic height and width, batch 1."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    model = torchvision_model(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            ([example],),
            str(path),
            opset_version=17,
            dynamo=False,
            input_names=["image"],
            output_names=["boxes", "labels", "scores"],
            dynamic_axes={"image": [1, 2], "boxes": [0], "labels": [0], "scores": [0]},
        )
    return path


class TorchvisionOnnx:
    """torchvision's ONNX file (one float image [3, H, W] in, ragged boxes/labels/scores out) under a runtime."""

    def __init__(self, path: Path, runtime: str, threads: int, bf16: bool = False, static_shape=None):
        if runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.run = lambda x: session.run(None, {"image": x})
        else:
            import openvino as ov

            config = {
                "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",  # its best for one image at a time (as ours gets)
            }
            core = ov.Core()
            model = core.read_model(str(path))
            if static_shape is not None:  # the peer at its best: shapes known when it compiles
                model.reshape({0: list(static_shape)})
            compiled = core.compile_model(model, "CPU", config)
            request = compiled.create_infer_request()

            def run(x):  # one inference, then its outputs (not one inference per output)
                result = request.infer({0: x})
                return [result[o] for o in compiled.outputs]

            self.run = run

    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        out = []
        for im in images:
            boxes, labels, scores = self.run(np.ascontiguousarray(im.numpy()))
            out.append(
                {
                    "boxes": torch.from_numpy(boxes),
                    "labels": torch.from_numpy(labels),
                    "scores": torch.from_numpy(scores),
                }
            )
        return out


def bench(name: str, model, names: list[str], images: dict, args, tmp: Path, checkpoint: Path | None) -> None:
    t0 = time.perf_counter()
    onnx_path = export(model, tmp / f"{name}.onnx", format="onnx", class_names=names)
    t1 = time.perf_counter()
    ir_path = export(model, tmp / f"{name}.xml", format="openvino", class_names=names)
    t2 = time.perf_counter()
    ts_path = export(model, tmp / f"{name}.torchscript", format="torchscript", class_names=names)
    t3 = time.perf_counter()
    print(
        f"\n{name}: exported ONNX {onnx_path.stat().st_size / 2**20:.0f} MB in {t1 - t0:.0f} s, IR in {t2 - t1:.0f} s, "
        f"TorchScript in {t3 - t2:.0f} s"
    )
    fast = {"reuse_memory": not args.no_reuse_memory, "fuse": not args.no_fuse}
    columns = {
        "ours eager fp32": copy.deepcopy(model).optimize_for_inference(**fast),
        "ours ONNX, onnxruntime fp32": load_exported(onnx_path, "onnxruntime", threads=args.threads),
        "ours IR, openvino fp32": load_exported(ir_path, "openvino", threads=args.threads),
        "ours TorchScript fp32": load_exported(ts_path, "torch", threads=args.threads),
    }
    use_bf16 = not args.no_bf16 and bf16_supported()
    if use_bf16:
        columns["ours eager bf16"] = copy.deepcopy(model).optimize_for_inference(dtype=torch.bfloat16, **fast)
        columns["ours IR, openvino bf16"] = load_exported(ir_path, "openvino", threads=args.threads, bf16=True)
    if not args.no_int8:
        t4 = time.perf_counter()
        int8_path = quantize(
            model, tmp / f"{name}_int8.xml", calibration_images=images["calibration"], class_names=names
        )
        print(f"  int8: quantized on {len(images['calibration'])} images in {time.perf_counter() - t4:.0f} s")
        columns["ours IR, openvino int8"] = load_exported(int8_path, "openvino", threads=args.threads)
    if torchvision is not None and name == "r50" and checkpoint is not None:
        example = images["timing"][0]
        tv_path = torchvision_onnx(checkpoint, tmp / "torchvision_r50.onnx", example)
        columns["torchvision ONNX, onnxruntime fp32"] = TorchvisionOnnx(tv_path, "onnxruntime", args.threads)
        columns["torchvision ONNX, openvino fp32"] = TorchvisionOnnx(tv_path, "openvino", args.threads)
        static = tuple(example.shape)
        columns["torchvision ONNX, openvino fp32 static"] = TorchvisionOnnx(
            tv_path, "openvino", args.threads, static_shape=static
        )
        if use_bf16:
            columns["torchvision ONNX, openvino bf16"] = TorchvisionOnnx(tv_path, "openvino", args.threads, bf16=True)
            columns["torchvision ONNX, openvino bf16 static"] = TorchvisionOnnx(
                tv_path, "openvino", args.threads, bf16=True, static_shape=static
            )
        columns["torchvision eager fp32"] = torchvision_model(checkpoint)

    # agreement with the plain eager model (float32, unoptimised) on sizes other than the example's
    for label in (
        () if args.no_agreement else ("ours ONNX, onnxruntime fp32", "ours IR, openvino fp32", "ours TorchScript fp32")
    ):
        hits = [0.0, 0.0]
        counts = [0, 0]
        for sized in images["agreement"]:
            for batch in (1, 2):
                groups = [sized[i : i + batch] for i in range(0, len(sized), batch)]
                with torch.inference_mode():
                    eager = [d for g in groups for d in model(g)]
                exported = [d for g in groups for d in columns[label](g)]
                for k, (ref, other) in enumerate(((eager, exported), (exported, eager))):
                    rate, n = reproduced(ref, other, iou_min=0.99, score_tol=1e-3)
                    hits[k] += rate * n
                    counts[k] += n
        print(
            f"  agreement, {label}: reproduces {hits[0] / max(counts[0], 1):.2%} of the eager model's {counts[0]} "
            f"detections; the eager model has {hits[1] / max(counts[1], 1):.2%} of its {counts[1]} "
            "(portrait, landscape, small; batch 1 and 2)"
        )

    batch = images["timing"][: args.batch]
    t = time_columns({label: (lambda m=m: m(batch)) for label, m in columns.items()}, args.repeats)
    base = t["ours eager fp32"]
    print(f"  time, batch {args.batch} of {tuple(batch[0].shape[1:])} images, median of {args.repeats}:")
    for label, sec in t.items():
        print(
            f"    {label:36s} {sec * 1e3:8.1f} ms  {args.batch / sec:6.2f} img/s   / ours eager fp32 {sec / base:5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["r50", "demo"], choices=["r50", "demo"])
    parser.add_argument("--demo-checkpoint", default="runs/demo/best.pt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 column (needs nncf)")
    parser.add_argument("--no-agreement", action="store_true", help="time only")
    parser.add_argument("--no-fuse", action="store_true", help="our eager path without fused convolutions")
    parser.add_argument(
        "--no-reuse-memory", action="store_true", help="our eager path without keeping freed memory (cpu_memory.py)"
    )
    parser.add_argument("--keep", default=None, help="write the exported files to this folder and keep them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    import openvino

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}, "
        f"{args.threads} threads; torchvision: {torchvision.__version__ if torchvision else 'not importable (skipped)'}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep) if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            if name == "r50":
                checkpoint = tmp / "r50_detecting.pth"
                detecting_checkpoint(checkpoint)
                model = fasterrcnn_resnet50_fpn(weights=str(checkpoint)).eval()
                names = ["__background__"] + [f"class_{i}" for i in range(1, 91)]
                images = {
                    "timing": rounded(structured_images(max(args.batch, 1), seed=1)),
                    "calibration": rounded(structured_images(16, seed=20)),
                    "agreement": [
                        rounded(structured_images(2, seed=s, size=size))
                        for s, size in ((2, (640, 480)), (3, (480, 720)), (4, (240, 320)))
                    ],
                }
            else:
                checkpoint = None
                model, names, _ = load_model_for_inference(args.demo_checkpoint)
                images = {
                    "timing": synth_images(max(args.batch, 1), (256, 320)),
                    "calibration": synth_images(64, (256, 320), seed=30),
                    "agreement": [
                        synth_images(4, size, seed=s)
                        for s, size in ((8, (320, 256)), (9, (300, 400)), (10, (120, 160)))
                    ],
                }
            bench(name, model, names, images, args, tmp, checkpoint)


if __name__ == "__main__":
    main()
