"""End-to-end inference of the issue-14 models: ours (optimised, float32 and bfloat16) against torchvision's
builder of the same name in float32, with the same weights, in the same run; frames per second for the
320 model on 640x480 images.

    PYTHONPATH=. ~/.cache/fasterrcnn-reference-env/bin/python benchmarks/bench_models.py \
        --arch fasterrcnn_mobilenet_v3_large_320_fpn --repeats 10
    options: --arch (any of ARCHS, several at once; default all three) --repeats 5 --threads 2 --batch-sizes 1
             --unoptimised (also our plain model) --no-bf16 --device cpu
    .venv/bin/python benchmarks/bench_models.py ...     # ours only (no torchvision): weights made by our builder

The weights: a torchvision-format checkpoint that detects, made as benchmarks/bench_inference.py makes the
R50-FPN one: torchvision's own builder (ours, from scratch, without torchvision; same keys) with 91 classes,
every BatchNorm's statistics calibrated on two images, the last norm of each residual branch (ResNet bn3,
MobileNet block projection) given a small scale as trained networks have, the RPN and box predictor weights
scaled up so that decisions are decisive. torchvision's model is then built as its ``weights=`` path builds
it: MobileNet with FrozenBatchNorm2d, the v2 ResNet-50 with BatchNorm2d in eval mode. Ours loads the file
through its builder's ``weights=``.

Timing: each model runs once to warm up, then the models run in turns so that a change in machine load hits
them alike; the median of --repeats full ``model(images)`` calls under torch.inference_mode is reported,
with ours / torchvision (below 1 is faster) and frames per second (images per second). Agreement: the share
of torchvision's detections ours reproduces (same label, IoU >= 0.9, score within 0.01), and of ours fp32's
that ours bf16 reproduces (same label, IoU >= 0.9), beside a control: ours fp32 on the images rounded once to
bfloat16 (a random network's detections are fragile; read the bf16 figure against it).
Page faults are a large share of the time on this machine (docs/design-decisions.md): for the allocator's
share, compare a run with MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 in the environment.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_inference import (
    RESIDUAL_GAMMA,
    bf16_supported,
    reproduced,
    structured_images,
    time_interleaved,
)

from fasterrcnn.model import builders

try:
    import torchvision
    from torchvision.models import detection as tv_detection
    from torchvision.ops import misc as tv_misc
except ImportError:  # torchvision is the peer we measure against, never a dependency
    torchvision = None

ARCHS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn_v2")
IMAGE_SIZE = (480, 640)
# norms whose output ends a residual branch: ResNet bn3, the projection norm of a MobileNet block (its last
# conv-norm pair, "...block.<last>.1")
# the box predictor's class weights scaled further where the random box features are weaker than R50-FPN's:
# scores well above the 0.05 threshold, not a handful of boxes at 0.05-0.07 that any rounding removes
CLASS_SCALE = {"fasterrcnn_mobilenet_v3_large_320_fpn": 4.0, "fasterrcnn_mobilenet_v3_large_fpn": 4.0}
_RESIDUAL_BN3 = re.compile(r"\.bn3$")
_BLOCK_NORM = re.compile(r"^(.*\.block)\.(\d+)\.1$")


def _residual_norms(model: nn.Module) -> set[str]:
    names = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    last: dict[str, tuple[int, str]] = {}
    for n in names:
        if (match := _BLOCK_NORM.match(n)) is not None:
            k = int(match.group(2))
            if match.group(1) not in last or last[match.group(1)][0] < k:
                last[match.group(1)] = (k, n)
    return {n for n in names if _RESIDUAL_BN3.search(n)} | {n for _, n in last.values()}


def maker_model(arch: str) -> nn.Module:
    """A from-scratch 91-class model with nn.BatchNorm2d and torchvision's keys: torchvision's, else ours."""
    if torchvision is not None:
        return getattr(tv_detection, arch)(weights=None, weights_backbone=None, num_classes=91)
    return builders.BUILDERS[arch](num_classes=91)


@torch.no_grad()
def detecting_checkpoint(arch: str, path: str | Path, seed: int = 0) -> None:
    """Write a torchvision-format checkpoint of ``arch`` that really detects (see the module docstring)."""
    torch.manual_seed(seed)
    model = maker_model(arch).eval()
    small = _residual_norms(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration images
            m.weight.uniform_(*(RESIDUAL_GAMMA if name in small else (0.6, 1.4)))
            m.bias.uniform_(-0.2, 0.2)
            m.train()  # the rest stays in eval mode: the box head's norms see the test-time proposals
    for im in structured_images(2, seed + 100):
        model([im])
    sd = model.state_dict()
    if "mobilenet" in arch:  # its weights= path builds FrozenBatchNorm2d, which has no counter
        sd = {k: v for k, v in sd.items() if "num_batches_tracked" not in k}
    for key, factor in (
        ("rpn.head.cls_logits.weight", 7.0),
        ("rpn.head.bbox_pred.weight", 3.0),
        ("roi_heads.box_predictor.cls_score.weight", 6.0 * CLASS_SCALE.get(arch, 1.0)),
        ("roi_heads.box_predictor.bbox_pred.weight", 3.0),
    ):
        sd[key] = sd[key] * factor
    torch.save(sd, path)


def _freeze_norms(module: nn.Module) -> None:
    """Every nn.BatchNorm2d of ``module`` -> torchvision's FrozenBatchNorm2d with the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = tv_misc.FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict(
                {k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"}, strict=True
            )
            setattr(module, name, frozen)
        else:
            _freeze_norms(child)


