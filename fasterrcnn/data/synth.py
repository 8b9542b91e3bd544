"""Synthetic shapes dataset, the project's built-in data, written as real files in standard formats.

``generate(out_dir, ...)`` writes::

    out_dir/train/000001.jpg ...            out_dir/val/...
    out_dir/annotations/instances_train.json   instances_val.json   (COCO)
    out_dir/VOC/{Annotations,JPEGImages,ImageSets/Main/{train,val}.txt}   (with voc=True)
    out_dir/synth.json                         (the parameters; written last)

Each image has a textured, noisy background and 0..``max_objects`` filled shapes (circle, square,
triangle, star, cross, ellipse) of random colour, rotation and size (log-uniform from
``min_object_size`` to ``max_object_size``, default half the short side). The class is the shape;
colour is independent of class. Objects are painted one after another, so later ones may cover
earlier ones: a placement is retried when it would hide more than half of an earlier object's
visible pixels. Each box is the tight extent of the object's *visible* pixels (read back from an
instance map), ``area`` is its visible pixel count, and ``segmentation`` is the outline polygon of
the whole shape. Everything is drawn from ``numpy.random.default_rng((seed, image_id))``, so the
output is identical for a seed; a directory already holding the same parameters is reused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, ImageDraw

from .report import DataError

SHAPES = ("circle", "square", "triangle", "star", "cross", "ellipse")
DEFAULT_CLASSES = ("circle", "square", "triangle", "star")
MANIFEST = "synth.json"
FORMAT_VERSION = 1
MIN_VISIBLE = 0.5  # an earlier object must keep at least this fraction of its pixels visible


def _polygon(kind: str) -> np.ndarray:
    """Unit-radius outline of a shape, [K,2] (x, y), centred on 0."""
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    if kind == "circle":
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "ellipse":
        return np.stack([np.cos(t), 0.5 * np.sin(t)], 1)
    if kind == "square":
        a = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "triangle":
        a = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if kind == "cross":
        w = 0.34
        return np.array(
            [
                (w, -1),
                (w, -w),
                (1, -w),
                (1, w),
                (w, w),
                (w, 1),
                (-w, 1),
                (-w, w),
                (-1, w),
                (-1, -w),
                (-w, -w),
                (-w, -1),
            ],
            float,
        )
    raise ValueError(f"unknown shape {kind!r}; known shapes: {', '.join(SHAPES)}")


_UNIT = {kind: _polygon(kind) for kind in SHAPES}


@dataclass(frozen=True)
class SynthParams:
    num_train: int = 200
    num_val: int = 50
    seed: int = 0
    image_size: tuple[int, int] = (256, 320)  # (H, W)
    classes: tuple[str, ...] = DEFAULT_CLASSES
    voc: bool = False
    min_object_size: int = 12
    max_object_size: int | None = None  # default: half the short side
    max_objects: int = 6
    empty_fraction: float = 0.1
    image_format: str = "jpg"

    def validate(self) -> None:
        h, w = self.image_size
        problems = []
        if self.num_train < 0 or self.num_val < 0:
            problems.append("num_train and num_val must be >= 0")
        if h < 32 or w < 32:
            problems.append(f"image_size must be at least 32x32, got {h}x{w}")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            problems.append(f"classes must be distinct and non-empty, got {list(self.classes)}")
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            problems.append(f"unknown shape(s) {unknown}; known shapes: {', '.join(SHAPES)}")
        if not 4 <= self.min_object_size <= self.max_size <= min(h, w) - 2:
            problems.append(
                f"need 4 <= min_object_size <= max_object_size <= min(H, W) - 2, got "
                f"{self.min_object_size} and {self.max_size}"
            )
        if self.max_objects < 1 or not 0.0 <= self.empty_fraction <= 1.0:
            problems.append("max_objects must be >= 1 and empty_fraction in [0, 1]")
        if self.image_format not in ("jpg", "png"):
            problems.append(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if problems:
            raise DataError("synth: " + "; ".join(problems))

    @property
    def max_size(self) -> int:
        h, w = self.image_size
        return self.max_object_size if self.max_object_size is not None else min(h, w) // 2

    def to_json(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["classes"] = list(self.classes)
        return d


@dataclass(frozen=True)
class SynthPaths:
    root: Path
    train_images: Path
    val_images: Path
    train_json: Path
    val_json: Path
    voc_root: Path | None
    manifest: Path


def _paths(root: Path, voc: bool) -> SynthPaths:
    return SynthPaths(
        root,
        root / "train",
        root / "val",
        root / "annotations" / "instances_train.json",
        root / "annotations" / "instances_val.json",
        root / "VOC" if voc else None,
        root / MANIFEST,
    )


# ---- drawing ------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour field, sometimes with stripes; float32 [H,W,3] in 0..255."""
    gh, gw = rng.integers(2, 9, size=2)
    small = rng.integers(30, 226, size=(gh, gw, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), np.float32)
    if rng.random() < 0.5:
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
        k = np.float32(2 * np.pi / period)
        yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
        wave = np.sin(xx * (np.float32(np.cos(angle)) * k) + yy * (np.float32(np.sin(angle)) * k))
        field = field + wave[:, :, None] * rng.uniform(10, 40, size=3).astype(np.float32)
    return field


