"""Writing metrics to disk."""
import json
from pathlib import Path


def write_json(path, data) -> Path:
    """``data`` as indented json at ``path`` (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
