"""End-to-end R50-FPN inference: ours (float32 and bfloat16, optimised) against torchvision's
fasterrcnn_resnet50_fpn in float32, with the same weights, in the same run.

    .venv/bin/python benchmarks/bench_inference.py                       # ours only (no torchvision)
    PYTHONPATH=. ~/.cache/fasterrcnn-reference-env/bin/python benchmarks/bench_inference.py   # with torchvision
    options: --repeats 5 --threads 2 --batch-sizes 1 2 --unoptimised --device cpu --no-reuse-memory --no-fuse
    .venv/bin/python benchmarks/bench_inference.py --trained-only --trained runs/demo/best.pt \
        --trained-images "data/synth/val/*.jpg"       # bf16 against fp32 on a trained detector

The weights: no published checkpoint is reachable offline, so the script makes a torchvision-format
checkpoint that detects (the recipe of tests/model/test_torchvision_parity.py): a from-scratch 91-class
model whose BatchNorm statistics are calibrated on two images (features well scaled), whose RPN and box
predictor weights are scaled up (decisive objectness, confident classes); the last BatchNorm of each
residual branch gets a small scale (0.1-0.3), as trained ResNets have, so that the random network does
not amplify rounding errors as no trained one does. It is loaded as a pretrained
checkpoint loads (FrozenBatchNorm2d, eps 0) by both libraries. The images: 480x640 "natural-ish" images
(smooth colour fields with discs and rectangles, noise), resized by both models to 800x1066 (padded
800x1088), one per batch element.

Timing: every model runs once to warm up, then the models run in turns (a, b, c, a, b, c, ...) so that a
change in machine load hits them alike; the median of --repeats runs is reported, each a full
``model(images)`` under torch.inference_mode (transform, backbone, RPN, RoI heads, post-processing).
The ratio is ours / torchvision float32 (below 1 is faster).

Agreement (printed for every batch): the share of the reference's detections that the other model
reproduces with the same label and IoU >= 0.9 (and, for float32 against torchvision, a score within 0.01).
With bf16, a control: the float32 model on the images rounded once to bfloat16. A random network's
detections are fragile (near-flat scores), so even that one rounding of the input loses some of them;
the bf16 figure is to be read against it, and against --trained on a trained detector.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fasterrcnn import fasterrcnn_resnet50_fpn
from fasterrcnn.ops import box_iou

try:
    import torchvision
    from torchvision.models.detection import FasterRCNN as TVFasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as tv_misc
except ImportError:  # torchvision is the peer we measure against, never a dependency
    torchvision = None

# BatchNorm scale of the last norm of each residual branch: small, as in trained ResNets. With the
# (0.6, 1.4) of every other norm, the random network amplifies any rounding (a 2% bfloat16 error at C2
# grows to 28% at C5, and no two precisions agree on a box); trained networks do not.
RESIDUAL_GAMMA = (0.1, 0.3)
IMAGE_SIZE = (480, 640)  # -> 800 x 1066 after the models' resize (min side 800)


def structured_images(count: int, seed: int, size: tuple[int, int] = IMAGE_SIZE) -> list[torch.Tensor]:
    """Smooth colour fields with rectangles and discs, a little noise: images a detector responds to."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    images = []
    for _ in range(count):
        low = torch.rand(1, 3, h // 32 + 1, w // 32 + 1, generator=g)
        im = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
        for _ in range(8):
            cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
            r = int(torch.randint(10, min(h, w) // 3, (1,), generator=g))
            colour = torch.rand(3, 1, 1, generator=g)
            mask = (
                ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
                if torch.rand(1, generator=g) < 0.5
                else ((yy - cy).abs() < r) & ((xx - cx).abs() < r * 0.6)
            )
            im = torch.where(mask, colour, im)
        images.append((im + 0.03 * torch.randn(im.shape, generator=g)).clamp(0, 1))
    return images


def detecting_checkpoint(path: str | os.PathLike, seed: int = 0) -> None:
    """Write a torchvision-format R50-FPN (91 classes) state_dict that really detects (see the docstring)."""
    torch.manual_seed(seed)
    model = fasterrcnn_resnet50_fpn(num_classes=91)  # from scratch: nn.BatchNorm2d, torchvision's keys
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration images
            with torch.no_grad():
                m.weight.uniform_(*(RESIDUAL_GAMMA if name.endswith(".bn3") else (0.6, 1.4)))
                m.bias.uniform_(-0.2, 0.2)
    model.backbone.train()
    with torch.no_grad():
        for im in structured_images(2, seed + 100):
            model.backbone(model.transform([im])[0].tensors)
    sd = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    for key, factor in (
        ("rpn.head.cls_logits.weight", 7.0),
        ("rpn.head.bbox_pred.weight", 3.0),
        ("roi_heads.box_predictor.cls_score.weight", 6.0),
        ("roi_heads.box_predictor.bbox_pred.weight", 3.0),
    ):
        sd[key] = sd[key] * factor
    torch.save(sd, path)


def torchvision_model(path: str | os.PathLike) -> torch.nn.Module:
    """torchvision's fasterrcnn_resnet50_fpn as its ``weights=`` path builds it (FrozenBatchNorm2d, eps 0)."""
    body = torchvision.models.resnet50(norm_layer=tv_misc.FrozenBatchNorm2d)
    model = TVFasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=91)
    model.load_state_dict(torch.load(path, weights_only=True))
    for m in model.modules():
        if isinstance(m, tv_misc.FrozenBatchNorm2d):
            m.eps = 0.0
    return model.eval()


def bf16_supported() -> bool:
    """bfloat16 convolutions are worth measuring: oneDNN supports them (natively with AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, run in turns after one warm-up run each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        sync(device)
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def reproduced(
    ref: list[dict], other: list[dict], *, iou_min: float = 0.9, score_tol: float | None = None, min_score: float = 0.0
) -> tuple[float, int]:
    """Share of ``ref``'s detections (score >= min_score) that ``other`` has with the same label and
    IoU >= iou_min (and |score difference| <= score_tol when given), over all images."""
    hit = total = 0
    for r, o in zip(ref, other):
        r = {k: v.float().cpu() for k, v in r.items()}
        o = {k: v.float().cpu() for k, v in o.items()}
        sel = r["scores"] >= min_score
        rb, rl, rs = r["boxes"][sel], r["labels"][sel], r["scores"][sel]
        total += rb.shape[0]
        if rb.shape[0] == 0 or o["boxes"].shape[0] == 0:
            continue
        ok = (box_iou(rb, o["boxes"]) >= iou_min) & (rl[:, None] == o["labels"][None, :])
        if score_tol is not None:
            ok &= (rs[:, None] - o["scores"][None, :]).abs() <= score_tol
        hit += int(ok.any(dim=1).sum())
    return (hit / total if total else 1.0), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--unoptimised", action="store_true", help="also time our model without the fast path")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument(
        "--no-reuse-memory",
        action="store_true",
        help="our fast path without keeping freed memory (cpu_memory.py): it is process-wide, so by default "
        "torchvision, in the same process, gets it too; with this flag neither does",
    )
    parser.add_argument("--no-fuse", action="store_true", help="our fast path without fused convolutions")
    parser.add_argument(
        "--trained",
        metavar="CHECKPOINT",
        help="also measure bf16 agreement with a trained checkpoint (ours or torchvision-format) ...",
    )
    parser.add_argument("--trained-images", metavar="GLOB", help="... on these images (e.g. the synthetic val set)")
    parser.add_argument("--trained-only", action="store_true", help="only the --trained agreement, no timing")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_bf16 = not args.no_bf16 and (device.type != "cpu" or bf16_supported())
    if args.trained_only:
        trained_agreement(args.trained, args.trained_images, device)
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r50fpn_detecting.pth"
        detecting_checkpoint(path)
        models = {}
        if torchvision is not None:
            models["torchvision fp32"] = torchvision_model(path).to(device)
        if args.unoptimised:
            models["ours fp32 (plain)"] = fasterrcnn_resnet50_fpn(weights=str(path)).eval().to(device)
        fast = {"reuse_memory": not args.no_reuse_memory, "fuse": not args.no_fuse}
        models["ours fp32"] = fasterrcnn_resnet50_fpn(weights=str(path)).to(device).optimize_for_inference(**fast)
        if use_bf16:
            models["ours bf16"] = (
                fasterrcnn_resnet50_fpn(weights=str(path))
                .to(device)
                .optimize_for_inference(dtype=torch.bfloat16, **fast)
            )

    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} after one warm-up, images {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} -> 800x1066"
    )
    if torchvision is None:
        print("torchvision not importable: its baseline is skipped (run with the reference environment)")
    else:
        print(f"baseline: torchvision {torchvision.__version__} fasterrcnn_resnet50_fpn, float32, same weights")
    if not use_bf16:
        print("bfloat16 skipped (" + ("--no-bf16" if args.no_bf16 else "oneDNN has no bf16 on this CPU") + ")")

    images = [im.to(device) for im in structured_images(max(args.batch_sizes), seed=1)]
    base = "torchvision fp32" if "torchvision fp32" in models else None
    for bs in args.batch_sizes:
        batch = images[:bs]
        with torch.inference_mode():
            outs = {name: m(batch) for name, m in models.items()}
        t = time_interleaved({name: (lambda m=m: m(batch)) for name, m in models.items()}, args.repeats, device)
        print(f"\nbatch {bs}: {sum(o['scores'].numel() for o in outs['ours fp32'])} detections (ours fp32)")
        for name, sec in t.items():
            line = f"  {name:20s} {sec:7.3f} s  ({sec / bs:6.3f} s/image)"
            if base is not None and name != base:
                line += f"   ours/torchvision {sec / t[base]:5.2f}"
            print(line)
        if base is not None:
            rate, n = reproduced(outs[base], outs["ours fp32"], score_tol=0.01)
            print(
                f"  agreement: ours fp32 reproduces {rate:.1%} of torchvision's {n} detections "
                "(same label, IoU >= 0.9, score within 0.01)"
            )
        if "ours fp32 (plain)" in outs:
            rate, n = reproduced(outs["ours fp32 (plain)"], outs["ours fp32"], iou_min=0.99, score_tol=1e-3)
            print(
                f"  agreement: optimised fp32 reproduces {rate:.1%} of the plain model's {n} detections "
                "(IoU >= 0.99, score within 0.001)"
            )
        if "ours bf16" in outs:
            rate, n = reproduced(outs["ours fp32"], outs["ours bf16"])
            rate5, n5 = reproduced(outs["ours fp32"], outs["ours bf16"], min_score=0.5)
            print(
                f"  agreement: ours bf16 reproduces {rate:.1%} of ours fp32's {n} detections "
                f"(same label, IoU >= 0.9); {rate5:.1%} of the {n5} with score >= 0.5"
            )
            # the control: how much of that is the random network's sensitivity to any perturbation? The
            # same float32 model on the images rounded once to bfloat16 (a change in the input alone)
            with torch.inference_mode():
                control = models["ours fp32"]([im.to(torch.bfloat16).to(im.dtype) for im in batch])
            rate, n = reproduced(outs["ours fp32"], control)
            print(
                f"  control: ours fp32 on the images rounded to bf16 reproduces {rate:.1%} of its own {n} "
                "detections on the exact images"
            )

    if args.trained and use_bf16:
        trained_agreement(args.trained, args.trained_images, device)


def trained_agreement(checkpoint: str, pattern: str | None, device: torch.device) -> None:
    """bf16 against fp32 on a trained detector: random weights amplify rounding as trained ones do not."""
    import glob

    try:  # the engine needs the project's own dependencies (tqdm, ...), not the reference environment's
        from fasterrcnn.engine.setup import load_model_for_inference
        from fasterrcnn.inference.detector import to_image_tensor
    except ImportError as e:
        print(f"\n--trained needs the project's environment ({e}): run .venv/bin/python {__file__} --trained-only ...")
        return

    paths = sorted(glob.glob(pattern or ""))
    if not paths:
        print(f"\n--trained: no image matches {pattern!r}")
        return
    models = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, _, _ = load_model_for_inference(checkpoint, device=device)
        models[name] = model.optimize_for_inference(dtype=dtype)
    outs = {name: [] for name in models}
    with torch.inference_mode():
        for path in paths:
            image = to_image_tensor(path).to(device)
            for name, model in models.items():
                outs[name].extend(model([image]))
    rate, n = reproduced(outs["fp32"], outs["bf16"])
    rate5, n5 = reproduced(outs["fp32"], outs["bf16"], min_score=0.5)
    print(
        f"\ntrained checkpoint {checkpoint}, {len(paths)} images: ours bf16 reproduces {rate:.1%} of ours fp32's "
        f"{n} detections (same label, IoU >= 0.9); {rate5:.1%} of the {n5} with score >= 0.5"
    )


if __name__ == "__main__":
    main()
