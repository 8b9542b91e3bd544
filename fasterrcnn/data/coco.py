"""COCO reader: an instances json plus an image folder -> ``(image, target)`` items.

Category ids (any positive integers, with gaps as in COCO's 1..90) map to contiguous labels 1..C in
increasing id order; ``label_to_cat_id`` maps back for writing results. ``bbox`` xywh becomes xyxy.
Crowd annotations (``iscrowd=1``) stay out of the targets unless ``include_crowd=True`` (for
evaluation, flagged ``iscrowd=1``). Images without annotations are kept unless ``drop_empty=True``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
from pathlib import Path

import numpy as np

from .base import DetectionDataset, ImageRecord, empty_arrays
from .box_checks import MALFORMED_BOX, boxes_needing_checks, check_box, inside_resolver, is_int, is_number
from .report import FIXED, SKIPPED_ANNOTATION, DataError, where

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


@contextlib.contextmanager
def _no_gc():
    """The cyclic garbage collector paused for a block (as it was before, after)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_json(path) -> dict:
    """Read a json object, turning every failure into a ``DataError`` naming the file."""
    path = Path(path)
    if path.is_dir():
        voc = (path / "Annotations").is_dir()
        raise DataError(
            f"{path}: a folder, and COCO data is one instances json file"
            + (
                " (this folder looks like a Pascal VOC root: set data.format=voc, or leave it auto)"
                if voc
                else "; give the json file itself (e.g. annotations/instances_train.json)"
            )
        )
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
        raise DataError(
            f"{where(path, name, 'id')}: duplicate {kind} id {ident} (first at {section}[{first_at[ident]}])"
        )
    first_at[ident] = i
    return item, ident


