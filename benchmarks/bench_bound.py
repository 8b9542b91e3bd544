"""How close R50-FPN inference is to the hardware bound: the conv and linear layers against a large
matrix product on the same machine, and the share of the time spent outside them.

    .venv/bin/python benchmarks/bench_bound.py [--repeats 3] [--threads 2] [--dtypes fp32 bf16]

Model and input: our fasterrcnn_resnet50_fpn (91 classes) with the detecting weights of
bench_inference.py, prepared by ``optimize_for_inference`` (BatchNorm folded, channels-last; bfloat16
layers for bf16), on one 480x640 image resized to 800x1066 (padded 800x1088).

Method (forward hooks with timing; on the CPU every eager op is synchronous, so the wall time between
a layer's pre-hook and its hook is the layer's own time):
- every nn.Conv2d and nn.Linear is timed in place during a full ``model([image])``, and its FLOPs are
  counted from the shapes it saw: a conv 2 * N * C_out * H_out * W_out * (C_in / groups) * k_h * k_w,
  a linear 2 * rows * in * out (a multiply-add is 2 FLOPs; bias and activation not counted; the RPN's
  fused 1x1 outputs are one linear of 16 outputs, 15 used);
- the same hooks on the pipeline's stages (transform, backbone, RPN head, anchors, RoI pooling, box
  head, predictor) split the rest of the time: "outside conv/linear" is everything that is not inside a
  conv or linear layer (ReLU, residual adds, max-pool, FPN upsampling, resize, anchors, decoding, top-k,
  NMS, RoIAlign, post-processing);
- the bound: a 4096 x 4096 x 4096 matrix product in the same dtype (torch.mm), the best a dense kernel
  reaches on this machine; the layers' achieved GFLOP/s are given as a share of it.
Medians over --repeats hooked runs after one warm-up; the end-to-end time without hooks is reported too
(the hooks cost a few microseconds each, ~100 layers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import bf16_supported, detecting_checkpoint, structured_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fasterrcnn import fasterrcnn_resnet50_fpn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_gflops(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def layer_flops(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return 2.0 * y.numel() * (module.in_channels // module.groups) * kh * kw
    return 2.0 * (y.numel() // module.out_features) * module.in_features * module.out_features


def group_of(name: str) -> str:
    """A readable part of the network for a layer's qualified name."""
    if name.startswith("backbone.body."):
        part = name.split(".")[2]
        return "body " + (part if part.startswith("layer") else "stem")
    if name.startswith("backbone.fpn."):
        return "FPN " + ("1x1 lateral" if ".inner_blocks." in name else "3x3 output")
    if name.startswith("rpn.head.conv"):
        return "RPN 3x3 conv"
    if name.startswith("rpn.head."):
        return "RPN 1x1 cls/box"
    if name.startswith("roi_heads.box_head."):
        return "box head fc6/fc7"
    return "box predictor"


