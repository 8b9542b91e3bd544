"""data.batching.child_signal_restored: PyTorch's DataLoader leaves its SIGCHLD handler installed after its
workers are gone; the context puts the previous one back (why: docs/design-decisions.md, issue 15)."""

import signal

import torch
from torch.utils.data import DataLoader

from fasterrcnn.data.batching import child_signal_restored


def test_the_previous_sigchld_handler_is_back_after_a_loader_with_workers(monkeypatch):
    from torch.utils.data._utils import signal_handling

    # a process where no loader has run yet (an earlier test's loader may have installed PyTorch's handler)
    original = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    monkeypatch.setattr(signal_handling, "_SIGCHLD_handler_set", False)
    try:
        _check(signal_handling)
    finally:
        signal.signal(signal.SIGCHLD, original)


def _check(signal_handling):
    before = signal.getsignal(signal.SIGCHLD)
    with child_signal_restored():
        batches = list(DataLoader(list(range(6)), batch_size=2, num_workers=1))
        during = signal.getsignal(signal.SIGCHLD)
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3], [4, 5]]
    assert during is not before, "the loader installed no SIGCHLD handler: nothing is tested"
    assert signal.getsignal(signal.SIGCHLD) is before
    assert signal_handling._SIGCHLD_handler_set is False
    # the next loader installs its handler again and works
    with child_signal_restored():
        assert len(list(DataLoader(torch.arange(4), batch_size=2, num_workers=1))) == 2
    assert signal.getsignal(signal.SIGCHLD) is before
