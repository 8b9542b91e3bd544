"""Learning-rate schedule: linear warmup, then multi-step or cosine decay, as a factor of the base lr."""

import math


def lr_factor(
    iteration: int,
    *,
    total: int,
    warmup_iters: int,
    warmup_factor: float,
    schedule: str,
    milestones: list[float],
    gamma: float,
) -> float:
    """Factor for optimizer step ``iteration`` (0-based). Milestones below 1 are fractions of ``total``."""
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        warm = warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    if schedule == "cosine":
        progress = min(iteration / max(total, 1), 1.0)
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    steps = [int(m * total) if m < 1 else int(m) for m in milestones]
    return warm * gamma ** sum(iteration >= s for s in steps)