class Timer:
    """Forward (pre-)hooks that time modules: per-layer seconds and FLOPs, per-stage seconds."""

    def __init__(self, model: nn.Module, stages: dict[str, nn.Module]):
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        self.stages = stages
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.handles = []
        for name, m in self.layers.items():
            self._hook(m, lambda t, name=name: self.seconds.__setitem__(name, self.seconds[name] + t), flops_key=name)
        for name, m in stages.items():
            self._hook(m, lambda t, name=name: self.stage_seconds.__setitem__(name, self.stage_seconds[name] + t))

    def _hook(self, module: nn.Module, add, flops_key: str | None = None) -> None:
        start = []

        def pre(mod, args):
            start.append(time.perf_counter())

        def post(mod, args, out):
            add(time.perf_counter() - start.pop())
            if flops_key is not None:
                self.flops[flops_key] += layer_flops(mod, args[0], out)

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def reset(self) -> None:
        self.seconds.clear()
        self.flops.clear()
        self.stage_seconds.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def measure(model, images, repeats: int) -> dict:
    """Hooked runs: per-layer and per-stage medians; plus the unhooked end-to-end median."""
    with torch.inference_mode():
        model(images)
        plain = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(images)
            plain.append(time.perf_counter() - t0)
        stages = {
            "transform": model.transform,
            "backbone": model.backbone,
            "rpn": model.rpn,
            "rpn head": model.rpn.head,
            "anchors": model.rpn.anchor_generator,
            "roi_heads": model.roi_heads,
            "roi pool": model.roi_heads.box_roi_pool,
            "box head": model.roi_heads.box_head,
            "box predictor": model.roi_heads.box_predictor,
        }
        timer = Timer(model, stages)
        runs = []
        try:
            for _ in range(repeats):
                timer.reset()
                t0 = time.perf_counter()
                model(images)
                total = time.perf_counter() - t0
                runs.append((total, dict(timer.seconds), dict(timer.flops), dict(timer.stage_seconds)))
        finally:
            timer.remove()
    runs.sort(key=lambda r: r[0])
    total, seconds, flops, stage = runs[len(runs) // 2]  # the median run, all of its parts together
    return {"plain": statistics.median(plain), "total": total, "seconds": seconds, "flops": flops, "stage": stage}


def layer_time_in(seconds: dict[str, float], prefix: str) -> float:
    return sum(t for name, t in seconds.items() if name.startswith(prefix))


def report(label: str, r: dict, peak: float) -> None:
    seconds, flops, stage, total = r["seconds"], r["flops"], r["stage"], r["total"]
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for name in seconds:
        g = groups[group_of(name)]
        g[0] += flops[name]
        g[1] += seconds[name]
        g[2] += 1
    conv_t, conv_f = sum(seconds.values()), sum(flops.values())
    print(
        f"\n{label}: end to end {r['plain']:.3f} s (hooked run {total:.3f} s); "
        f"{peak:.0f} GFLOP/s for a 4096^3 matmul in this dtype"
    )
    print(f"  {'layers':22s} {'n':>4s} {'GFLOP':>8s} {'time s':>8s} {'GFLOP/s':>8s} {'of matmul':>9s}")
    for name, (f, t, n) in groups.items():
        print(f"  {name:22s} {n:4d} {f / 1e9:8.1f} {t:8.3f} {f / t / 1e9:8.1f} {f / t / 1e9 / peak:9.0%}")
    print(
        f"  {'all conv/linear':22s} {len(seconds):4d} {conv_f / 1e9:8.1f} {conv_t:8.3f} "
        f"{conv_f / conv_t / 1e9:8.1f} {conv_f / conv_t / 1e9 / peak:9.0%}"
    )
    rest = total - conv_t
    print(f"  outside conv/linear: {rest:.3f} s = {rest / total:.1%} of the hooked run (target < 10%), of which")
    parts = {
        "transform (normalise, resize, pad)": stage["transform"],
        "backbone: ReLU, adds, max-pool, upsample": stage["backbone"] - layer_time_in(seconds, "backbone."),
        "RPN: anchors": stage["anchors"],
        "RPN: flatten, decode, top-k, NMS": stage["rpn"] - stage["rpn head"] - stage["anchors"],
        "RPN head: ReLU, output views": stage["rpn head"] - layer_time_in(seconds, "rpn.head."),
        "RoI pooling (MultiScaleRoIAlign)": stage["roi pool"],
        "box head/predictor: flatten, ReLU": stage["box head"]
        + stage["box predictor"]
        - layer_time_in(seconds, "roi_heads."),
        "box post-processing (decode, NMS)": stage["roi_heads"]
        - stage["roi pool"]
        - stage["box head"]
        - stage["box predictor"],
    }
    parts["the rest (forward glue, box rescale)"] = rest - sum(parts.values())
    for name, t in parts.items():
        print(f"    {name:42s} {t:7.3f} s  {t / total:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, one 480x640 image -> 800x1066, "
        f"median of {args.repeats} after one warm-up"
    )
    images = structured_images(1, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r50fpn_detecting.pth"
        detecting_checkpoint(path)
        for key in args.dtypes:
            if key == "bf16" and not bf16_supported():
                print("\nbf16: skipped (oneDNN has no bfloat16 on this CPU)")
                continue
            peak = matmul_gflops(DTYPES[key])
            model = fasterrcnn_resnet50_fpn(weights=str(path)).optimize_for_inference(dtype=DTYPES[key])
            report(key, measure(model, images, args.repeats), peak)
            del model


if __name__ == "__main__":
    main()
