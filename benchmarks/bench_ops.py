"""Benchmark of fasterrcnn.ops against naive baselines measured in the same run.

    .venv/bin/python benchmarks/bench_ops.py [--repeats 5] [--quick] [--threads N]

Prints the median wall time over ``--repeats`` runs after one warm-up run (ours and its baseline interleaved),
and the ratio baseline / ours. Not a test: numbers depend on the machine and on anything else running on it.

Cases
- roi_align, 1000 RoIs on a [1, 256, 200, 336] map (an 800 x 1344 image at stride 4), 7x7, sampling_ratio 2,
  forward and forward + backward. Baseline: ``F.grid_sample`` on a per-RoI sampling grid followed by
  average pooling of each bin's samples (the textbook way to write RoIAlign in PyTorch). Alternative:
  the same taps through ``F.embedding_bag``'s generic backward instead of our transposed-gather backward.
- MultiScaleRoIAlign on an FPN (P2..P5 of an 800 x 1344 image), 1000 RoIs, 7x7, sampling_ratio 2.
- roi_pool, same map and RoIs, 7x7. Baseline: a Python loop over RoIs with adaptive_max_pool-like slicing.
- nms on 1k / 5k / 20k random boxes. Baseline: the classic loop that keeps the best remaining box and
  filters the rest by IoU (one Python iteration per kept box). batched_nms on 5k boxes, 80 classes.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import torch.nn.functional as F

from fasterrcnn.ops import MultiScaleRoIAlign, batched_nms, box_iou, nms, roi_align, roi_pool

roi_align_module = importlib.import_module("fasterrcnn.ops.roi_align")


def bench(fn, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""
    return bench_many([fn], repeats)[0]


def bench_many(fns, repeats: int) -> list[float]:
    """Median wall times of several functions, run interleaved (a, b, a, b, ...) after one warm-up each, so
    that a change in machine load hits them alike. A function whose warm-up took over 3 s runs once more only."""
    warm = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for j, fn in enumerate(fns):
            if i > 0 and warm[j] > 3.0:
                continue
            t0 = time.perf_counter()
            fn()
            times[j].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def report(name: str, ours: float, baseline: float | None = None, baseline_name: str = "baseline") -> None:
    line = f"{name:48s} ours {ours * 1e3:9.1f} ms"
    if baseline is not None:
        line += f"   {baseline_name} {baseline * 1e3:9.1f} ms   x{baseline / ours:6.2f}"
    print(line, flush=True)


def random_rois(k: int, img_h: float, img_w: float, min_side: float, max_side: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wh = min_side + torch.rand(k, 2, generator=g) * (max_side - min_side)
    xy = torch.rand(k, 2, generator=g) * (torch.tensor([img_w, img_h]) - wh).clamp(min=1)
    return torch.cat((xy, xy + wh), 1)


def grid_sample_roi_align(x: torch.Tensor, boxes: torch.Tensor, out: int, scale: float, sr: int) -> torch.Tensor:
    """Naive baseline: one sampling grid per RoI, bilinear grid_sample, mean over each bin's sr x sr samples."""
    _, _, h, w = x.shape
    b = boxes * scale
    t = (torch.arange(out * sr, dtype=x.dtype) + 0.5) / (out * sr)  # sample positions in [0, 1]
    xs = b[:, 0:1] + t[None] * (b[:, 2:3] - b[:, 0:1])  # [K, out*sr]
    ys = b[:, 1:2] + t[None] * (b[:, 3:4] - b[:, 1:2])
    gx = xs / (w - 1) * 2 - 1  # align_corners=True: pixel centres at integers
    gy = ys / (h - 1) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # [K, out*sr, out*sr, 2]
    k = boxes.shape[0]
    # a batch of one image: put all RoIs side by side in one tall grid
    samples = F.grid_sample(x, grid.reshape(1, k * out * sr, out * sr, 2), mode="bilinear",
                            padding_mode="border", align_corners=True)  # [1, C, K*out*sr, out*sr]
    samples = samples.view(x.shape[1], k, out * sr, out * sr).transpose(0, 1)
    return F.avg_pool2d(samples, sr)


def embedding_bag_generic_backward(x: torch.Tensor, rois: torch.Tensor, out: int, scale: float, sr: int):
    """Alternative: our taps, but F.embedding_bag's own autograd (index-sorting dense backward)."""
    n, c, h, w = x.shape
    feats = x.permute(0, 2, 3, 1).contiguous().view(n * h * w, c)
    with torch.no_grad():
        g = torch.full((rois.shape[0],), sr, dtype=torch.int64)
        index, weight = roi_align_module._bag_taps(rois, out, out, scale, g, g, sr, sr, False, h, w)
    y = F.embedding_bag(index, feats, mode="sum", per_sample_weights=weight)
    return y.view(rois.shape[0], out, out, c).permute(0, 3, 1, 2).contiguous()


