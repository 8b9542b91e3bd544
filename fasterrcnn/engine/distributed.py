"""Process-group plumbing for ``torchrun``: one process per device, gloo on CPU, NCCL on GPUs.

A plain ``python -m fasterrcnn train`` is a world of one and never touches torch.distributed.
"""

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_kind: str) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...); False when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    # NCCL for the GPU tensors, gloo for the few CPU ones (logged means, the stop flag) on GPUs too
    backend = "cpu:gloo,cuda:nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of numbers over the ranks (for logging)."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t)}


def max_over_ranks(value: int) -> int:
    """The largest of one integer per rank (e.g. a signal number, 0 for none): every rank gets the
    same answer, so that all of them stop at the same iteration."""
    if world_size() == 1:
        return value
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
