"""``check_dataset``: read a COCO json or a VOC root as training would, decode every image, and
summarise: objects and images per class, COCO size histogram, images without objects, problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .coco import CocoDetection
from .report import DataError, Report, format_table
from .voc import VOC_CLASSES, VocDetection, scan_class_names

SMALL, MEDIUM = 32**2, 96**2  # COCO: small < 32^2 <= medium < 96^2 <= large (area in pixels)
SIZE_NAMES = ("small", "medium", "large")
MAX_LISTED_EMPTY = 50


def size_bucket(area: float) -> str:
    return "small" if area < SMALL else "medium" if area < MEDIUM else "large"


@dataclass
class DataCheck:
    """What ``check_dataset`` found. ``print(check)`` gives readable tables."""

    source: str
    format: str
    class_names: list[str]
    num_images: int
    per_class: dict[str, dict[str, int]]
    sizes: dict[str, int]
    empty_images: list[str]
    report: Report
    notes: list[str] = field(default_factory=list)
    extra_column: str = ""  # "crowd" (COCO) or "difficult" (VOC)

    @property
    def num_objects(self) -> int:
        return sum(c["objects"] for c in self.per_class.values())

    @property
    def ok(self) -> bool:
        return len(self.report) == 0

    def __str__(self) -> str:
        lines = [f"{self.format} dataset {self.source}"]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(
            f"images: {self.num_images}  objects: {self.num_objects}  "
            f"classes: {len(self.class_names) - 1}  images without objects: {len(self.empty_images)}"
        )
        lines.append("")
        cols = ("objects", "images", *SIZE_NAMES) + ((self.extra_column,) if self.extra_column else ())
        rows = [(name, *(c[k] for k in cols)) for name, c in self.per_class.items()]
        sums = tuple(sum(c[k] for c in self.per_class.values()) for k in cols if k != "images")
        total = ("total", sums[0], "", *sums[1:])
        lines.append(format_table(("class", *cols), [*rows, total]))
        lines.append("")
        lines.append(
            "box sizes (COCO, by box area): "
            + ", ".join(f"{k} {self.sizes[k]}" for k in SIZE_NAMES)
            + "  (small < 32^2 <= medium < 96^2 <= large)"
        )
        if self.empty_images:
            shown = self.empty_images[:MAX_LISTED_EMPTY]
            more = len(self.empty_images) - len(shown)
            lines.append(
                f"images without objects ({len(self.empty_images)}): "
                + ", ".join(shown)
                + (f", ... and {more} more" if more else "")
            )
        lines.append("")
        lines.append(str(self.report))
        return "\n".join(lines)


def check_dataset(path_or_json, image_root=None, voc_split: str | None = None, classes=None) -> DataCheck:
    """Check a COCO instances json (images under ``image_root``, guessed when None) or a VOC root
    (split ``voc_split``: default the first of trainval/train/val/test present; ``classes``: default
    the 20 VOC classes, as training uses without ``data.voc_classes``: objects of other names are then
    reported as skipped, and a note names the ``data.voc_classes`` setting that would keep them)."""
    path = Path(path_or_json)
    notes: list[str] = []
    ds: VocDetection | CocoDetection
    if path.is_dir():
        if not (path / "Annotations").is_dir() or not (path / "ImageSets" / "Main").is_dir():
            raise DataError(
                f"{path}: expected a COCO json file or a VOC root "
                "(a folder with Annotations/, JPEGImages/ and ImageSets/Main/)"
            )
        if voc_split is None:
            voc_split = next(
                (
                    s
                    for s in ("trainval", "train", "val", "test")
                    if (path / "ImageSets" / "Main" / f"{s}.txt").is_file()
                ),
                "train",
            )
        if classes is None:  # as training does without data.voc_classes: the 20 VOC classes
            classes = VOC_CLASSES
            found = scan_class_names(path, voc_split)
            others = [name for name in found if name not in VOC_CLASSES]
            if others:
                notes.append(
                    f"{len(others)} class name(s) in the XML files are not VOC classes ({', '.join(others)}): "
                    "with the 20 VOC classes (data.voc_classes unset) their objects are dropped, as listed "
                    f"below; to train on them set data.voc_classes=[{','.join(found)}] "
                    f"(check here with --classes {','.join(found)})"
                )
        ds = VocDetection(path, voc_split, classes=classes, on_bad_image="skip")
        fmt, extra, names = "VOC", "difficult", ds.image_names
        notes.insert(0, f"split {voc_split}")
    elif path.exists():
        ds = CocoDetection(path, image_root, include_crowd=True, on_bad_image="skip")
        fmt, extra = "COCO", "crowd"
        names = [r.record for r in ds.records]
        notes.insert(0, f"images under {ds.image_root}")
    else:
        raise DataError(f"{path}: not found (expected a COCO json file or a VOC root)")

    per_class = {
        name: {"objects": 0, "images": 0, "small": 0, "medium": 0, "large": 0, extra: 0} for name in ds.class_names[1:]
    }
    sizes = dict.fromkeys(SIZE_NAMES, 0)
    empty = []
    for i, name in enumerate(names):
        t = ds.target(i)
        crowd = t["iscrowd"].bool()
        flag = t.get("difficult", crowd)
        if int((~crowd).sum()) == 0:
            empty.append(name)
        seen = set()
        wh = t["boxes"][:, 2:] - t["boxes"][:, :2]
        for label, c, f, area in zip(
            t["labels"].tolist(), crowd.tolist(), flag.tolist(), (wh[:, 0] * wh[:, 1]).tolist()
        ):
            stats = per_class[ds.class_names[label]]
            stats[extra] += int(f)
            if c:
                continue
            stats["objects"] += 1
            bucket = size_bucket(area)
            stats[bucket] += 1
            sizes[bucket] += 1
            seen.add(label)
        for label in seen:
            per_class[ds.class_names[label]]["images"] += 1
    return DataCheck(str(path), fmt, list(ds.class_names), len(ds), per_class, sizes, empty, ds.report, notes, extra)
