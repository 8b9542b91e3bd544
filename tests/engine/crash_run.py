"""A training run that dies on cue, for the crash tests (run as a subprocess, not collected by pytest).

    python tests/engine/crash_run.py MODE N TRAIN_ARGS...      (e.g. --config c.yaml, or --resume last.pt)

MODE:
  none              train normally
  kill-at-iter      SIGKILL itself in the middle of optimizer step N (after the forward pass)
  kill-in-save      SIGKILL itself half-way through writing the N-th checkpoint file: half of the
                    bytes are in the temporary file, flushed to disk, when the process dies
  signal-at-iter    send itself SIGTERM during step N, as a scheduler would; the run must finish
                    the step, save last.pt and exit with 143
The exit code is the CLI's (or -9 for the kills).
"""

import io
import os
import signal
import sys

import torch

import fasterrcnn.engine.trainer as trainer
from fasterrcnn.cli import main


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def at_iteration(n: int, action) -> None:
    original = trainer.check_finite

    def check_finite(losses, loss, iteration):
        if iteration == n:
            action()
        return original(losses, loss, iteration)

    trainer.check_finite = check_finite


def in_nth_save(n: int) -> None:
    real_save = torch.save
    calls = 0

    def save(obj, f, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    mode, n, train_args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if mode == "kill-at-iter":
        at_iteration(n, die)
    elif mode == "kill-in-save":
        in_nth_save(n)
    elif mode == "signal-at-iter":
        at_iteration(n, lambda: os.kill(os.getpid(), signal.SIGTERM))
    elif mode != "none":
        raise SystemExit(f"unknown mode {mode}")
    sys.exit(main(["train", *train_args]))
