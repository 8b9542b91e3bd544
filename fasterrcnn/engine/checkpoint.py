"""Training checkpoints: written atomically, read without unpickling code.

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts): model, optimizer,
scheduler and scaler states, the iteration, the RNG states, the class names and the resolved config.
It is written to a temporary file in the same folder, flushed to disk and renamed over the target,
so a crash mid-write leaves the previous file whole. Non-finite weights are never written.
"""
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    pass


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(state_dict: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def atomic_save(obj, path: str | Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | Path, state: dict) -> None:
    if not all_finite(state["model"]):
        raise CheckpointError(f"refusing to write {path}: the model has non-finite weights")
    atomic_save(state, path)


TRAINING_KEYS = ("model", "config", "class_names")


def read_file(path: str | Path):
    """Whatever a .pt/.pth file holds, read as data only (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def is_training_state(obj) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in TRAINING_KEYS)


def load_checkpoint(path: str | Path) -> dict:
    state = read_file(path)
    if not is_training_state(state):
        raise CheckpointError(f"{path} is not a training checkpoint of this project "
                              f"(expected the entries {', '.join(TRAINING_KEYS)})")
    return state
