"""Time to accuracy of the demo: `fasterrcnn train` with its defaults, from nothing (data generation
included) to the final evaluation, in a fresh folder; prints the wall time against the 10-minute
budget and the AP against the targets (AP >= 0.60, AP50 >= 0.90 on the held-out synthetic set).

    python benchmarks/demo_time_to_accuracy.py [--workdir /tmp/demo-bench] [overrides ...]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BUDGET_S = 600.0
TARGETS = {"AP": 0.60, "AP50": 0.90}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/fasterrcnn-demo-bench")
    parser.add_argument("overrides", nargs="*", help="config overrides passed to fasterrcnn train")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "fasterrcnn",
        "train",
        f"data.synth_dir={work / 'synth'}",
        f"train.out_dir={work / 'runs'}",
        *args.overrides,
    ]
    print("command:", " ".join(cmd), f"(torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')})", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"training failed with exit code {proc.returncode}")
        return 1
    metrics = json.loads((work / "runs" / "demo" / "eval.json").read_text())
    print(f"\nwall time {wall:.0f} s = {wall / BUDGET_S:.2f} x the {BUDGET_S:.0f} s budget")
    ok = wall <= BUDGET_S
    for key, target in TARGETS.items():
        print(f"{key} {metrics[key]:.3f} (target >= {target:.2f}): {'met' if metrics[key] >= target else 'NOT met'}")
        ok &= metrics[key] >= target
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
