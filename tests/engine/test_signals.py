"""StopRequest: the first signal only asks, a second Ctrl-C aborts, handlers are put back.
(The end-to-end stops of a real run are in test_crash_safety.py.)"""

import os
import signal

import pytest

from fasterrcnn.engine.signals import StopRequest, TrainingInterrupted


def test_first_signal_asks_second_ctrl_c_aborts_and_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    seen = []
    with StopRequest(on_request=seen.append) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT and seen == [signal.SIGINT]
        os.kill(os.getpid(), signal.SIGTERM)  # a SIGTERM while a stop is pending changes nothing
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_first_and_the_exit_codes():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM
    stopped = TrainingInterrupted(signal.SIGTERM, "runs/x/last.pt", 7, 100)
    assert isinstance(stopped, KeyboardInterrupt) and stopped.exit_code == 143
    assert str(stopped) == (
        "SIGTERM: stopped after iteration 7 of 100 and saved runs/x/last.pt; "
        "continue with: fasterrcnn train --resume runs/x/last.pt"
    )
    assert TrainingInterrupted(signal.SIGINT, "l.pt", 1, 2).exit_code == 130


def _rank_sees(rank, init_file, queue):
    import torch.distributed as torch_dist

    from fasterrcnn.engine import distributed as dist

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:  # only rank 1 got the signal; both must decide to stop (and with the same signal)
        queue.put((rank, dist.max_over_ranks(signal.SIGTERM if rank == 1 else 0)))
    finally:
        torch_dist.destroy_process_group()


def test_every_rank_learns_that_one_rank_was_asked_to_stop(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_sees, args=(r, tmp_path / "init", queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(queue.get(timeout=5) for _ in procs) == [(0, signal.SIGTERM), (1, signal.SIGTERM)]
