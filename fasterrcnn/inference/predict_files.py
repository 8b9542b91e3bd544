"""``fasterrcnn predict``: a detector over image files, folders and globs.

Writes, under the output folder:
    predictions.json     COCO results: {image_id, category_id, bbox [x, y, w, h], score} per detection
    images.json          the images predicted: {id, file_name, width, height} (COCO "images" records),
                         and the categories, so the results can be scored once boxes are drawn
    images/<name>        a copy of each image with its detections drawn (unless draw=False)
Image ids are those of a COCO ground truth when one is given (matched by file name), else 1..N
in the order the files were found. A symlink is an image under its own name (never its target's):
two links to one file are two images. Images are decoded by background workers and handed to the
model in batches; results and records are streamed to temporary files, renamed into place at the
end, so memory stays flat over any number of images and no half-written json is ever left.
An image that cannot be read or used (a side of 0 pixels, NaN pixels) is skipped, counted and
reported by name. A run that stops early (Ctrl-C, an error) still writes the results it has, and
images.json then says ``"partial": true`` (``false`` for a whole run). Drawings a previous run left
in ``images/`` (those its images.json lists) are removed first, so the folder shows this run only.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data.batching import child_signal_restored
from ..data.images import load_image
from ..data.report import DataError
from ..engine.progress import Progress
from ..files import open_temp
from ..viz.detections import draw_detections
from .detector import Detector, to_image_tensor

log = logging.getLogger("fasterrcnn")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def collect_images(
    sources: list[str], *, recursive: bool = False, suffixes: tuple[str, ...] = IMAGE_SUFFIXES
) -> list[Path]:
    """Files named, image files inside folders (sorted; with ``recursive``, sub-folders too) and
    matches of glob patterns (``**`` allowed), in the order given, each once. ``suffixes``: what counts
    as an image file in a folder or a pattern (predict passes the video suffixes too)."""
    what = "image" if suffixes == IMAGE_SUFFIXES else "image or video"
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in suffixes)
            if not files:
                raise DataError(
                    f"{source}: no {what} files in this folder ({', '.join(suffixes)})"
                    + ("" if recursive else "; add --recursive to look in sub-folders")
                )
        elif path.is_file():
            files = [path]
        elif glob.has_magic(source):
            files = sorted(
                Path(p)
                for p in glob.glob(source, recursive=True)
                if os.path.isfile(p) and Path(p).suffix.lower() in suffixes
            )
            if not files:
                raise DataError(f"{source}: the pattern matches no {what} file")
        else:
            raise DataError(f"{source}: no such file or folder")
        found.extend(files)
    # absolute, but links not followed: a link keeps its own name, and two links to one file are two images
    return list(dict.fromkeys(Path(os.path.abspath(p)) for p in found))


def output_names(paths: list[Path]) -> list[str]:
    """Each image's name relative to the images' common folder: unique, and short."""
    if len(paths) == 1:
        return [paths[0].name]
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.relative_to(root).as_posix() for p in paths]


def ids_from_annotations(ann_file: str | os.PathLike, names: list[str], paths: list[Path]) -> list[int]:
    """The COCO image id of each image, matched by its ``file_name`` (full relative name, else base name)."""
    try:
        records = json.loads(Path(ann_file).read_text())["images"]
        by_name = {str(r["file_name"]): int(r["id"]) for r in records}
    except FileNotFoundError:
        raise DataError(f"{ann_file}: annotation file not found") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{ann_file}: not a COCO json with images[].id and images[].file_name ({e})") from None
    by_base: dict[str, list[int]] = {}
    for name, i in by_name.items():
        by_base.setdefault(Path(name).name, []).append(i)
    ids, missing = [], []
    for name, path in zip(names, paths):
        if name in by_name:
            ids.append(by_name[name])
        elif len(by_base.get(path.name, [])) == 1:
            ids.append(by_base[path.name][0])
        else:
            missing.append(name)
    if missing:
        raise DataError(
            f"{ann_file}: no unique images[].file_name for {len(missing)} of the images: "
            + ", ".join(missing[:5])
            + (" ..." if len(missing) > 5 else "")
        )
    return ids


class JsonArrayWriter:
    """A json array written one item at a time into a temporary file, renamed over ``path`` by
    ``close()``; ``abort()`` (or an exception inside ``with``) removes it and leaves ``path`` as it was."""

    def __init__(self, path: Path, *, prefix: str = "[", suffix: str = "]"):
        self.path, self.suffix, self.count = path, suffix, 0
        self.file, self.tmp = open_temp(path, "w", encoding="utf-8")  # the mode a plain open() gives (umask)
        self.file.write(prefix + "\n")

    def write(self, item) -> None:
        self.file.write((",\n" if self.count else "") + json.dumps(item))
        self.count += 1

    def close(self, suffix: str | None = None) -> None:
        self.file.write("\n" + (self.suffix if suffix is None else suffix) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self) -> JsonArrayWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _ImageFiles(Dataset):
    """Decodes image files in the loader's workers: (index, Tensor[3, H, W] or None, error text)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, to_image_tensor(load_image(self.paths[i]), name=str(self.paths[i])), None
        except (DataError, ValueError) as e:  # unreadable, or no image the model can use: named
            return i, None, str(e)


