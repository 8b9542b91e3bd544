"""Ground truth of one image from an annotation file, in a model's labels (for ``fasterrcnn explain``).

    load_annotations(path, image_path, image_size, class_names, label_to_cat_id)
        -> ({boxes [G, 4] image pixels, labels int64 [G]}, notes)
A COCO instances json (the record whose file_name has the image's name; labels through the category
ids) or a Pascal VOC xml (class names matched to the model's). Objects of classes the model does not
know are left out, with a note.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .coco import CocoDetection
from .report import DataError, Report, where
from .voc import parse_objects, parse_xml


def targets_in_model_labels(dataset, label_to_cat_id: dict[int, int]) -> list[dict]:
    """The dataset's targets with labels in the model's label space.

    A COCO dataset numbers its categories 1..C in its own order; a model may use another layout (a
    torchvision COCO checkpoint uses the category ids themselves). Both go through the category id;
    objects of a category the model does not know cannot be detected and are left out.
    """
    targets = [dataset.target(i) for i in range(len(dataset))]
    data_map = getattr(dataset, "label_to_cat_id", None)
    if not data_map or data_map == label_to_cat_id:
        return targets
    cat_to_model = {cat: label for label, cat in label_to_cat_id.items()}
    lut = torch.zeros(max(data_map) + 1, dtype=torch.int64)  # 0: unknown to the model
    for label, cat in data_map.items():
        lut[label] = cat_to_model.get(cat, 0)
    remapped = []
    for t in targets:
        labels = lut[t["labels"]]
        known = labels > 0
        remapped.append(
            {
                **{
                    k: (v[known] if k in ("boxes", "labels", "area", "iscrowd", "difficult") else v)
                    for k, v in t.items()
                },
                "labels": labels[known],
            }
        )
    return remapped


class _OneRecord:
    """One record of a dataset, as a dataset of one (what ``targets_in_model_labels`` reads)."""

    def __init__(self, dataset, index: int):
        self.dataset, self.index = dataset, index
        self.label_to_cat_id = getattr(dataset, "label_to_cat_id", None)

    def __len__(self) -> int:
        return 1

    def target(self, i: int) -> dict:
        return self.dataset.target(self.index)


def _coco_target(
    ann_file: Path, image_path: Path, image_size: tuple[int, int], label_to_cat_id: dict[int, int]
) -> tuple[dict, list[str]]:
    dataset = CocoDetection(ann_file, image_root=image_path.parent)
    matches = [i for i, r in enumerate(dataset.records) if Path(r.path).name == image_path.name]
    if not matches:
        raise DataError(
            f"{ann_file}: no image record with file_name {image_path.name!r} (the image explained is {image_path})"
        )
    exact = [i for i in matches if Path(dataset.records[i].path).resolve() == image_path.resolve()]
    if len(matches) > 1 and len(exact) != 1:
        names = ", ".join(repr(str(dataset.records[i].path)) for i in matches[:5])
        raise DataError(
            f"{ann_file}: {len(matches)} image records match {image_path.name!r} ({names}); "
            "put the image where its file_name says, relative to the json's image folder"
        )
    index = exact[0] if len(matches) > 1 else matches[0]
    record = dataset.records[index]
    if (record.height, record.width) != tuple(image_size):
        raise DataError(
            f"{ann_file}: {record.record}: width x height {record.width}x{record.height} but "
            f"{image_path} is {image_size[1]}x{image_size[0]}"
        )
    (target,) = targets_in_model_labels(_OneRecord(dataset, index), label_to_cat_id)
    notes = [dataset.report.summary()] if len(dataset.report) else []
    dropped = len(record.labels) - len(target["labels"])
    if dropped:
        notes.append(f"{dropped} object(s) of categories the model does not know are left out")
    return {"boxes": target["boxes"], "labels": target["labels"]}, notes


def _voc_target(xml_file: Path, image_size: tuple[int, int], class_names: list[str]) -> tuple[dict, list[str]]:
    ann = parse_xml(xml_file)
    height, width = image_size
    size = ann.find("size")
    declared_h = size.findtext("height") if size is not None else None
    declared_w = size.findtext("width") if size is not None else None
    if declared_w and declared_h:
        try:
            declared = (int(float(declared_h)), int(float(declared_w)))
        except ValueError:
            raise DataError(f"{where(xml_file, None, 'size')}: expected integer <width> and <height>") from None
        if declared != (height, width):
            raise DataError(
                f"{where(xml_file, None, 'size')}: {declared[1]}x{declared[0]} (width x height) but "
                f"the image is {width}x{height}"
            )
    report = Report(source=str(xml_file))
    labels = {name: i for i, name in enumerate(class_names) if i > 0}
    objects = parse_objects(ann, xml_file, f"image {xml_file.stem}", width, height, labels, report)
    boxes = torch.tensor([o[0] for o in objects], dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor([o[1] for o in objects], dtype=torch.int64)}, [
        str(p) for p in report
    ]


def load_annotations(
    path, image_path, *, image_size: tuple[int, int], class_names: list[str], label_to_cat_id: dict[int, int]
) -> tuple[dict, list[str]]:
    """Ground truth of one image in the model's labels: -> ({boxes [G, 4] image pixels, labels [G]}, notes).

    ``path``: a COCO instances json (the record whose file_name has the image's name; labels through the
    category ids, as the evaluator maps them) or a Pascal VOC xml (class names matched to the model's).
    Objects the model has no class for are left out, with a note.
    """
    path, image_path = Path(path), Path(image_path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    if path.suffix.lower() == ".json":
        return _coco_target(path, image_path, image_size, label_to_cat_id)
    if path.suffix.lower() == ".xml":
        return _voc_target(path, image_size, class_names)
    raise DataError(f"{path}: expected a COCO instances .json or a Pascal VOC .xml annotation file")