def loop_roi_pool(x: torch.Tensor, boxes: torch.Tensor, out: int, scale: float) -> torch.Tensor:
    """Naive baseline: a Python loop over RoIs, crop + adaptive_max_pool2d (bins close to RoIPool's)."""
    res = []
    _, _, h, w = x.shape
    for b in (boxes * scale).round().long().tolist():
        x1, y1 = min(max(b[0], 0), w - 1), min(max(b[1], 0), h - 1)
        x2, y2 = min(max(b[2], x1), w - 1), min(max(b[3], y1), h - 1)
        res.append(F.adaptive_max_pool2d(x[:, :, y1:y2 + 1, x1:x2 + 1], out))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="skip the slow baselines (20k-box loop NMS)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    r = args.repeats
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {r} after warm-up")

    # --- roi_align on one stride-4 map ---------------------------------------------------------------
    x = torch.randn(1, 256, 200, 336)
    boxes = random_rois(1000, 800, 1344, 16, 300, seed=0)
    rois = torch.cat((torch.zeros(1000, 1), boxes), 1)
    scale, out, sr = 0.25, 7, 2

    ours_f, base_f = bench_many([lambda: roi_align(x, rois, out, scale, sr),
                                 lambda: grid_sample_roi_align(x, boxes, out, scale, sr)], r)
    report("roi_align fwd (1000 RoIs, 256x200x336, 7x7, sr 2)", ours_f, base_f, "grid_sample")

    xg = x.clone().requires_grad_()

    def fwd_bwd(fn):
        def run():
            xg.grad = None
            fn().sum().backward()
        return run

    ours_b, base_b, alt_b = bench_many([fwd_bwd(lambda: roi_align(xg, rois, out, scale, sr)),
                                        fwd_bwd(lambda: grid_sample_roi_align(xg, boxes, out, scale, sr)),
                                        fwd_bwd(lambda: embedding_bag_generic_backward(xg, rois, out, scale, sr))], r)
    report("roi_align fwd+bwd", ours_b, base_b, "grid_sample")
    report("roi_align fwd+bwd (vs generic embedding_bag bwd)", ours_b, alt_b, "generic")

    ours_a = bench(lambda: roi_align(x, rois, out, scale, 0), r)
    report("roi_align fwd, adaptive grid (sr 0, grids to 11x11)", ours_a)

    # --- MultiScaleRoIAlign on an FPN ----------------------------------------------------------------
    feats = {str(i): torch.randn(1, 256, 800 // s, 1344 // s) for i, s in enumerate((4, 8, 16, 32))}
    fpn_boxes = [random_rois(1000, 800, 1344, 16, 700, seed=1)]
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    report("MultiScaleRoIAlign fwd (1000 RoIs, P2..P5)", bench(lambda: pooler(feats, fpn_boxes, [(800, 1344)]), r))

    # --- roi_pool -------------------------------------------------------------------------------------
    ours_p, base_p = bench_many([lambda: roi_pool(x, rois, out, scale), lambda: loop_roi_pool(x, boxes, out, scale)], r)
    report("roi_pool fwd (1000 RoIs, 7x7)", ours_p, base_p, "loop")
    ours_pb, base_pb = bench_many([fwd_bwd(lambda: roi_pool(xg, rois, out, scale)),
                                   fwd_bwd(lambda: loop_roi_pool(xg, boxes, out, scale))], r)
    report("roi_pool fwd+bwd", ours_pb, base_pb, "loop")

    # --- nms -----------------------------------------------------------------------------------------
    for n in (1000, 5000, 20000):
        b = random_rois(n, 800, 1344, 8, 200, seed=n)
        s = torch.rand(n)
        kept = nms(b, s, 0.7).numel()
        if args.quick and n > 5000:
            report(f"nms {n} boxes (thr 0.7, {kept} kept)", bench(lambda: nms(b, s, 0.7), r))
            continue
        assert torch.equal(nms(b, s, 0.7), loop_nms(b, s, 0.7))
        ours_n, base_n = bench_many([lambda: nms(b, s, 0.7), lambda: loop_nms(b, s, 0.7)], r)
        report(f"nms {n} boxes (thr 0.7, {kept} kept)", ours_n, base_n, "loop")
    b = random_rois(5000, 800, 1344, 8, 200, seed=7)
    s = torch.rand(5000)
    ids = torch.randint(0, 80, (5000,))

    def loop_batched():
        kept = [torch.nonzero(ids == c).flatten()[loop_nms(b[ids == c], s[ids == c], 0.5)] for c in range(80)]
        k = torch.sort(torch.cat(kept)).values  # ties in score: input order, as batched_nms
        return k[torch.sort(s[k], descending=True, stable=True).indices]

    assert torch.equal(batched_nms(b, s, ids, 0.5), loop_batched())
    report("batched_nms 5000 boxes, 80 classes (thr 0.5)",
           *bench_many([lambda: batched_nms(b, s, ids, 0.5), loop_batched], r), "loop")


if __name__ == "__main__":
    main()
