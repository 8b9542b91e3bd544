"""Checks shared by the readers: one box against its image, one file name against its root."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from .report import DataError, where

# Problem kinds (stable strings, used for counting in reports and documented in docs/data.md).
NON_FINITE = "non-finite box"
NEGATIVE_SIZE = "negative box size"
ZERO_SIZE = "zero-size box"
OUTSIDE = "box outside image"
CLIPPED = "box clipped to image"
MALFORMED_BOX = "malformed box"


@dataclass(frozen=True)
class BoxCheck:
    """Outcome of ``check_box``: ``box`` is None when the box must be skipped; ``kind`` is None when
    the box was fine, else the problem kind (``CLIPPED`` comes with the clipped box)."""

    box: tuple[float, float, float, float] | None
    kind: str | None = None
    detail: str = ""


def check_box(x1, y1, x2, y2, width: int, height: int) -> BoxCheck:
    """Validate an xyxy box (0-based pixel edges) against an image of ``width`` x ``height``.

    NaN/inf, negative or zero width/height and boxes wholly outside the image are skipped; boxes
    partly outside are clipped (a reported fix).
    """
    values = (x1, y1, x2, y2)
    text = "[" + ", ".join(f"{v:g}" for v in values) + "]"
    if not all(math.isfinite(v) for v in values):
        return BoxCheck(None, NON_FINITE, f"box {text} has NaN or infinite coordinates")
    w, h = x2 - x1, y2 - y1
    if w < 0 or h < 0:
        return BoxCheck(None, NEGATIVE_SIZE, f"box {text} has negative size ({w:g} x {h:g})")
    if w == 0 or h == 0:
        return BoxCheck(None, ZERO_SIZE, f"box {text} has zero size ({w:g} x {h:g})")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return BoxCheck(None, OUTSIDE, f"box {text} lies wholly outside the {width}x{height} image")
    c = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
    if c != (x1, y1, x2, y2):
        clipped = "[" + ", ".join(f"{v:g}" for v in c) + "]"
        return BoxCheck(c, CLIPPED, f"box {text} extends outside the {width}x{height} image; clipped to {clipped}")
    return BoxCheck((float(x1), float(y1), float(x2), float(y2)))


def boxes_needing_checks(x1, y1, x2, y2, width, height):
    """The rows of xyxy float64 arrays (images ``width`` x ``height``, arrays too) that ``check_box``
    would not pass through unchanged: non-finite, zero or negative size, outside or to be clipped.
    The same comparisons as ``check_box``, on whole arrays; those rows go through ``check_box`` itself
    for the outcome and its message."""
    import numpy as np

    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(x1) & np.isfinite(y1) & np.isfinite(x2) & np.isfinite(y2)
        ok = finite & (x2 - x1 > 0) & (y2 - y1 > 0) & (x1 >= 0) & (y1 >= 0) & (x2 <= width) & (y2 <= height)
    return ~ok


def inside_resolver(root: Path):
    """``resolve_inside`` for many names under one ``root``: ``fn(name, file, record, field_name)`` -> the
    path as a str (no Path object each: 150k of them cost a second). A plain relative name (no ``..``)
    is joined directly; anything else takes ``resolve_inside``'s path."""
    base = os.path.normpath(os.path.abspath(root))
    sep = os.sep

    def resolve(name, file, record: str, field_name: str) -> str:
        if (
            type(name) is str
            and name
            and not name.startswith(("/", sep))
            and ".." not in name
            and not os.path.isabs(name)
        ):
            full = base + sep + name
            if sep == "/" and "/." not in "/" + name and "//" not in name and not name.endswith("/"):
                return full  # normal already: what normpath would return
            return os.path.normpath(full)
        return str(resolve_inside(root, name, file, record, field_name))

    return resolve


def resolve_inside(root: Path, name: str, file, record: str, field_name: str) -> Path:
    """``root / name``, refusing names that are absolute or escape ``root`` (``../``).

    The check is lexical (symlinks inside the root are allowed to point elsewhere).
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"{where(file, record, field_name)}: expected a non-empty string, got {name!r}")
    if os.path.isabs(name) or Path(name).is_absolute():
        raise DataError(
            f"{where(file, record, field_name)}: {name!r} is an absolute path; "
            f"expected a path relative to the image root {root}"
        )
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, name))
    if os.path.commonpath([base, full]) != base:
        raise DataError(f"{where(file, record, field_name)}: {name!r} escapes the image root {root}")
    return Path(full)


def is_int(value) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
