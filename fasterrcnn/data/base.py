"""What the COCO and VOC readers share: parsed image records -> ``(image, target)`` items.

A reader parses its annotation files once, up front, into ``ImageRecord``s (no image is decoded
for that); this class then serves items, aspect ratios and the problem report.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import DEGENERATE_SIZE, check_image, degenerate_size, image_size, read_image, size_mismatch_detail
from .report import SKIPPED_IMAGE, DataError, Report, where

ON_BAD_IMAGE = ("error", "skip")
PROGRESS_EVERY_S = 10.0  # seconds between progress lines when stderr is not a terminal


def progress_lines(items: list, desc: str, *, every_s: float = PROGRESS_EVERY_S, stream=None):
    """Iterate ``items`` showing progress on stderr: a bar on a terminal; otherwise (a log file, a
    pipe, a batch job) a plain line every ``every_s`` seconds and one at the end, so that a long
    check is never silent."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        yield from tqdm(items, desc=desc, unit="img", leave=False, file=stream)
        return
    start = last = time.monotonic()
    total = len(items)
    for i, item in enumerate(items):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            print(
                f"{desc}: {i + 1}/{total} ({100 * (i + 1) // max(total, 1)}%), {now - start:.0f} s",
                file=stream,
                flush=True,
            )
    if last != start or time.monotonic() - start >= every_s:
        print(f"{desc}: {total}/{total} done, {time.monotonic() - start:.0f} s", file=stream, flush=True)


@dataclass
class ImageRecord:
    """One image and its objects, as parsed from the annotation file.

    ``boxes`` float32 [N,4] xyxy 0-based pixels; ``labels`` int64 [N] in 1..C; ``area`` float32 [N];
    ``iscrowd`` int64 [N]; ``difficult`` bool [N] (VOC only, else None). ``source`` is the annotation
    file and ``record`` names the image inside it, for messages. ``path`` is a str (COCO: no Path
    object per image while loading) or a Path.
    """

    image_id: int
    path: Path | str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    area: np.ndarray
    iscrowd: np.ndarray
    difficult: np.ndarray | None
    source: str
    record: str


def empty_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.zeros((0, 4), np.float32),
        np.zeros((0,), np.int64),
        np.zeros((0,), np.float32),
        np.zeros((0,), np.int64),
    )


class DetectionDataset(Dataset):
    """Base class: subclasses call ``_start``, set ``class_names``, parse, then call ``_finish``."""

    class_names: list[str]
    report: Report

    def _start(self, on_bad_image: str, source) -> None:
        """Call first: checks the option and opens the report."""
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        self.report = Report(source=str(source))

    def _header_size(self, path: Path, source, record: str, field_name: str) -> tuple[int, int] | None:
        """Image size from the file header, for annotations that omit it. An unreadable file raises
        (``on_bad_image="error"``) or is reported as a skipped image (``"skip"``: returns None)."""
        try:
            return image_size(path)
        except DataError as e:
            if self.on_bad_image == "skip":
                kind = "missing image" if not path.exists() else "corrupt image"
                self.report.add(SKIPPED_IMAGE, kind, source, record, field_name, f"size missing, and {e}")
                return None
            raise DataError(f"{where(source, record, field_name)}: missing, and {e}") from None

    def _finish(self, records: list[ImageRecord], transforms, drop_empty: bool):
        self.transforms = transforms
        records = self._drop_degenerate(records)
        if self.on_bad_image == "skip":
            records = self._drop_bad_images(records)
        if drop_empty:
            records = [r for r in records if len(r.boxes) > 0 and not r.iscrowd.all()]
        self.records = records

    def _drop_degenerate(self, records: list[ImageRecord]) -> list[ImageRecord]:
        """Images of a degenerate size (``images.degenerate_size``, from the annotated size) are skipped
        and reported, whatever ``on_bad_image`` says: they can be read, there is just nothing to learn
        or score in them. Training and ``check-data`` both see them in the report."""
        kept = []
        for r in records:
            problem = degenerate_size(r.width, r.height)
            if problem is None:
                kept.append(r)
            else:
                self.report.add(
                    SKIPPED_IMAGE, DEGENERATE_SIZE, r.source, r.record, "width/height", f"{r.path}: {problem}"
                )
        return kept

    def _drop_bad_images(self, records: list[ImageRecord]) -> list[ImageRecord]:
        kept = []
        for r in progress_lines(records, "checking images"):
            problem = check_image(r.path, (r.width, r.height))
            if problem is None:
                kept.append(r)
            else:
                kind, detail = problem
                self.report.add(SKIPPED_IMAGE, kind, r.source, r.record, "file_name", detail)
        return kept

    # ---- the dataset protocol -------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """C, the number of object classes (background excluded)."""
        return len(self.class_names) - 1

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> list[float]:
        """width / height of every image, from the annotation files (no decoding)."""
        return [r.width / r.height for r in self.records]

    def target(self, index: int) -> dict:
        """The target of item ``index`` without decoding its image (fresh tensors every call)."""
        r = self.records[index]
        t = {
            "boxes": torch.tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(r.labels, dtype=torch.int64),
            "image_id": torch.tensor(r.image_id, dtype=torch.int64),
            "area": torch.tensor(r.area, dtype=torch.float32),
            "iscrowd": torch.tensor(r.iscrowd, dtype=torch.int64),
        }
        if r.difficult is not None:
            t["difficult"] = torch.tensor(r.difficult, dtype=torch.bool)
        return t

    def load_image(self, index: int) -> torch.Tensor:
        """Decode image ``index``; a missing/corrupt file or a size that differs from the annotation's
        raises ``DataError`` naming the annotation file, the record and the image file."""
        r = self.records[index]
        try:
            image = read_image(r.path)
        except DataError as e:
            raise DataError(f"{where(r.source, r.record, 'file_name')}: {e}") from None
        h, w = image.shape[-2:]
        if (w, h) != (r.width, r.height):
            detail = size_mismatch_detail(r.path, (r.width, r.height), (w, h))
            raise DataError(f"{where(r.source, r.record, 'width/height')}: {detail}")
        return image

    def __getitem__(self, index: int):
        image, target = self.load_image(index), self.target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, {len(self.report)} problems)"