def _place(rng, kind: str, size: float, h: int, w: int):
    """Vertices (pixel coordinates) of a randomly rotated shape lying inside the image."""
    a = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = _UNIT[kind] @ rot.T * (size / 2)
    lo, hi = pts.min(0), pts.max(0)
    cx = rng.uniform(-lo[0], (w - 1) - hi[0])
    cy = rng.uniform(-lo[1], (h - 1) - hi[1])
    return pts + np.array([cx, cy])


def _mask(pts: np.ndarray):
    """Binary mask of a polygon within its integer bounding patch: (x0, y0, mask[ph, pw])."""
    x0, y0 = np.floor(pts.min(0)).astype(int)
    x1, y1 = np.ceil(pts.max(0)).astype(int)
    patch = Image.new("L", (x1 - x0 + 1, y1 - y0 + 1), 0)
    ImageDraw.Draw(patch).polygon([(float(x - x0), float(y - y0)) for x, y in pts], fill=1)
    return x0, y0, np.asarray(patch, dtype=bool)


def _colour(rng, under: np.ndarray) -> np.ndarray:
    """A random colour that stands out against the pixels it will cover."""
    ref = under.reshape(-1, 3).mean(0)
    best, best_d = None, -1.0
    for _ in range(8):
        c = rng.integers(0, 256, size=3).astype(np.float32)
        d = float(np.abs(c - ref).sum())
        if d > best_d:
            best, best_d = c, d
        if d >= 150:
            break
    assert best is not None  # the first of the 8 draws is always taken (d >= 0 > -1)
    return best


