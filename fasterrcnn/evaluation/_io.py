"""Writing metrics to disk (atomically: a kill mid-write leaves the previous file whole)."""

import json
from pathlib import Path

from ..files import atomic_write_text


def write_json(path, data) -> Path:
    """``data`` as indented json at ``path`` (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path
