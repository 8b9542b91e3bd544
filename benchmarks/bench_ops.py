"""Benchmark of fasterrcnn.ops against torchvision.ops (when importable) measured in the same run.

    PYTHONPATH=. ~/.cache/fasterrcnn-reference-env/bin/python benchmarks/bench_ops.py [--repeats 5] [--threads N]
    .venv/bin/python benchmarks/bench_ops.py        # no torchvision: plain-PyTorch baselines only

Prints the median wall time over ``--repeats`` runs after one warm-up run (ours and the baseline interleaved,
a, b, a, b, ...), the ratio ours / baseline (below 1: we are faster), and the torch thread count. Every
torchvision case first checks that both give the same result (NMS: the same indices; RoIPool: the same values
and gradient, bit for bit; RoIAlign: equal up to float32 summation order). Not a test: numbers depend on the
machine and on anything else running on it.

Cases (an 800 x 1344 image; the stride-4 map is [1, 256, 200, 336]; 1000 RoIs; 7x7; sampling_ratio 2)
- nms on 1k / 5k / 20k random boxes (thr 0.7); batched_nms on 5k boxes over 80 classes (thr 0.5).
- roi_align forward and forward + backward on the stride-4 map; forward with an adaptive grid (sr 0).
- MultiScaleRoIAlign over P2..P5 (four 256-channel maps), forward and forward + backward.
- roi_pool forward and forward + backward on the stride-4 map.
Without torchvision (or with ``--plain``) the baselines are plain PyTorch: the classic loop NMS, RoIAlign by
``F.grid_sample`` plus average pooling, RoIPool by a Python loop of ``adaptive_max_pool2d``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fasterrcnn.ops import MultiScaleRoIAlign, batched_nms, box_iou, nms, roi_align, roi_pool

try:
    import torchvision.ops as tv_ops
except Exception:  # not a dependency: the reference environment has it, ours need not
    tv_ops = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_many(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median wall times of several functions, run interleaved (a, b, a, b, ...) after one warm-up each, so
    that a change in machine load hits them alike. A function whose warm-up took over 3 s runs once more only."""
    warm = []
    for fn in fns:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        warm.append(time.perf_counter() - t0)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for j, fn in enumerate(fns):
            if i > 0 and warm[j] > 3.0:
                continue
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[j].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def report(name: str, ours: float, baseline: float | None = None, baseline_name: str = "") -> None:
    line = f"{name:46s} ours {ours * 1e3:9.1f} ms"
    if baseline is not None:
        line += f"   {baseline_name:>11s} {baseline * 1e3:9.1f} ms   ours/{baseline_name} {ours / baseline:5.2f}"
    print(line, flush=True)