def torchvision_model(arch: str, path: str | Path) -> nn.Module:
    """torchvision's ``arch`` with the checkpoint, its norms as its ``weights=`` path makes them."""
    model = getattr(tv_detection, arch)(weights=None, weights_backbone=None, num_classes=91)
    model.load_state_dict(torch.load(path, weights_only=True), strict=False)  # mobilenet: no counters
    if "mobilenet" in arch:
        _freeze_norms(model.backbone)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--unoptimised", action="store_true", help="also time our model without the fast path")
    parser.add_argument("--no-bf16", action="store_true")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_bf16 = not args.no_bf16 and (device.type != "cpu" or bf16_supported())
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, median of {args.repeats} "
        f"interleaved runs after one warm-up, images {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}"
    )
    if torchvision is None:
        print("torchvision not importable: its baseline is skipped (run with the reference environment)")
    else:
        print(f"baseline: torchvision {torchvision.__version__}, float32, same weights")
    images = [im.to(device) for im in structured_images(max(args.batch_sizes), seed=1, size=IMAGE_SIZE)]
    for arch in args.arch:
        build = builders.BUILDERS[arch]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{arch}.pth"
            detecting_checkpoint(arch, path)
            models: dict[str, nn.Module] = {}
            if torchvision is not None:
                models["torchvision fp32"] = torchvision_model(arch, path).to(device)
            if args.unoptimised:
                models["ours fp32 (plain)"] = build(weights=str(path)).eval().to(device)
            models["ours fp32"] = build(weights=str(path)).to(device).optimize_for_inference()
            if use_bf16:
                models["ours bf16"] = build(weights=str(path)).to(device).optimize_for_inference(dtype=torch.bfloat16)
        print(f"\n{arch}")
        base = "torchvision fp32" if "torchvision fp32" in models else None
        for bs in args.batch_sizes:
            batch = images[:bs]
            with torch.inference_mode():
                outs = {name: m(batch) for name, m in models.items()}
            t = time_interleaved({n: (lambda m=m: m(batch)) for n, m in models.items()}, args.repeats, device)
            print(f"  batch {bs}: {sum(o['scores'].numel() for o in outs['ours fp32'])} detections (ours fp32)")
            for name, sec in t.items():
                line = f"    {name:18s} {sec * 1e3:8.1f} ms  {bs / sec:6.1f} frames/s"
                if base is not None and name != base:
                    line += f"   ours/torchvision {sec / t[base]:5.2f}"
                print(line)
            if base is not None:
                rate, n = reproduced(outs[base], outs["ours fp32"], score_tol=0.01)
                print(f"    agreement: ours fp32 reproduces {rate:.1%} of torchvision's {n} detections")
            if "ours bf16" in outs:
                rate, n = reproduced(outs["ours fp32"], outs["ours bf16"])
                print(f"    agreement: ours bf16 reproduces {rate:.1%} of ours fp32's {n} detections")
                # the control (as bench_inference.py): the float32 model on the images rounded once to bfloat16,
                # how fragile the random network's detections are to any perturbation
                with torch.inference_mode():
                    control = models["ours fp32"]([im.to(torch.bfloat16).to(im.dtype) for im in batch])
                rate, n = reproduced(outs["ours fp32"], control)
                print(f"    control: ours fp32 on the images rounded to bf16 reproduces {rate:.1%} of its {n}")


if __name__ == "__main__":
    main()
