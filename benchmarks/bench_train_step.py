"""One R50-FPN training step, ours against torchvision's fasterrcnn_resnet50_fpn, same weights, same batch.

    PYTHONPATH=. ~/.cache/fasterrcnn-reference-env/bin/python benchmarks/bench_train_step.py \
        [--repeats 3] [--threads 2] [--layout both|nchw|channels_last] [--no-memory] [--memory-only]

A step is what the trainer does: forward in training mode (the four losses), their sum backward, and an
SGD step (momentum 0.9, weight decay 1e-4, torchvision's reference recipe). The model is torchvision's
fine-tuning layout: ResNet-50 with FrozenBatchNorm2d, layers 2-4 trainable (trainable_backbone_layers=3,
as with ImageNet weights), FPN, 91 classes. Both models get the same random weights (ours -> state_dict ->
torchvision's, loaded strictly; the frozen statistics calibrated on an image so activations are
well scaled, as in a trained network) and the same batch: two images of 800 x 1066 and 768 x 1024
(both resized to 800 x 1066, padded to 800 x 1088) with 3 and 5 ground-truth boxes.

Timing: the models run interleaved (one step each in turn) after a warm-up step each; the medians are
printed with the ratio ours / torchvision (< 1: ours is faster). "ours" runs in channels-last, the
trainer's default (train.channels_last); ``--layout both`` also times ours in NCHW. The non-conv parts of
the step (RPN target assignment and encoding, sampling + RPN losses, RoI target selection, RoI losses;
their forward only) are timed inside the same steps and printed per model (ours encodes only the
sampled positive anchors, inside its RPN loss; torchvision encodes every anchor beforehand).

Peak memory: each model runs a few steps in a subprocess of its own; the subprocess reports its peak
resident set (VmHWM) and its RSS before the first step, so the difference is what a step adds.

Without torchvision (the project's own environment), only ours is timed. Not a test: numbers depend on
the machine and on anything else running on it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch

from fasterrcnn.model.backbone import build_resnet_fpn
from fasterrcnn.model.faster_rcnn import FasterRCNN
from fasterrcnn.model.frozen_bn import FrozenBatchNorm2d

try:
    import torchvision
    from torchvision.models.detection import FasterRCNN as TVFasterRCNN
    from torchvision.models.detection import roi_heads as tv_roi_heads
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as tv_misc
except ImportError:  # the project's own environment
    torchvision = None

NUM_CLASSES = 91
IMAGE_SIZES = ((800, 1066), (768, 1024))
NUM_BOXES = (3, 5)


# ---- models and data ---------------------------------------------------------------------------
def build_ours(seed: int = 0) -> FasterRCNN:
    """R50-FPN as torchvision's builder makes it with ImageNet backbone weights: FrozenBatchNorm2d
    (eps 1e-5), conv1 and layer1 frozen. Random weights, frozen statistics calibrated on one image."""
    torch.manual_seed(seed)
    backbone = build_resnet_fpn(50, norm_layer=functools.partial(FrozenBatchNorm2d, eps=1e-5), trainable_layers=3)
    model = FasterRCNN(backbone, NUM_CLASSES)
    calibrate_frozen_bn(model, seed)
    return model


def calibrate_frozen_bn(model: torch.nn.Module, seed: int) -> None:
    """Set each FrozenBatchNorm2d's statistics to those of its input on one image, in order, so every
    layer normalises its input as a trained network's would (random weights otherwise blow up or die)."""
    hooks = []

    def set_stats(module, args):
        (x,) = args
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))
        module.weight.uniform_(0.6, 1.4)
        module.bias.uniform_(-0.2, 0.2)

    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            hooks.append(m.register_forward_pre_hook(set_stats))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.eval()
        model.backbone(torch.randn(1, 3, 256, 320, generator=g))
    for h in hooks:
        h.remove()
    model.train()


def build_torchvision(state_dict: dict) -> torch.nn.Module:
    """torchvision's fasterrcnn_resnet50_fpn as its builder makes it with ImageNet backbone weights
    (FrozenBatchNorm2d, trainable_backbone_layers=3), loaded from our state_dict."""
    body = torchvision.models.resnet50(norm_layer=tv_misc.FrozenBatchNorm2d)
    model = TVFasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=NUM_CLASSES)
    model.load_state_dict(state_dict, strict=True)
    return model.train()


