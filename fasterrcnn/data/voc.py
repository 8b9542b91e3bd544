"""Pascal VOC reader: ``root/Annotations/*.xml``, ``root/JPEGImages/``, ``root/ImageSets/Main/<split>.txt``.

VOC boxes are 1-based inclusive pixel indices; they become 0-based pixel edges:
``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` (a box over the whole W x H image,
``1..W``, becomes ``[0, W]``). ``difficult`` objects stay in the target, flagged in
``target["difficult"]``, so evaluation can ignore them. ``image_id`` is the image's position in
the split file; ``image_names[i]`` is its VOC name.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .base import DetectionDataset, ImageRecord, empty_arrays
from .box_checks import MALFORMED_BOX, check_box, resolve_inside
from .report import FIXED, SKIPPED_ANNOTATION, DataError, Report, where

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
UNKNOWN_CLASS = "unknown class name"


def read_split(root, split: str) -> tuple[Path, list[str]]:
    """The image names listed in ``ImageSets/Main/<split>.txt`` (first token of each line)."""
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: split file not found (expected ImageSets/Main/{split}.txt under {root})")
    names: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            name = tokens[0]
            if name in seen:
                raise DataError(
                    f"{where(path, f'line {lineno}')}: duplicate image id {name!r} (first on line {seen[name]})"
                )
            seen[name] = lineno
            names.append(name)
    return path, names


def parse_xml(path) -> ET.Element:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line, col = e.position
        raise DataError(f"{path}: malformed XML at line {line} column {col}: {e}") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: expected an <annotation> root element, got <{root.tag}>")
    return root


def _number(element: ET.Element | None, tag: str):
    node = element.find(tag) if element is not None else None
    if node is None or node.text is None:
        return None
    try:
        return float(node.text.strip())
    except ValueError:
        return None


class VocDetection(DetectionDataset):
    """A Pascal VOC root (the folder holding ``Annotations/``, ``JPEGImages/``, ``ImageSets/``).

    ``classes`` defaults to the 20 VOC classes; objects of other classes are skipped and reported.
    ``on_bad_image`` behaves as in ``CocoDetection``.
    """

    def __init__(
        self,
        root,
        split: str = "train",
        classes=VOC_CLASSES,
        transforms=None,
        keep_difficult: bool = True,
        drop_empty: bool = False,
        on_bad_image: str = "error",
    ):
        self.root = Path(root)
        self.split = split
        split_file, names = read_split(self.root, split)
        self._start(on_bad_image, split_file)
        classes = list(classes)
        if not classes or len(set(classes)) != len(classes):
            raise DataError(f"{self.root}: classes must be a non-empty list of distinct names, got {classes}")
        self.class_names = ["__background__"] + classes
        self._label = {name: i for i, name in enumerate(classes, start=1)}
        self.keep_difficult = keep_difficult
        self._names: dict[int, str] = {}
        records = [self._parse(i, name) for i, name in enumerate(names)]
        self._finish([r for r in records if r is not None], transforms, drop_empty)

    @property
    def image_names(self) -> list[str]:
        return [self._names[r.image_id] for r in self.records]

    def _parse(self, image_id: int, name: str) -> ImageRecord | None:
        xml_path = resolve_inside(
            self.root / "Annotations", f"{name}.xml", self.report.source, f"image {name}", "image id"
        )
        ann = parse_xml(xml_path)
        self._names[image_id] = name
        rec = f"image {name}"
        images = self.root / "JPEGImages"
        file_name = (ann.findtext("filename") or "").strip() or f"{name}.jpg"
        path = resolve_inside(images, file_name, xml_path, rec, "filename")
        if not path.exists() and (images / f"{name}.jpg").exists():
            path = images / f"{name}.jpg"  # a stale <filename>; the VOC convention names the file
        size = ann.find("size")
        width, height = _number(size, "width"), _number(size, "height")
        if size is None or (size.find("width") is None and size.find("height") is None):
            header = self._header_size(path, xml_path, rec, "size")
            if header is None:
                return None  # skipped and reported
            width, height = header
        elif not all(v is not None and math.isfinite(v) and v > 0 and v == int(v) for v in (width, height)):
            raise DataError(
                f"{where(xml_path, rec, 'size')}: expected positive integer <width> and <height>, "
                f"got {size.findtext('width')!r} x {size.findtext('height')!r}"
            )
        width, height = int(width), int(height)

        objects = parse_objects(
            ann, xml_path, rec, width, height, self._label, self.report, keep_difficult=self.keep_difficult
        )
        if objects:
            boxes = np.array([o[0] for o in objects], np.float32).reshape(-1, 4)
            labels = np.array([o[1] for o in objects], np.int64)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            iscrowd = np.zeros(len(objects), np.int64)
            difficult = np.array([o[2] for o in objects], bool)
        else:
            boxes, labels, area, iscrowd = empty_arrays()
            difficult = np.zeros((0,), bool)
        return ImageRecord(
            image_id,
            path,
            width,
            height,
            boxes,
            labels,
            area.astype(np.float32),
            iscrowd,
            difficult,
            str(xml_path),
            rec,
        )


def parse_objects(
    ann: ET.Element,
    xml_path,
    rec: str,
    width: int,
    height: int,
    labels: dict[str, int],
    report: Report,
    keep_difficult: bool = True,
) -> list[tuple[tuple[float, ...], int, bool]]:
    """The ``<object>``s of one parsed VOC XML as ``(box xyxy 0-based, label, difficult)``.

    ``labels`` maps class names to labels; objects of other classes and bad boxes are skipped and
    added to ``report``, boxes partly outside the ``width`` x ``height`` image are clipped (reported).
    """
    objects: list[tuple[tuple[float, ...], int, bool]] = []
    for k, obj in enumerate(ann.findall("object")):
        orec = f"{rec} object {k}"
        cls = (obj.findtext("name") or "").strip()
        if cls not in labels:
            report.add(
                SKIPPED_ANNOTATION,
                UNKNOWN_CLASS,
                xml_path,
                orec,
                "name",
                f"class {cls!r} is not one of the dataset's classes",
            )
            continue
        difficult = _number(obj, "difficult") == 1
        if difficult and not keep_difficult:
            continue
        bnd = obj.find("bndbox")
        coords = [_number(bnd, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        if any(c is None for c in coords):
            report.add(
                SKIPPED_ANNOTATION,
                MALFORMED_BOX,
                xml_path,
                orec,
                "bndbox",
                "expected numeric <xmin>, <ymin>, <xmax>, <ymax>",
            )
            continue
        xmin, ymin, xmax, ymax = coords
        result = check_box(xmin - 1, ymin - 1, xmax, ymax, width, height)
        text = f"(VOC xmin,ymin,xmax,ymax = {xmin:g},{ymin:g},{xmax:g},{ymax:g})"
        if result.box is None:
            assert result.kind is not None  # a skipped box always names its problem
            report.add(SKIPPED_ANNOTATION, result.kind, xml_path, orec, "bndbox", f"{result.detail} {text}")
            continue
        if result.kind is not None:
            report.add(FIXED, result.kind, xml_path, orec, "bndbox", f"{result.detail} {text}")
        objects.append((result.box, labels[cls], difficult))
    return objects


def scan_class_names(root, split: str) -> list[str]:
    """The distinct object class names used in a split's XML files, sorted."""
    _, names = read_split(root, split)
    found = set()
    for name in names:
        for obj in parse_xml(Path(root) / "Annotations" / f"{name}.xml").findall("object"):
            cls = (obj.findtext("name") or "").strip()
            if cls:
                found.add(cls)
    return sorted(found)
