"""Image decoding: any file Pillow reads -> RGB, EXIF orientation applied -> Tensor[3,H,W] in [0,1].

Modes are converted to RGB: L/1/P/PA/LA/RGBA/CMYK/YCbCr/... through Pillow; 16-bit (I;16*, I)
is scaled from 0..65535 to 0..255 (not clipped); float images (F) are clipped to 0..255, and one
with NaN or infinite pixels raises ``DataError`` (counted skips in predict and check-data). Alpha is
dropped. A missing, unreadable or truncated file raises ``DataError`` naming the file; Pillow's
global ``LOAD_TRUNCATED_IMAGES`` is left alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .report import DataError

_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _fail(path, reason: str) -> DataError:
    return DataError(f"{path}: {reason}")


def load_image(path) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image with its EXIF orientation applied."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "image file not found" if not path.exists() else "not a regular file")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncation is detected here, naming the file
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, path)
    except DataError:
        raise
    except Image.UnidentifiedImageError:
        raise _fail(path, "cannot identify image file (not an image, or corrupt)") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, EOFError, ValueError ... on bad data
        raise _fail(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def _to_rgb(img: Image.Image, path) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.int64)
        a = np.clip(a, 0, 65535)
        a8 = ((a * 255 + 32767) // 65535).astype(np.uint8)  # 65535 -> 255, rounded
        return Image.fromarray(np.repeat(a8[:, :, None], 3, axis=2), "RGB")
    if mode == "F":
        a = np.asarray(img)
        bad = int((~np.isfinite(a)).sum())
        if bad:  # no pixel value to give them: a named image problem, not an arbitrary cast
            raise _fail(path, f"{bad} of its {a.size} pixel values are NaN or infinite")
        a8 = np.clip(a, 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(a8[:, :, None], 3, axis=2), "RGB")
    try:
        if mode in ("P", "PA") and ("transparency" in img.info or mode == "PA"):
            img = img.convert("RGBA")  # palette transparency goes through RGBA (Pillow asks for it)
        return img.convert("RGB")
    except Exception as e:
        raise _fail(path, f"unsupported image mode {mode!r} ({e})") from None


DEGENERATE_SIZE = "degenerate image size"
MIN_IMAGE_SIDE = 2  # pixels
MAX_ASPECT_RATIO = 100  # long side / short side


def degenerate_size(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` is no training or evaluation image, or None: a side under
    ``MIN_IMAGE_SIDE`` pixels, or a long side over ``MAX_ASPECT_RATIO`` times the short one (the model's
    resize leaves such a sliver a few pixels across at most, under one cell of the coarsest feature map;
    the model runs on it, resized to at least one pixel per side, but there is nothing to learn there)."""
    short, long = min(width, height), max(width, height)
    if short < MIN_IMAGE_SIDE:
        return f"{width}x{height} (width x height): a side under {MIN_IMAGE_SIDE} pixels"
    if long > MAX_ASPECT_RATIO * short:
        return (
            f"{width}x{height} (width x height): one side is {long / short:.0f} times the other "
            f"(more than {MAX_ASPECT_RATIO})"
        )
    return None


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 Tensor[3,H,W] in [0,1] (a new tensor, owning its memory)."""
    if img.mode != "RGB":
        img = _to_rgb(img, "<image>")
    a = np.array(img, dtype=np.uint8, copy=True)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous().float().div_(255.0)


def read_image(path) -> torch.Tensor:
    """``load_image`` then ``image_to_tensor``."""
    return image_to_tensor(load_image(path))


def image_size(path) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, from the header only (no decoding)."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "image file not found" if not path.exists() else "not a regular file")
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Image.UnidentifiedImageError:
        raise _fail(path, "cannot identify image file (not an image, or corrupt)") from None
    except Exception as e:
        raise _fail(path, f"cannot read image header ({type(e).__name__}: {e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def exif_orientation(path) -> int:
    """The EXIF orientation tag (1 when absent or unreadable)."""
    try:
        with Image.open(path) as img:
            return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1


def check_image(path, expected_size: tuple[int, int] | None = None) -> tuple[str, str] | None:
    """Decode ``path`` fully; ``None`` if fine, else ``(kind, detail)`` of the problem.

    Kinds: ``"missing image"``, ``"corrupt image"``, ``"image size mismatch"``.
    """
    path = Path(path)
    if not path.exists():
        return "missing image", f"image file not found: {path}"
    try:
        img = load_image(path)
    except DataError as e:
        return "corrupt image", str(e)
    if expected_size is not None and img.size != tuple(expected_size):
        return "image size mismatch", size_mismatch_detail(path, expected_size, img.size)
    return None


def size_mismatch_detail(path, expected: tuple[int, int], decoded: tuple[int, int]) -> str:
    detail = (
        f"{path}: decoded image is {decoded[0]}x{decoded[1]} (width x height) but the annotation "
        f"says {expected[0]}x{expected[1]}"
    )
    if tuple(decoded) == (expected[1], expected[0]) and exif_orientation(path) != 1:
        detail += " (the file has an EXIF orientation tag; the annotation size is the unrotated one)"
    return detail
