"""Detections drawn on a copy of their image: a box per detection, its class name and score.

Readable on dark and on light images: each box is a coloured line between two thin dark lines,
each label sits on a filled box of its class colour, its text black or white by the colour's
brightness. Line width and text size follow the image size.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

# Okabe-Ito and tab10-like colours, neighbours far apart (labels 1, 2, 3, 4 are sky blue, green,
# yellow, vermillion), each readable with black or white text on it.
PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (213, 94, 0),
    (0, 114, 178),
    (204, 121, 167),
    (148, 103, 189),
    (188, 189, 34),
    (23, 190, 207),
    (255, 127, 14),
    (44, 160, 44),
]
OUTLINE = (20, 20, 20)


def class_colour(label: int) -> tuple[int, int, int]:
    return PALETTE[int(label) % len(PALETTE)]


def text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_detections(image: Image.Image, boxes, labels, names: list[str], scores=None) -> Image.Image:
    """A copy of ``image`` (RGB) with the detections drawn; boxes [D, 4] xyxy pixels (tensor or list),
    labels [D] (pick the colours), names [D], scores [D] or None. Low scores are drawn first, so
    the best detections lie on top."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    short = min(out.size)
    width = max(2, round(short / 250))
    font = _font(max(10, round(short / 45)))
    boxes = boxes.tolist() if hasattr(boxes, "tolist") else list(boxes)
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    scores = (
        (scores.tolist() if hasattr(scores, "tolist") else list(scores)) if scores is not None else [None] * len(boxes)
    )
    order = sorted(range(len(boxes)), key=lambda i: -1.0 if scores[i] is None else scores[i])
    for i in order:
        x1, y1, x2, y2 = boxes[i]
        colour = class_colour(labels[i])
        draw.rectangle([x1 - width, y1 - width, x2 + width, y2 + width], outline=OUTLINE, width=1)
        draw.rectangle([x1, y1, max(x2, x1), max(y2, y1)], outline=colour, width=width)
        if x2 - x1 > 2 * width and y2 - y1 > 2 * width:  # room for the inner dark line
            draw.rectangle([x1 + width, y1 + width, x2 - width, y2 - width], outline=OUTLINE, width=1)
        text = names[i] if scores[i] is None else f"{names[i]} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(2, width)
        # above the box when there is room, else inside its top edge
        ty = y1 - th - 2 * pad - width if y1 - th - 2 * pad - width >= 0 else y1 + width
        tx = min(max(x1 - width, 0), max(out.width - tw - 2 * pad, 0))
        draw.rectangle([tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad], fill=colour, outline=OUTLINE)
        draw.text((tx + pad - left, ty + pad - top), text, fill=text_colour(colour), font=font)
    return out