class CocoDetection(DetectionDataset):
    """A COCO instances json (``ann_file``) with its images under ``image_root``.

    ``on_bad_image="error"`` (default): a missing/corrupt image or one whose decoded size differs
    from the json's raises ``DataError`` when that item is loaded. ``"skip"``: every image is
    decoded up front, and bad ones are dropped and listed in ``report``.
    """

    _kept: dict[str, np.ndarray]  # the annotations kept, as arrays: set by _parse_annotations, taken by _to_records

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
        with _no_gc():  # millions of small objects, none of them cyclic: collecting would rescan them all, often
            data = load_json(self.ann_file)
            self._parse_categories(_list_field(data, "categories", self.ann_file, required=True))
            images = self._parse_images(_list_field(data, "images", self.ann_file, required=True))
            self._parse_annotations(_list_field(data, "annotations", self.ann_file, required=False), images)
            records = self._to_records(images)
            del data, images
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
            same = [other for other, name in names.items() if name == cat["name"]]
            if same:  # labels are matched by name (evaluation, class lists): one name, one category
                raise DataError(
                    f"{where(path, f'category id {cid}', 'name')}: duplicate category name "
                    f"{cat['name']!r}, also category id {same[0]}; give each category its own name"
                )
            names[cid] = cat["name"]
        ids = sorted(names)
        self.cat_id_to_label = {cid: label for label, cid in enumerate(ids, start=1)}
        self.label_to_cat_id = {label: cid for cid, label in self.cat_id_to_label.items()}
        self.class_names = ["__background__"] + [names[cid] for cid in ids]

    def _parse_images(self, images: list) -> dict:
        """``{image_id: (info, annotations)}`` in file order."""
        path = self.ann_file
        resolve = inside_resolver(self.image_root)
        out: dict[int, tuple[dict | None, list]] = {}
        first_at: dict[int, int] = {}
        for i, img in enumerate(images):
            iid = img.get("id") if type(img) is dict else None
            if type(iid) is not int or iid in first_at:  # the checks, and their messages, of the general path
                img, iid = _unique_record(img, path, "images", i, "image", first_at)
            else:
                first_at[iid] = i
            rec = f"image id {iid}"
            file = resolve(img.get("file_name"), path, rec, "file_name")
            if "width" in img or "height" in img:
                width, height = img.get("width"), img.get("height")
                if not (type(width) is int and type(height) is int and width > 0 and height > 0):
                    width = _int_field(img, "width", path, rec, positive=True)
                    height = _int_field(img, "height", path, rec, positive=True)
            else:  # not required by the format; read it from the file header (no decoding)
                size = self._header_size(Path(file), path, rec, "width/height")
                if size is None:
                    out[iid] = (None, [])  # skipped (reported); its annotations go with it
                    continue
                width, height = size
            out[iid] = ({"id": iid, "path": file, "width": width, "height": height, "record": rec, "n": len(out)}, [])
        return out

    def _parse_annotations(self, annotations: list, images: dict) -> None:
        """Each annotation's fields are checked one by one; its box against its image in one pass over
        all boxes (``boxes_needing_checks``), and only the boxes it flags go through ``check_box``.
        Problems are reported in annotation order."""
        path = self.ann_file
        first_at: dict[int, int] = {}
        problems: list[tuple[int, tuple]] = []  # (annotation index, report.add arguments)
        # the annotations whose fields are fine, column by column: index, id, bbox, label, area, crowd, image
        rows_i, rows_id, rows_box, rows_label, rows_area, rows_crowd, rows_image = [], [], [], [], [], [], []
        nan = float("nan")
        numbers = (int, float)
        cat_to_label = self.cat_id_to_label
        for i, ann in enumerate(annotations):
            aid = ann.get("id") if type(ann) is dict else None
            if type(aid) is not int or aid in first_at:
                ann, aid = _unique_record(ann, path, "annotations", i, "annotation", first_at)
            else:
                first_at[aid] = i
            iid = ann.get("image_id")
            if not is_int(iid) or iid not in images:
                problems.append(
                    (
                        i,
                        (
                            SKIPPED_ANNOTATION,
                            UNKNOWN_IMAGE,
                            path,
                            f"annotation id {aid}",
                            "image_id",
                            f"image_id {iid!r} is not in 'images'",
                        ),
                    )
                )
                continue
            info = images[iid][0]
            if info is None:
                continue  # the image was skipped and reported
            cid = ann.get("category_id")
            if not is_int(cid) or cid not in cat_to_label:
                problems.append(
                    (
                        i,
                        (
                            SKIPPED_ANNOTATION,
                            UNKNOWN_CATEGORY,
                            path,
                            f"annotation id {aid}",
                            "category_id",
                            f"category_id {cid!r} is not in 'categories'",
                        ),
                    )
                )
                continue
            bbox = ann.get("bbox")
            if not (
                type(bbox) is list
                and len(bbox) == 4
                and (
                    (
                        type(bbox[0]) in numbers
                        and type(bbox[1]) in numbers
                        and type(bbox[2]) in numbers
                        and type(bbox[3]) in numbers
                    )
                    or all(is_number(v) for v in bbox)
                )
            ):
                problems.append(
                    (
                        i,
                        (
                            SKIPPED_ANNOTATION,
                            MALFORMED_BOX,
                            path,
                            f"annotation id {aid}",
                            "bbox",
                            f"expected [x, y, width, height] numbers, got {bbox!r}",
                        ),
                    )
                )
                continue
            area = ann.get("area")
            rows_i.append(i)
            rows_id.append(aid)
            rows_box.append(bbox)
            rows_label.append(cat_to_label[cid])
            rows_area.append(area if type(area) in numbers or is_number(area) else nan)
            rows_crowd.append(1 if ann.get("iscrowd", 0) else 0)
            rows_image.append(info)
        xywh = np.array(rows_box, dtype=np.float64).reshape(-1, 4)
        x1, y1 = xywh[:, 0], xywh[:, 1]
        x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]  # the same float64 sums as x + w in Python
        boxes = np.stack([x1, y1, x2, y2], axis=1)
        width = np.array([info["width"] for info in rows_image], dtype=np.float64)
        height = np.array([info["height"] for info in rows_image], dtype=np.float64)
        keep = np.ones(len(rows_i), dtype=bool)
        for k in np.flatnonzero(boxes_needing_checks(x1, y1, x2, y2, width, height)).tolist():
            info, rec = rows_image[k], f"annotation id {rows_id[k]}"
            bx1, by1, bx2, by2 = boxes[k].tolist()
            result = check_box(bx1, by1, bx2, by2, info["width"], info["height"])
            if result.box is None:
                keep[k] = False
                problems.append(
                    (
                        rows_i[k],
                        (SKIPPED_ANNOTATION, result.kind, path, rec, "bbox", f"{result.detail} (xywh {rows_box[k]})"),
                    )
                )
                continue
            if result.kind is not None:
                problems.append((rows_i[k], (FIXED, result.kind, path, rec, "bbox", result.detail)))
            boxes[k] = result.box
        with np.errstate(invalid="ignore", over="ignore"):
            area = np.array(rows_area, dtype=np.float64)
            computed = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            area = np.where(np.isfinite(area) & (area > 0), area, computed)
        self._kept = {
            "image": np.array([info["n"] for info in rows_image], np.int64)[keep],
            "boxes": boxes[keep].astype(np.float32),
            "labels": np.array(rows_label, np.int64)[keep],
            "area": area[keep].astype(np.float32),
            "iscrowd": np.array(rows_crowd, np.int64)[keep],
        }
        problems.sort(key=lambda p: p[0])  # stable: a fix and its record stay in the order found
        for _, args in problems:
            self.report.add(*args)

    def _to_records(self, images: dict) -> list[ImageRecord]:
        """One record per image kept, its objects in annotation order: the kept annotations sorted by
        image once, each image's arrays a slice of the whole."""
        kept = self._kept
        del self._kept
        if not self.include_crowd:
            kept = {k: v[kept["iscrowd"] == 0] for k, v in kept.items()}
        n = kept["image"]
        order = np.argsort(n, kind="stable")
        boxes, labels, area, iscrowd = (kept[k][order] for k in ("boxes", "labels", "area", "iscrowd"))
        ends = np.cumsum(np.bincount(n, minlength=len(images))).tolist()
        source = str(self.ann_file)
        records = []
        for info, _ in images.values():
            if info is None:
                continue
            k = info["n"]
            s, e = (ends[k - 1] if k else 0), ends[k]
            arrays = (boxes[s:e], labels[s:e], area[s:e], iscrowd[s:e]) if e > s else empty_arrays()
            records.append(
                ImageRecord(
                    info["id"], info["path"], info["width"], info["height"], *arrays, None, source, info["record"]
                )
            )
        return records