def draw_image(params: SynthParams, image_id: int, return_instances: bool = False):
    """One image (uint8 [H,W,3]) and its objects ``[(label, [x, y, w, h], area, polygon)]``; with
    ``return_instances`` also the instance map (int32 [H,W], 0 = background, k = k-th object)."""
    h, w = params.image_size
    rng = np.random.default_rng((params.seed, image_id))
    canvas = _background(rng, h, w)
    instance = np.zeros((h, w), np.int32)  # 0 = background, k = object k (1-based)
    objects: list[tuple[int, int, int, np.ndarray, np.ndarray]] = []  # (label, x0, y0, mask, polygon)
    visible = [0]  # visible pixel count per object, index k
    n = 0 if rng.random() < params.empty_fraction else int(rng.integers(1, params.max_objects + 1))
    log_lo, log_hi = math.log(params.min_object_size), math.log(params.max_size)
    for _ in range(n):
        label = int(rng.integers(len(params.classes))) + 1
        kind = params.classes[label - 1]
        size = math.exp(rng.uniform(log_lo, log_hi))
        for _attempt in range(10):
            pts = _place(rng, kind, size, h, w)
            x0, y0, m = _mask(pts)
            region = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
            covered = np.bincount(instance[region][m], minlength=len(visible))
            after = np.array(visible) - covered
            full = [0] + [o[3].sum() for o in objects]
            if m.any() and all(after[k] >= MIN_VISIBLE * full[k] for k in range(1, len(visible))):
                break
        else:
            continue  # no placement keeps the others visible enough: leave this object out
        k = len(visible)
        colour = _colour(rng, canvas[region][m])
        canvas[region][m] = colour
        instance[region][m] = k
        visible = list(after) + [int(m.sum())]
        objects.append((label, x0, y0, m, pts))
    # per-pixel luminance noise over objects and background alike
    canvas += rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(rng.uniform(3, 12))
    image = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)

    anns = []
    for k, (label, x0, y0, m, pts) in enumerate(objects, start=1):
        region = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
        vis = instance[region] == k
        rows, cols = np.flatnonzero(vis.any(1)), np.flatnonzero(vis.any(0))
        box = [int(x0 + cols[0]), int(y0 + rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        polygon = [round(float(v) + 0.5, 2) for v in pts.reshape(-1)]  # pixel centres -> pixel edges
        anns.append((label, box, float(vis.sum()), polygon))
    return (image, anns, instance) if return_instances else (image, anns)


# ---- writing ------------------------------------------------------------------------------------


def _render(job):
    """Draw and save one image (runs in a worker process for large splits)."""
    params, image_id, path = job
    pixels, objs = draw_image(params, image_id)
    img = Image.fromarray(pixels)
    if params.image_format == "jpg":
        img.save(path, quality=95)
    else:
        img.save(path, compress_level=1)
    return objs


def _write_split(params: SynthParams, ids: range, image_dir: Path, json_path: Path, split: str, workers: int):
    image_dir.mkdir(parents=True, exist_ok=True)
    h, w = params.image_size
    names = [f"{image_id:06d}.{params.image_format}" for image_id in ids]
    jobs = [(params, image_id, image_dir / name) for image_id, name in zip(ids, names)]
    if workers > 1 and len(jobs) >= 64:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_render, jobs, chunksize=16))
    else:
        results = [_render(job) for job in jobs]
    images: list[dict] = []
    annotations: list[dict] = []
    for image_id, file_name, objs in zip(ids, names, results):
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for label, box, area, polygon in objs:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": box,
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": [polygon],
                }
            )
    coco = {
        "info": {
            "description": f"fasterrcnn synthetic shapes ({split})",
            "version": str(FORMAT_VERSION),
            "params": params.to_json(),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(params.classes, start=1)
        ],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(coco, f, separators=(",", ":"))
    return coco


def _write_voc(voc_root: Path, split: str, coco: dict, image_dir: Path, classes) -> None:
    """VOC layout for one split: 1-based inclusive boxes (xmin = x + 1, xmax = x + w)."""
    (voc_root / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc_root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (voc_root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    per_image: dict[int, list] = {}
    for a in coco["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    names = []
    for img in coco["images"]:
        name = Path(img["file_name"]).stem
        names.append(name)
        dst = voc_root / "JPEGImages" / img["file_name"]
        if dst.exists():
            dst.unlink()
        try:
            os.link(image_dir / img["file_name"], dst)
        except OSError:
            shutil.copyfile(image_dir / img["file_name"], dst)
        root = ET.Element("annotation")
        ET.SubElement(root, "folder").text = "VOC"
        ET.SubElement(root, "filename").text = img["file_name"]
        size = ET.SubElement(root, "size")
        for tag, v in (("width", img["width"]), ("height", img["height"]), ("depth", 3)):
            ET.SubElement(size, tag).text = str(v)
        ET.SubElement(root, "segmented").text = "0"
        for a in per_image.get(img["id"], []):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = classes[a["category_id"] - 1]
            ET.SubElement(obj, "pose").text = "Unspecified"
            ET.SubElement(obj, "truncated").text = "0"
            ET.SubElement(obj, "difficult").text = "0"
            x, y, w, h = a["bbox"]
            bnd = ET.SubElement(obj, "bndbox")
            for tag, v in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
                ET.SubElement(bnd, tag).text = str(v)
        ET.indent(root)
        ET.ElementTree(root).write(voc_root / "Annotations" / f"{name}.xml", encoding="utf-8")
    (voc_root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def _existing(paths: SynthPaths, params: SynthParams) -> bool:
    """True when ``paths.root`` already holds a complete dataset made with ``params``."""
    try:
        manifest = json.loads(paths.manifest.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params.to_json() or manifest.get("version") != FORMAT_VERSION:
        return False
    needed = [paths.train_json, paths.val_json, paths.train_images, paths.val_images]
    if paths.voc_root is not None:
        needed.append(paths.voc_root / "ImageSets" / "Main" / "train.txt")
    return all(p.exists() for p in needed)


def generate(
    out_dir,
    num_train: int = 200,
    num_val: int = 50,
    seed: int = 0,
    image_size=(256, 320),
    classes=DEFAULT_CLASSES,
    voc: bool = False,
    min_object_size: int = 12,
    max_object_size: int | None = None,
    max_objects: int = 6,
    empty_fraction: float = 0.1,
    image_format: str = "jpg",
    workers: int | None = None,
) -> SynthPaths:
    """Write the synthetic dataset under ``out_dir`` (or reuse it) and return its paths.

    Train images get ids ``1..num_train``, val images the ids after them. A directory that is not
    empty and was not made by ``generate`` is refused; one made with other parameters is replaced.
    ``workers`` processes draw the images (default: up to 8, one per CPU); the output does not
    depend on it.
    """
    params = SynthParams(
        int(num_train),
        int(num_val),
        int(seed),
        cast("tuple[int, int]", tuple(int(v) for v in image_size)),  # (H, W): validate() unpacks it
        tuple(classes),
        bool(voc),
        int(min_object_size),
        None if max_object_size is None else int(max_object_size),
        int(max_objects),
        float(empty_fraction),
        image_format,
    )
    params.validate()
    root = Path(out_dir)
    paths = _paths(root, params.voc)
    if _existing(paths, params):
        return paths
    if root.exists():
        if not root.is_dir():
            raise DataError(f"{root}: exists and is not a directory")
        if any(root.iterdir()) and not paths.manifest.exists():
            raise DataError(
                f"{root}: directory is not empty and was not made by 'fasterrcnn synth'; "
                "refusing to write into it (choose an empty or new directory)"
            )
        paths.manifest.unlink(missing_ok=True)  # made by us with other parameters: start over
        for sub in ("train", "val", "annotations", "VOC"):
            shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    train_ids = range(1, params.num_train + 1)
    val_ids = range(params.num_train + 1, params.num_train + params.num_val + 1)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    train = _write_split(params, train_ids, paths.train_images, paths.train_json, "train", workers)
    val = _write_split(params, val_ids, paths.val_images, paths.val_json, "val", workers)
    if params.voc:
        assert paths.voc_root is not None  # _paths gives it with voc
        _write_voc(paths.voc_root, "train", train, paths.train_images, params.classes)
        _write_voc(paths.voc_root, "val", val, paths.val_images, params.classes)
    paths.manifest.write_text(
        json.dumps(
            {"generator": "fasterrcnn.data.synth", "version": FORMAT_VERSION, "params": params.to_json()}, indent=1
        )
    )
    return paths
