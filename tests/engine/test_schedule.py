import math

import pytest

from fasterrcnn.engine.schedule import lr_factor

BASE = dict(total=100, warmup_iters=10, warmup_factor=0.001, gamma=0.1)


def test_linear_warmup_then_multistep():
    f = lambda it: lr_factor(it, schedule="multistep", milestones=[0.5, 0.8], **BASE)  # noqa: E731
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)  # halfway through the warmup
    assert f(10) == 1.0 and f(49) == 1.0
    assert f(50) == pytest.approx(0.1) and f(79) == pytest.approx(0.1)
    assert f(80) == pytest.approx(0.01)
    # milestones >= 1 are iterations
    assert lr_factor(30, schedule="multistep", milestones=[30], **BASE) == pytest.approx(0.1)


def test_cosine():
    f = lambda it: lr_factor(it, schedule="cosine", milestones=[], **BASE)  # noqa: E731
    assert f(50) == pytest.approx(0.5)
    assert f(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert f(0) == pytest.approx(0.001)  # warmup multiplies the cosine
