"""Validation images with their ground truth and the model's predictions, in two styles, tiled into one picture.

    tile = draw_truth_and_predictions(image, gt_boxes=..., gt_labels=..., det_boxes=..., det_labels=...,
                                      det_scores=..., class_names=names)
    save_grid([(tile, "worst 1: id 1203, 2 missed, 1 false")], "val_predictions.jpg")

Ground truth: dashed boxes in white over a dark line (readable on any background), the class name in
small text under the box's top-left corner. Predictions: the drawing ``fasterrcnn predict`` makes (a solid
box in the class colour, a filled label with name and score). A box of each kind on the same object
shows a hit; a dashed box alone is a miss, a solid box alone a false detection.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from PIL import Image, ImageDraw

from ..files import atomic_open
from .detections import _font, draw_detections

GT_LINE = (255, 255, 255)
GT_SHADOW = (20, 20, 20)


def _dashed_line(draw: ImageDraw.ImageDraw, start, end, *, fill, width: int, dash: int) -> None:
    (x0, y0), (x1, y1) = start, end
    length = max(abs(x1 - x0), abs(y1 - y0))
    if length == 0:
        return
    steps = int(length // dash) + 1
    for i in range(0, steps, 2):
        a, b = i * dash / length, min((i + 1) * dash / length, 1.0)
        draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)], fill, width)


def _dashed_box(draw: ImageDraw.ImageDraw, box, *, width: int) -> None:
    x1, y1, x2, y2 = box
    corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)]
    for colour, w in ((GT_SHADOW, width + 2), (GT_LINE, width)):
        for start, end in itertools.pairwise(corners):
            _dashed_line(draw, start, end, fill=colour, width=w, dash=max(4, 3 * width))


def _name(class_names: list[str], label) -> str:
    label = int(label)
    return class_names[label] if 0 <= label < len(class_names) else f"class_{label}"


def draw_truth_and_predictions(
    image: Image.Image, *, gt_boxes, gt_labels, det_boxes, det_labels, det_scores, class_names: list[str]
) -> Image.Image:
    """A copy of ``image`` with the ground truth dashed and the predictions solid (see the module docstring);
    boxes [N, 4] xyxy pixels (tensors or lists), labels index ``class_names`` (background first)."""
    names = [_name(class_names, k) for k in det_labels]
    out = draw_detections(image, det_boxes, det_labels, names, det_scores)
    draw = ImageDraw.Draw(out)
    short = min(out.size)
    width = max(1, round(short / 300))
    font = _font(max(9, round(short / 55)))
    boxes = gt_boxes.tolist() if hasattr(gt_boxes, "tolist") else list(gt_boxes)
    labels = gt_labels.tolist() if hasattr(gt_labels, "tolist") else list(gt_labels)
    for box, label in zip(boxes, labels):
        _dashed_box(draw, box, width=width)
        name = _name(class_names, label)
        x, y = box[0] + width + 2, box[1] + width + 1
        draw.text((x, y), name, fill=GT_LINE, font=font, stroke_width=1, stroke_fill=GT_SHADOW)
    return out


def save_grid(
    tiles: list[tuple[Image.Image, str]], path: str | Path, *, columns: int = 4, tile_size: int = 360, quality: int = 88
) -> Path:
    """``tiles`` (image, caption) scaled to fit ``tile_size`` squares, ``columns`` per row, each captioned
    above, into one JPEG at ``path`` (replaced atomically). Captions starting with "worst" are drawn in red."""
    if not tiles:
        raise ValueError("save_grid: no tiles")
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    caption_h = 22
    font = _font(13)
    grid = Image.new("RGB", (columns * tile_size, rows * (tile_size + caption_h)), (245, 245, 245))
    draw = ImageDraw.Draw(grid)
    for i, (tile, caption) in enumerate(tiles):
        r, c = divmod(i, columns)
        x0, y0 = c * tile_size, r * (tile_size + caption_h)
        scale = min((tile_size - 4) / tile.width, (tile_size - 4) / tile.height)
        size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
        shown = tile.resize(size, Image.Resampling.BILINEAR)
        grid.paste(shown, (x0 + (tile_size - shown.width) // 2, y0 + caption_h + (tile_size - shown.height) // 2))
        colour = (170, 20, 20) if caption.startswith("worst") else (30, 30, 30)
        draw.text((x0 + 4, y0 + 4), caption, fill=colour, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        grid.save(f, format="JPEG", quality=quality)
    return path
