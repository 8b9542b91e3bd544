"""Training checkpoints: written atomically, read without unpickling code.

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts): model, optimizer,
scheduler and scaler states, the iteration, the RNG states, the class names and the resolved config.
It is written to a temporary file in the same folder, flushed to disk and renamed over the target,
and the folder is synced (``fasterrcnn.files.atomic_open``), so a crash or a full disk mid-write
leaves the previous file whole. Non-finite weights are never written. It is read back with
``torch.load(weights_only=True)``: a file that would need arbitrary unpickling is refused.
"""

import random
from pathlib import Path
from typing import cast

import numpy as np
import torch

from ..files import atomic_open
from ..model.weights import load_data_only, unsafe_pickle_message


class CheckpointError(ValueError):
    pass


def rng_state() -> dict:
    # the legacy (default) form: (name, keys, pos, has_gauss, cached_gaussian)
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(state_dict: dict) -> bool:
    return all(
        torch.isfinite(v).all() for v in state_dict.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` through ``atomic_open``: ``path`` is either the old file or the new one, never half.

    A KeyboardInterrupt (a second Ctrl-C) inside torch.save's writes surfaces as the zip writer's
    ``RuntimeError`` raised while it unwinds; the interrupt is re-raised instead, so that the run
    aborts as interrupted (the temporary file is removed, the previous file stays whole)."""
    with atomic_open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            interrupt = _interrupt_behind(e)
            if interrupt is None:
                raise
            raise interrupt from None


def _interrupt_behind(error: BaseException | None) -> KeyboardInterrupt | None:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, KeyboardInterrupt):
            return error
        error = error.__cause__ or error.__context__
    return None


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer_slots: int) -> int:
    """The size of a training checkpoint before one exists: every tensor of the model's state_dict,
    plus ``optimizer_slots`` tensors per trainable parameter (SGD momentum: 1, AdamW: 2), plus 1%
    and 1 MB for the config, RNG states and the zip container."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    slot_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int((model_bytes + optimizer_slots * slot_bytes) * 1.01) + 2**20


def save_checkpoint(path: str | Path, state: dict) -> None:
    if not all_finite(state["model"]):
        raise CheckpointError(f"refusing to write {path}: the model has non-finite weights")
    atomic_save(state, path)


TRAINING_KEYS = ("model", "config", "class_names")


def read_file(path: str | Path):
    """Whatever a .pt/.pth file holds, read as data only (weights_only=True)."""
    path = Path(path)
    if path.is_dir():
        inside = path / "last.pt"
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file: give a .pt file"
            + (f", e.g. the run's {inside}" if inside.is_file() else "")
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_data_only(path)
    except Exception as e:
        raise CheckpointError(
            unsafe_pickle_message(path, e)
            or (
                f"cannot read checkpoint {path}: {type(e).__name__}: {e}; it is not a file torch.save wrote, or it is "
                "damaged (cut short): give a run's last.pt or best.pt"
            )
        ) from e


def is_training_state(obj) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in TRAINING_KEYS)


def load_checkpoint(path: str | Path) -> dict:
    state = read_file(path)
    if not is_training_state(state):
        raise CheckpointError(
            f"{path} is not a training checkpoint of this project (expected the entries {', '.join(TRAINING_KEYS)})"
        )
    return state