def make_batch(seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for (h, w), n in zip(IMAGE_SIZES, NUM_BOXES):
        images.append(torch.rand(3, h, w, generator=g))
        wh = 40 + torch.rand(n, 2, generator=g) * 360
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
        targets.append(
            {"boxes": torch.cat([xy, xy + wh], dim=1), "labels": torch.randint(1, NUM_CLASSES, (n,), generator=g)}
        )
    return images, targets


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # a small learning rate: the weights are random and a large step diverges; it changes no work
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)


def train_step(model, optimizer, images, targets) -> float:
    optimizer.zero_grad(set_to_none=True)
    losses = model(images, [dict(t) for t in targets])
    total = sum(losses.values())
    total.backward()
    optimizer.step()
    return float(total.detach())


# ---- timing of the non-conv parts --------------------------------------------------------------
class PartTimer:
    """Wraps named callables so each call's wall time adds to its part for the current step."""

    def __init__(self):
        self.step: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self._restore = []

    def wrap(self, owner, attr: str, part: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.step[part] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        self._restore.append((owner, attr, original))

    def end_step(self) -> None:
        self.steps.append(dict(self.step))
        self.step = defaultdict(float)

    def medians(self) -> dict[str, float]:
        parts = sorted({k for s in self.steps for k in s})
        return {k: statistics.median(s.get(k, 0.0) for s in self.steps) for k in parts}


def instrument_ours(model: FasterRCNN, timer: PartTimer) -> None:
    rpn, heads = model.rpn, model.roi_heads
    timer.wrap(rpn, "match_anchors", "rpn targets (match + encode)")  # ours encodes in compute_loss
    timer.wrap(rpn, "compute_loss", "rpn sampling + losses")
    timer.wrap(heads, "select_training_samples", "roi targets (match + sample + encode)")
    module = sys.modules[type(heads).__module__]
    timer.wrap(module, "fastrcnn_loss", "roi losses")


def instrument_torchvision(model, timer: PartTimer) -> None:
    rpn, heads = model.rpn, model.roi_heads
    timer.wrap(rpn, "assign_targets_to_anchors", "rpn targets (match + encode)")
    timer.wrap(rpn.box_coder, "encode", "rpn targets (match + encode)")
    timer.wrap(rpn, "compute_loss", "rpn sampling + losses")
    timer.wrap(heads, "select_training_samples", "roi targets (match + sample + encode)")
    timer.wrap(tv_roi_heads, "fastrcnn_loss", "roi losses")


# ---- the timed comparison ----------------------------------------------------------------------
def run_timing(args) -> dict[str, float]:
    images, targets = make_batch()
    ours = build_ours()
    state_dict = ours.state_dict()
    contenders: dict[str, tuple] = {}
    layouts = ["channels_last", "nchw"] if args.layout == "both" else [args.layout]
    for layout in layouts:
        model = build_ours()
        if layout == "channels_last":
            model.to_channels_last()
        timer = PartTimer()
        instrument_ours(model, timer)
        contenders[f"ours ({layout})"] = (model, make_optimizer(model), timer)
    if torchvision is not None:
        tv = build_torchvision(state_dict)
        timer = PartTimer()
        instrument_torchvision(tv, timer)
        contenders["torchvision"] = (tv, make_optimizer(tv), timer)
    else:
        print(
            "torchvision is not importable here: timing ours only (run in the reference environment for the baseline)"
        )
    del ours

    torch.manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for i in range(args.repeats + 1):  # the first round is the warm-up
        for name, (model, opt, timer) in contenders.items():
            t0 = time.perf_counter()
            loss = train_step(model, opt, images, targets)
            elapsed = time.perf_counter() - t0
            if i == 0:
                timer.steps.clear()
                timer.step.clear()
                print(f"  warm-up {name:22s} {elapsed:7.2f} s   loss {loss:.3f}", flush=True)
            else:
                timer.end_step()
                times[name].append(elapsed)
                print(f"  step {i}  {name:22s} {elapsed:7.2f} s   loss {loss:.3f}", flush=True)

    medians = {name: statistics.median(t) for name, t in times.items()}
    print()
    print(f"{'model':24s} {'step (median)':>14s} {'vs torchvision':>15s}")
    for name, m in medians.items():
        ratio = f"x{m / medians['torchvision']:.3f}" if "torchvision" in medians else "-"
        print(f"{name:24s} {m:12.3f} s {ratio:>15s}")
    print()
    print("non-conv parts (forward only, median per step):")
    for name, (_, _, timer) in contenders.items():
        parts = timer.medians()
        total = sum(parts.values())
        print(f"  {name}: {total * 1e3:.1f} ms = {100 * total / medians[name]:.2f}% of the step")
        for part, t in parts.items():
            print(f"      {part:40s} {t * 1e3:8.1f} ms")
    return medians


# ---- peak memory, one subprocess per model -----------------------------------------------------
def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident set since its exec (VmHWM). Not ru_maxrss: Linux carries the parent's
    high-water mark across fork and exec into it, so every child of a parent that once held 4 GiB reported
    at least 4 GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(which: str, weights: str, steps: int) -> None:
    state_dict = torch.load(weights, weights_only=True)
    if which == "torchvision":
        model = build_torchvision(state_dict)
    else:
        model = FasterRCNN(
            build_resnet_fpn(50, norm_layer=functools.partial(FrozenBatchNorm2d, eps=1e-5), trainable_layers=3),
            NUM_CLASSES,
        )
        model.load_state_dict(state_dict, strict=True)
        model.train()
        if which == "ours (channels_last)":
            model.to_channels_last()
    del state_dict
    images, targets = make_batch()
    optimizer = make_optimizer(model)
    torch.manual_seed(0)  # the same proposals and samples in every child
    before = rss_mib()
    for _ in range(steps):
        train_step(model, optimizer, images, targets)
    peak = peak_rss_mib()
    print(json.dumps({"model": which, "rss_before_mib": before, "peak_rss_mib": peak}))


def run_memory(args) -> None:
    names = {
        "both": ["ours (channels_last)", "ours (nchw)"],
        "nchw": ["ours (nchw)"],
        "channels_last": ["ours (channels_last)"],
    }[args.layout]
    if torchvision is not None:
        names.append("torchvision")
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pt")
        torch.save(build_ours().state_dict(), weights)
        results = {}
        for name in names:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--memory-child",
                name,
                "--weights",
                weights,
                "--threads",
                str(args.threads),
                "--memory-steps",
                str(args.memory_steps),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
    print()
    print(f"peak memory ({args.memory_steps} steps in a subprocess per model):")
    print(f"{'model':24s} {'peak RSS':>10s} {'RSS before':>11s} {'step adds':>10s} {'vs torchvision':>15s}")
    for name, r in results.items():
        ratio = (
            f"x{r['peak_rss_mib'] / results['torchvision']['peak_rss_mib']:.3f}" if "torchvision" in results else "-"
        )
        print(
            f"{name:24s} {r['peak_rss_mib']:7.0f} MiB {r['rss_before_mib']:7.0f} MiB "
            f"{r['peak_rss_mib'] - r['rss_before_mib']:6.0f} MiB {ratio:>15s}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per model after the warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--layout",
        choices=["both", "nchw", "channels_last"],
        default="channels_last",
        help="ours in channels-last (the trainer's default), NCHW, or both",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.weights, args.memory_steps)
        return
    print(
        f"torch {torch.__version__}"
        + (f", torchvision {torchvision.__version__}" if torchvision is not None else "")
        + f", {torch.get_num_threads()} threads; batch of 2 at {IMAGE_SIZES}, {NUM_BOXES} gt boxes; "
        f"median of {args.repeats} steps after one warm-up step each, interleaved",
        flush=True,
    )
    if not args.memory_only:
        run_timing(args)
    if not args.no_memory:
        run_memory(args)


if __name__ == "__main__":
    main()
