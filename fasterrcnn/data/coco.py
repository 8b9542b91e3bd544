"""COCO reader: an instances json plus an image folder -> ``(image, target)`` items.

Category ids (any positive integers, with gaps as in COCO's 1..90) map to contiguous labels 1..C in
increasing id order; ``label_to_cat_id`` maps back for writing results. ``bbox`` xywh becomes xyxy.
Crowd annotations (``iscrowd=1``) stay out of the targets unless ``include_crowd=True`` (for
evaluation, flagged ``iscrowd=1``). Images without annotations are kept unless ``drop_empty=True``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .base import DetectionDataset, ImageRecord, empty_arrays
from .report import FIXED, SKIPPED_ANNOTATION, DataError, where
from .box_checks import MALFORMED_BOX, check_box, is_int, is_number, resolve_inside

UNKNOWN_CATEGORY = "unknown category id"
UNKNOWN_IMAGE = "unknown image id"


def default_image_root(ann_file) -> Path:
    """Where the images of ``ann_file`` live when the user does not say.

    ``.../annotations/instances_<split>.json`` -> ``.../<split>`` (or ``.../images/<split>``) when
    that folder exists (the COCO and ``fasterrcnn synth`` layout); otherwise the json's own folder.
    """
    ann_file = Path(ann_file)
    m = re.fullmatch(r"(?:instances|image_info)_(.+)\.json", ann_file.name)
    if m:
        base = ann_file.parent.parent
        for candidate in (base / m.group(1), base / "images" / m.group(1)):
            if candidate.is_dir():
                return candidate
    return ann_file.parent


def load_json(path) -> dict:
    """Read a json object, turning every failure into a ``DataError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed json at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read annotation file ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a json object at the top level, got {type(data).__name__}")
    return data


def _list_field(data: dict, key: str, path, required: bool) -> list:
    if key not in data:
        if required:
            raise DataError(f"{where(path, None, key)}: missing; a COCO instances file needs {key!r}")
        return []
    value = data[key]
    if not isinstance(value, list):
        raise DataError(f"{where(path, None, key)}: expected a list, got {type(value).__name__}")
    return value


def _record(item, path, name: str) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{where(path, name)}: expected a json object, got {type(item).__name__}")
    return item


def _int_field(item: dict, key: str, path, name: str, positive: bool = False) -> int:
    value = item.get(key)
    if not is_int(value) or (positive and value <= 0):
        what = "a positive integer" if positive else "an integer"
        raise DataError(f"{where(path, name, key)}: expected {what}, got {value!r}")
    return value


def _unique_record(item, path, section: str, i: int, kind: str, first_at: dict[int, int]) -> tuple[dict, int]:
    """``section[i]`` as a dict and its integer ``id``, refused when another record of the section has it."""
    name = f"{section}[{i}]"
    item = _record(item, path, name)
    ident = _int_field(item, "id", path, name)
    if ident in first_at:
        raise DataError(f"{where(path, name, 'id')}: duplicate {kind} id {ident} (first at {section}[{first_at[ident]}])")
    first_at[ident] = i
    return item, ident


