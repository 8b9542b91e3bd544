"""MultiScaleRoIAlign's forward on one thread against the caller's threads, on a quiet or a busy CPU:
the measurement behind which parts of the RoI ops run serially (docs/design-decisions.md, "The RoI ops
and NMS run on the calling thread").

    .venv/bin/python benchmarks/bench_pool_threads.py [--repeats 9] [--threads 2] [--busy 2]

1000 RoIs (log-uniform sizes, so every level gets some) over P2..P5 of an 800x1088 image, 256
channels, channels-last maps (as the optimised model has them), inference mode. "1 thread" sets
``torch.set_num_threads(1)`` around the call; "N threads" runs it as the library does (the taps on the
calling thread, the gather and the placement of the rows on N). ``--busy K`` starts K processes that
spin on a core each for the duration, as other jobs on a shared machine would. Medians of interleaved
repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fasterrcnn.ops import MultiScaleRoIAlign


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0, help="spinning processes beside the benchmark")
    args = parser.parse_args()

    torch.manual_seed(0)
    sizes = [(200, 272), (100, 136), (50, 68), (25, 34)]
    feats = {
        str(i): torch.randn(1, 256, h, w).contiguous(memory_format=torch.channels_last)
        for i, (h, w) in enumerate(sizes)
    }
    wh = torch.exp(torch.empty(1000, 2).uniform_(2.5, 6.5))
    xy = torch.rand(1000, 2) * torch.tensor([1066.0, 800.0])
    boxes = [torch.cat([xy, xy + wh], 1).clamp(max=1066)]
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)

    def once(threads: int) -> float:
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                start = time.perf_counter()
                pooler(feats, boxes, [(800, 1066)])
                return time.perf_counter() - start
        finally:
            torch.set_num_threads(args.threads)

    busy = [multiprocessing.Process(target=spin, args=(3600.0,), daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    try:
        for t in (1, args.threads):
            once(t)  # warm-up
        times: dict[int, list[float]] = {1: [], args.threads: []}
        for _ in range(args.repeats):
            for t in times:
                times[t].append(once(t))
    finally:
        for p in busy:
            p.terminate()
    print(
        f"torch {torch.__version__}, MultiScaleRoIAlign forward, 1000 RoIs over P2..P5 (800x1088, 256 channels), "
        f"{args.busy} spinning processes beside it, median of {args.repeats}"
    )
    one = statistics.median(times[1])
    for t, values in times.items():
        med = statistics.median(values)
        print(
            f"  {t} thread{'s' if t > 1 else ' '}  {med * 1e3:7.1f} ms  (max {max(values) * 1e3:6.1f} ms)"
            f"  ratio to 1 thread {med / one:.2f}"
        )


if __name__ == "__main__":
    main()
