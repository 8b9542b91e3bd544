"""Writing a figure: one PNG, replaced atomically, so a kill mid-write leaves the previous picture whole."""

import io
from pathlib import Path

from PIL import Image

from ..files import atomic_open


def save_png(fig, path, *, palette: bool = False) -> Path:
    """``fig`` (a matplotlib Figure) as a PNG at ``path``. ``palette``: 256 colours, a quarter of the
    bytes for figures showing photographs, the same to the eye."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        if palette:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
            image = Image.open(buffer).convert("RGB")
            image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                f, format="PNG", optimize=True
            )
        else:
            fig.savefig(f, format="png")
    return path