def _collate(items):
    return items


@dataclass
class PredictSummary:
    out_dir: Path
    num_images: int
    num_detections: int
    skipped: list[str] = field(default_factory=list)  # "path: reason" per image that could not be read
    seconds: float = 0.0
    num_requested: int = 0  # images asked for: more than num_images + skipped only in a partial run
    partial: bool = False


def predict_files(
    detector: Detector,
    paths: list[Path],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 1,
    workers: int = 1,
    draw: bool = True,
    ann_file: str | None = None,
    show_progress: bool = True,
) -> PredictSummary:
    import time

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    ids = ids_from_annotations(ann_file, names, paths) if ann_file else list(range(1, len(paths) + 1))
    loader = DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    skipped = []
    progress = Progress(
        total=len(paths), desc="predict", unit="img", enabled=show_progress, every=max(1, len(paths) // 20)
    )
    categories = detector.categories()
    remove_previous_drawings(out_dir)
    # images.json is {"categories": [...], "images": [...], "partial": ...}, its images streamed like the results
    images_head = '{"categories": ' + json.dumps(categories) + ', "images": ['
    results = JsonArrayWriter(out_dir / "predictions.json")
    records = JsonArrayWriter(out_dir / "images.json", prefix=images_head, suffix='], "partial": false}')
    done = 0
    try:
        with child_signal_restored():  # the loader's workers are done when it is
            for batch in loader:
                good = [(i, t) for i, t, _ in batch if t is not None]
                skipped += [err for _, t, err in batch if t is None]
                found = detector.detect([t for _, t in good])
                for (i, tensor), dets in zip(good, found):
                    for record in dets.to_coco(ids[i], detector.label_to_cat_id):
                        results.write(record)
                    records.write(
                        {
                            "id": ids[i],
                            "file_name": names[i],
                            "width": int(tensor.shape[2]),
                            "height": int(tensor.shape[1]),
                        }
                    )
                    if draw:
                        _write_drawing(tensor, dets, out_dir / "images" / names[i])
                done += len(batch)
                progress.update(len(batch), detections=results.count)
    except BaseException as e:  # Ctrl-C or a failure: keep what is done, marked partial, then stop as asked
        progress.close()
        results.close()
        records.close(suffix='], "partial": true}')
        log.warning(
            "predict stopped after %d of %d images (%s): the results for %d images are in %s and %s, "
            'which says "partial": true',
            done,
            len(paths),
            type(e).__name__,
            records.count,
            results.path,
            records.path,
        )
        raise
    results.close()
    records.close()
    progress.close()
    for err in skipped:
        log.warning("skipped %s", err)
    return PredictSummary(
        out_dir, records.count, results.count, skipped, time.perf_counter() - start, num_requested=len(paths)
    )


def remove_previous_drawings(out_dir: Path) -> list[Path]:
    """Delete the drawings an earlier run wrote in ``out_dir/images`` (the images its images.json lists,
    under the name ``_write_drawing`` gives them); other files there are left alone."""
    try:
        previous = json.loads((out_dir / "images.json").read_text(encoding="utf-8"))["images"]
        names = [str(r["file_name"]) for r in previous]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    base = os.path.abspath(out_dir / "images")
    removed = []
    for name in names:
        path = Path(os.path.normpath(os.path.join(base, name)))
        if os.path.commonpath([base, str(path)]) != base:
            continue  # not ours to delete
        for candidate in (drawing_path(path),):
            if candidate.is_file():
                candidate.unlink()
                removed.append(candidate)
    return removed


def drawing_path(path: Path) -> Path:
    """Where the drawing of an image named ``path`` goes: the same name, or .png for other formats."""
    return path if path.suffix.lower() in (".jpg", ".jpeg", ".png") else path.with_suffix(".png")


def _write_drawing(tensor: torch.Tensor, dets, path: Path) -> None:
    image = Image.fromarray(tensor.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    drawn = draw_detections(image, dets.boxes, dets.labels, dets.names, dets.scores)
    path.parent.mkdir(parents=True, exist_ok=True)
    path = drawing_path(path)  # a lossless copy for other formats (tiff, bmp, ...)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        drawn.save(path, quality=92)
    else:
        drawn.save(path)
