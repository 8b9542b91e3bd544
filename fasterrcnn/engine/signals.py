"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM.

The first signal only asks: the trainer finishes the step it is in, writes ``last.pt`` and raises
``TrainingInterrupted``, whose message says how to resume; the command line exits with 128 + the
signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by that signal.
A second SIGINT aborts at once (``KeyboardInterrupt`` where the process is), losing the work since
the last checkpoint, which stays whole (every checkpoint write is atomic; one cut short by the
interrupt leaves no temporary file, and the command exits 130 with the interrupt's message). A SIGTERM while a stop is
already pending is ignored: torchrun and schedulers follow SIGINT with SIGTERM to every process, and
that must not cut short the checkpoint being written.

DataLoader workers ignore SIGINT (Ctrl-C reaches the terminal's whole process group), so that the
main process decides when they stop. They keep SIGTERM's default, which is how the main process
ends a stuck worker; so a SIGTERM sent to the whole group (``kill -TERM -- -PGID``, a cgroup-wide
stop) with ``data.workers > 0`` ends the workers too, and the run stops with PyTorch's "DataLoader
worker killed" error instead -- losing the steps since the last checkpoint, which stays whole.
Send SIGTERM to the main process (as torchrun and ``kill PID`` do) for a clean stop.

Under torchrun every rank checks, after each step, whether any rank has been asked to stop
(``distributed.max_over_ranks``), so all ranks stop after the same step; rank 0 writes last.pt.

Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread) the
default behaviour is left as it is.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a resumable checkpoint (a KeyboardInterrupt, so
    ``except Exception`` does not swallow it)."""

    def __init__(self, signum: int, checkpoint, iteration: int, total: int):
        self.signum, self.checkpoint, self.iteration, self.total = signum, checkpoint, iteration, total
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped after iteration {iteration} of {total} and saved {checkpoint}; "
            f"continue with: fasterrcnn train --resume {checkpoint}"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """A context manager that turns SIGINT/SIGTERM into a flag for the duration of a block.

    with StopRequest() as stop:
        while ...:
            step()
            if stop.requested: save(); break
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_request=None, abort_message=None):
        self.signum: int | None = None
        self.on_request = on_request  # called with the signal number on the first signal (e.g. to log)
        self.abort_message = abort_message  # () -> the message of the second Ctrl-C's KeyboardInterrupt
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.on_request is not None:
                self.on_request(signum)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt(
                self.abort_message()
                if self.abort_message is not None
                else "second Ctrl-C: aborted without saving; the last checkpoint is whole"
            )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