class CocoDetection(DetectionDataset):
    """A COCO instances json (``ann_file``) with its images under ``image_root``.

    ``on_bad_image="error"`` (default): a missing/corrupt image or one whose decoded size differs
    from the json's raises ``DataError`` when that item is loaded. ``"skip"``: every image is
    decoded up front, and bad ones are dropped and listed in ``report``.
    """

    def __init__(
        self,
        ann_file,
        image_root=None,
        transforms=None,
        drop_empty: bool = False,
        include_crowd: bool = False,
        on_bad_image: str = "error",
    ):
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root) if image_root is not None else default_image_root(ann_file)
        self.include_crowd = include_crowd
        self._start(on_bad_image, self.ann_file)
        data = load_json(self.ann_file)
        self._parse_categories(_list_field(data, "categories", self.ann_file, required=True))
        images = self._parse_images(_list_field(data, "images", self.ann_file, required=True))
        self._parse_annotations(_list_field(data, "annotations", self.ann_file, required=False), images)
        records = [self._to_record(*item) for item in images.values() if item[0] is not None]
        self._finish(records, transforms, drop_empty)

    # ---- parsing --------------------------------------------------------------------------------

    def _parse_categories(self, categories: list) -> None:
        path = self.ann_file
        if not categories:
            raise DataError(f"{where(path, None, 'categories')}: empty; at least one category is needed")
        names: dict[int, str] = {}
        first_at: dict[int, int] = {}
        for i, cat in enumerate(categories):
            cat, cid = _unique_record(cat, path, "categories", i, "category", first_at)
            if not isinstance(cat.get("name"), str) or not cat["name"]:
                raise DataError(f"{where(path, f'category id {cid}', 'name')}: expected a non-empty string")
            names[cid] = cat["name"]
        ids = sorted(names)
        self.cat_id_to_label = {cid: label for label, cid in enumerate(ids, start=1)}
        self.label_to_cat_id = {label: cid for cid, label in self.cat_id_to_label.items()}
        self.class_names = ["__background__"] + [names[cid] for cid in ids]

    def _parse_images(self, images: list) -> dict:
        """``{image_id: (info, annotations)}`` in file order."""
        path = self.ann_file
        out: dict[int, tuple[dict, list]] = {}
        first_at: dict[int, int] = {}
        for i, img in enumerate(images):
            img, iid = _unique_record(img, path, "images", i, "image", first_at)
            rec = f"image id {iid}"
            file = resolve_inside(self.image_root, img.get("file_name"), path, rec, "file_name")
            if "width" in img or "height" in img:
                width = _int_field(img, "width", path, rec, positive=True)
                height = _int_field(img, "height", path, rec, positive=True)
            else:  # not required by the format; read it from the file header (no decoding)
                size = self._header_size(file, path, rec, "width/height")
                if size is None:
                    out[iid] = (None, [])  # skipped (reported); its annotations go with it
                    continue
                width, height = size
            out[iid] = ({"id": iid, "path": file, "width": width, "height": height, "record": rec}, [])
        return out

    def _parse_annotations(self, annotations: list, images: dict) -> None:
        path = self.ann_file
        first_at: dict[int, int] = {}
        for i, ann in enumerate(annotations):
            ann, aid = _unique_record(ann, path, "annotations", i, "annotation", first_at)
            rec = f"annotation id {aid}"
            iid = ann.get("image_id")
            if not is_int(iid) or iid not in images:
                self.report.add(SKIPPED_ANNOTATION, UNKNOWN_IMAGE, path, rec, "image_id",
                                f"image_id {iid!r} is not in 'images'")
                continue
            info, kept = images[iid]
            if info is None:
                continue  # the image was skipped and reported
            cid = ann.get("category_id")
            if not is_int(cid) or cid not in self.cat_id_to_label:
                self.report.add(SKIPPED_ANNOTATION, UNKNOWN_CATEGORY, path, rec, "category_id",
                                f"category_id {cid!r} is not in 'categories'")
                continue
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
                self.report.add(SKIPPED_ANNOTATION, MALFORMED_BOX, path, rec, "bbox",
                                f"expected [x, y, width, height] numbers, got {bbox!r}")
                continue
            x, y, w, h = (float(v) for v in bbox)
            result = check_box(x, y, x + w, y + h, info["width"], info["height"])
            if result.box is None:
                self.report.add(SKIPPED_ANNOTATION, result.kind, path, rec, "bbox",
                                f"{result.detail} (xywh {bbox})")
                continue
            if result.kind is not None:
                self.report.add(FIXED, result.kind, path, rec, "bbox", result.detail)
            box = result.box
            area = ann.get("area")
            if not (is_number(area) and np.isfinite(area) and area > 0):
                area = (box[2] - box[0]) * (box[3] - box[1])
            crowd = ann.get("iscrowd", 0)
            kept.append((box, self.cat_id_to_label[cid], float(area), 1 if crowd else 0))

    def _to_record(self, info: dict, anns: list) -> ImageRecord:
        if not self.include_crowd:
            anns = [a for a in anns if a[3] == 0]
        if anns:
            boxes = np.array([a[0] for a in anns], np.float32).reshape(-1, 4)
            labels = np.array([a[1] for a in anns], np.int64)
            area = np.array([a[2] for a in anns], np.float32)
            iscrowd = np.array([a[3] for a in anns], np.int64)
        else:
            boxes, labels, area, iscrowd = empty_arrays()
        return ImageRecord(info["id"], info["path"], info["width"], info["height"], boxes, labels,
                           area, iscrowd, None, str(self.ann_file), info["record"])