def random_rois(k: int, img_h: float, img_w: float, min_side: float, max_side: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wh = min_side + torch.rand(k, 2, generator=g) * (max_side - min_side)
    xy = torch.rand(k, 2, generator=g) * (torch.tensor([img_w, img_h]) - wh).clamp(min=1)
    return torch.cat((xy, xy + wh), 1)


# --- plain-PyTorch baselines ---------------------------------------------------------------------------------


def grid_sample_roi_align(x: torch.Tensor, rois: torch.Tensor, out: int, scale: float, sr: int) -> torch.Tensor:
    """Naive baseline: one sampling grid per RoI, bilinear grid_sample, mean over each bin's sr x sr samples."""
    _, _, h, w = x.shape
    b = rois[:, 1:] * scale
    t = (torch.arange(out * sr, dtype=x.dtype, device=x.device) + 0.5) / (out * sr)  # sample positions in [0, 1]
    xs = b[:, 0:1] + t[None] * (b[:, 2:3] - b[:, 0:1])  # [K, out*sr]
    ys = b[:, 1:2] + t[None] * (b[:, 3:4] - b[:, 1:2])
    gx = xs / (w - 1) * 2 - 1  # align_corners=True: pixel centres at integers
    gy = ys / (h - 1) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # [K, out*sr, out*sr, 2]
    k = b.shape[0]
    # a batch of one image: put all RoIs side by side in one tall grid
    samples = F.grid_sample(
        x, grid.reshape(1, k * out * sr, out * sr, 2), mode="bilinear", padding_mode="border", align_corners=True
    )  # [1, C, K*out*sr, out*sr]
    samples = samples.view(x.shape[1], k, out * sr, out * sr).transpose(0, 1)
    return F.avg_pool2d(samples, sr)


def loop_roi_pool(x: torch.Tensor, rois: torch.Tensor, out: int, scale: float) -> torch.Tensor:
    """Naive baseline: a Python loop over RoIs, crop + adaptive_max_pool2d (bins close to RoIPool's)."""
    res = []
    _, _, h, w = x.shape
    for b in (rois[:, 1:] * scale).round().long().tolist():
        x1, y1 = min(max(b[0], 0), w - 1), min(max(b[1], 0), h - 1)
        x2, y2 = min(max(b[2], x1), w - 1), min(max(b[3], y1), h - 1)
        res.append(F.adaptive_max_pool2d(x[:, :, y1 : y2 + 1, x1 : x2 + 1], out))
    return torch.cat(res)


def loop_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> torch.Tensor:
    """Naive baseline: keep the best remaining box, drop the rest above thr, one Python step per kept box."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        if order.numel() == 1:
            break
        iou = box_iou(boxes[i][None], boxes[order[1:]])[0]
        order = order[1:][iou <= thr]
    return torch.stack(keep) if keep else order


def loop_batched_nms(boxes: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor, thr: float) -> torch.Tensor:
    kept = [
        torch.nonzero(ids == c).flatten()[loop_nms(boxes[ids == c], scores[ids == c], thr)]
        for c in ids.unique().tolist()
    ]
    k = torch.sort(torch.cat(kept)).values  # ties in score: input order, as batched_nms
    return k[torch.sort(scores[k], descending=True, stable=True).indices]


# --- checks ----------------------------------------------------------------------------------------------------


def check_equal(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    if not torch.equal(ours, theirs):
        raise AssertionError(f"{name}: ours differs from torchvision's")


def check_close(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    if err > 1e-5 * max(scale, 1.0):
        raise AssertionError(f"{name}: ours differs from torchvision's by {err:.3g} (max |value| {scale:.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--plain", action="store_true", help="plain-PyTorch baselines even when torchvision is importable"
    )
    parser.add_argument("--quick", action="store_true", help="skip the slowest plain baseline (20k-box loop NMS)")
    parser.add_argument(
        "--only", default="", help="comma-separated case prefixes (nms,batched,roi_align,msra,roi_pool)"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    r = args.repeats
    use_tv = tv_ops is not None and not args.plain
    only = [s for s in args.only.split(",") if s]

    def want(case: str) -> bool:
        return not only or any(case.startswith(s) for s in only)

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, median of {r} after warm-up")
    if use_tv:
        import torchvision

        print(f"baseline: torchvision {torchvision.__version__} (ratio ours/tv, below 1 is faster)")
    else:
        print(
            "torchvision "
            + ("not importable" if tv_ops is None else "not used (--plain)")
            + ": torchvision baselines skipped, plain-PyTorch baselines instead"
        )

    # --- nms ---------------------------------------------------------------------------------------------------
    if want("nms"):
        for n in (1000, 5000, 20000):
            b = random_rois(n, 800, 1344, 8, 200, seed=n).to(dev)
            s = torch.rand(n, generator=torch.Generator().manual_seed(n + 1)).to(dev)
            kept = nms(b, s, 0.7)
            name = f"nms {n} boxes (thr 0.7, {kept.numel()} kept)"
            if use_tv:
                check_equal(name, kept, tv_ops.nms(b, s, 0.7))
                report(name, *bench_many([lambda: nms(b, s, 0.7), lambda: tv_ops.nms(b, s, 0.7)], r, dev), "tv")
            elif args.quick and n > 5000:
                report(name, *bench_many([lambda: nms(b, s, 0.7)], r, dev))
            else:
                check_equal(name, kept, loop_nms(b, s, 0.7))
                report(name, *bench_many([lambda: nms(b, s, 0.7), lambda: loop_nms(b, s, 0.7)], r, dev), "loop")
    if want("batched"):
        b = random_rois(5000, 800, 1344, 8, 200, seed=7).to(dev)
        s = torch.rand(5000, generator=torch.Generator().manual_seed(8)).to(dev)
        ids = torch.randint(0, 80, (5000,), generator=torch.Generator().manual_seed(9)).to(dev)
        name = "batched_nms 5000 boxes, 80 classes (thr 0.5)"
        if use_tv:
            check_equal(name, batched_nms(b, s, ids, 0.5), tv_ops.batched_nms(b, s, ids, 0.5))
            report(
                name,
                *bench_many([lambda: batched_nms(b, s, ids, 0.5), lambda: tv_ops.batched_nms(b, s, ids, 0.5)], r, dev),
                "tv",
            )
        else:
            check_equal(name, batched_nms(b, s, ids, 0.5), loop_batched_nms(b, s, ids, 0.5))
            report(
                name,
                *bench_many([lambda: batched_nms(b, s, ids, 0.5), lambda: loop_batched_nms(b, s, ids, 0.5)], r, dev),
                "loop",
            )

    # --- roi_align / roi_pool on one stride-4 map --------------------------------------------------------------
    scale, out, sr = 0.25, 7, 2
    x = torch.randn(1, 256, 200, 336).to(dev)
    xg = x.clone().requires_grad_()
    rois = torch.cat((torch.zeros(1000, 1), random_rois(1000, 800, 1344, 16, 300, seed=0)), 1).to(dev)
    grad_out = torch.randn(1000, 256, out, out).to(dev)

    def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor = xg) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            inp.grad = None
            fn(inp).backward(grad_out)
            return inp.grad

        return run

    def pair_case(
        name: str,
        ours: Callable,
        tv: Callable | None,
        plain: Callable | None,
        plain_name: str,
        backward: bool,
        exact: bool,
    ) -> None:
        """One case: check ours against torchvision, then time both interleaved (or ours against a plain one)."""
        check = check_equal if exact else check_close
        wrap = fwd_bwd if backward else (lambda fn: lambda: fn(x))
        if use_tv and tv is not None:
            check(name, wrap(ours)().clone(), wrap(tv)().clone())
            report(name, *bench_many([wrap(ours), wrap(tv)], r, dev), "tv")
        elif plain is not None:
            report(name, *bench_many([wrap(ours), wrap(plain)], r, dev), plain_name)
        else:
            report(name, *bench_many([wrap(ours)], r, dev))

    tv_align = (lambda t: tv_ops.roi_align(t, rois, out, scale, sr)) if tv_ops else None
    tv_pool = (lambda t: tv_ops.roi_pool(t, rois, out, scale)) if tv_ops else None
    if want("roi_align"):
        for backward in (False, True):
            pair_case(
                "roi_align fwd" + ("+bwd" if backward else "") + " (1000 RoIs, 256x200x336)",
                lambda t: roi_align(t, rois, out, scale, sr),
                tv_align,
                lambda t: grid_sample_roi_align(t, rois, out, scale, sr),
                "grid_sample",
                backward,
                False,
            )
        pair_case(
            "roi_align fwd, adaptive grid (sr 0)",
            lambda t: roi_align(t, rois, out, scale, 0),
            (lambda t: tv_ops.roi_align(t, rois, out, scale, 0)) if tv_ops else None,
            None,
            "",
            False,
            False,
        )
    if want("roi_pool"):
        for backward in (False, True):
            pair_case(
                "roi_pool fwd" + ("+bwd" if backward else "") + " (1000 RoIs, 256x200x336)",
                lambda t: roi_pool(t, rois, out, scale),
                tv_pool,
                lambda t: loop_roi_pool(t, rois, out, scale),
                "loop",
                backward,
                True,
            )

    # --- MultiScaleRoIAlign over P2..P5 -------------------------------------------------------------------------
    if want("msra"):
        names = ["0", "1", "2", "3"]
        levels = [torch.randn(1, 256, 800 // s, 1344 // s).to(dev).requires_grad_() for s in (4, 8, 16, 32)]
        fpn_boxes = [random_rois(1000, 800, 1344, 16, 700, seed=1).to(dev)]
        ours_pooler = MultiScaleRoIAlign(names, 7, 2)
        tv_pooler = tv_ops.MultiScaleRoIAlign(names, 7, 2) if use_tv else None

        def msra(pooler, backward: bool) -> Callable[[], object]:
            def run():
                feats = dict(zip(names, levels if backward else [t.detach() for t in levels]))
                y = pooler(feats, fpn_boxes, [(800, 1344)])
                if not backward:
                    return y
                for t in levels:
                    t.grad = None
                y.backward(grad_out)
                return torch.cat([t.grad.flatten() for t in levels])

            return run

        for backward in (False, True):
            name = "MultiScaleRoIAlign fwd" + ("+bwd" if backward else "") + " (1000 RoIs, P2..P5)"
            if tv_pooler is not None:
                check_close(name, msra(ours_pooler, backward)().clone(), msra(tv_pooler, backward)().clone())
                report(name, *bench_many([msra(ours_pooler, backward), msra(tv_pooler, backward)], r, dev), "tv")
            else:
                report(name, *bench_many([msra(ours_pooler, backward)], r, dev))


if __name__ == "__main__":
    main()
