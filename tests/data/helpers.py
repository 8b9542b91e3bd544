"""Small files for the data tests: images, COCO json, VOC layouts (all tiny, all in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_image(
    path: Path,
    width: int = 40,
    height: int = 30,
    mode: str = "RGB",
    seed: int = 0,
    fmt: str | None = None,
    **save_kwargs,
) -> Path:
    """Write a random image of ``width`` x ``height`` in ``mode``."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "RGB":
        img = rgb
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        img = rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save_kwargs)
    return path


def coco_json(images, annotations, categories=None) -> dict:
    if categories is None:
        categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def simple_coco(root: Path, annotations=None, images=None, size=(40, 30), categories=None) -> Path:
    """``root/images/1.png`` (and 2.png) plus ``root/ann.json``; returns the json path."""
    w, h = size
    if images is None:
        images = [
            {"id": 1, "file_name": "1.png", "width": w, "height": h},
            {"id": 2, "file_name": "2.png", "width": w, "height": h},
        ]
    for img in images:
        name = img.get("file_name")
        iw, ih = img.get("width", w), img.get("height", h)
        if isinstance(name, str) and "/" not in name and name.endswith(".png"):
            ok = all(isinstance(v, int) and v > 0 for v in (iw, ih))
            make_image(root / "images" / name, iw if ok else w, ih if ok else h)
    if annotations is None:
        annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5], "iscrowd": 0}]
    return write_json(root / "ann.json", coco_json(images, annotations, categories))


def voc_xml(filename: str, width: int, height: int, objects) -> str:
    """``objects``: ``(name, xmin, ymin, xmax, ymax, difficult)``."""
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, x1, y1, x2, y2, d in objects
    )
    return (
        f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{objs}</annotation>"
    )


def make_voc(root: Path, items: dict, split: str = "train", size=(40, 30)) -> Path:
    """``items``: ``{name: [objects]}``; writes JPEGImages, Annotations and the split file."""
    w, h = size
    for name, objects in items.items():
        make_image(root / "JPEGImages" / f"{name}.jpg", w, h)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(voc_xml(f"{name}.jpg", w, h, objects))
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (main / f"{split}.txt").write_text("".join(f"{n}\n" for n in items))
    return root
