"""load_annotations: one image's ground truth from a COCO json or a VOC xml, in a model's labels."""

import json

import pytest
import torch

from fasterrcnn.data import DataError
from fasterrcnn.data.annotations import load_annotations
from tests.explain.helpers import CLASSES, synth_example


def test_annotations_from_coco_and_voc(tmp_path):
    paths, image_path, image, target = synth_example(tmp_path / "synth")
    size = tuple(image.shape[-2:])
    # COCO, through the category ids: a model whose labels are the ids in reverse order
    names = CLASSES
    reverse = {label: 5 - label for label in range(1, 5)}
    got, notes = load_annotations(
        paths.val_json, image_path, image_size=size, class_names=names, label_to_cat_id=reverse
    )
    assert torch.equal(got["boxes"], target["boxes"])
    assert got["labels"].tolist() == [5 - v for v in target["labels"].tolist()] and notes == []
    # a model that knows only category 1: the other objects are left out, with a note
    got, notes = load_annotations(
        paths.val_json, image_path, image_size=size, class_names=names[:2], label_to_cat_id={1: 1}
    )
    assert got["labels"].tolist() == [1] * int((target["labels"] == 1).sum())
    assert (len(notes) == 1 and "left out" in notes[0]) or int((target["labels"] != 1).sum()) == 0
    # VOC: class names matched to the model's; 1-based inclusive pixels
    xml = tmp_path / "a.xml"
    xml.write_text(
        f"<annotation><size><width>{size[1]}</width><height>{size[0]}</height></size>"
        "<object><name>star</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>40</xmax><ymax>50</ymax>"
        "</bndbox></object><object><name>dragon</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
        "<ymax>5</ymax></bndbox></object></annotation>"
    )
    got, notes = load_annotations(xml, image_path, image_size=size, class_names=names, label_to_cat_id={})
    assert got["boxes"].tolist() == [[10.0, 20.0, 40.0, 50.0]] and got["labels"].tolist() == [4]
    assert len(notes) == 1 and "dragon" in notes[0]
    # errors name the file
    with pytest.raises(DataError, match="b.json.*no image record"):
        other = tmp_path / "b.json"
        data = json.loads(paths.val_json.read_text())
        for im in data["images"]:
            im["file_name"] = "x" + im["file_name"]
        other.write_text(json.dumps(data))
        load_annotations(other, image_path, image_size=size, class_names=names, label_to_cat_id={})
    with pytest.raises(DataError, match="a.xml.*size"):
        load_annotations(xml, image_path, image_size=(size[0] + 1, size[1]), class_names=names, label_to_cat_id={})
    with pytest.raises(DataError, match="ann.txt"):
        (tmp_path / "ann.txt").write_text("")
        load_annotations(tmp_path / "ann.txt", image_path, image_size=size, class_names=names, label_to_cat_id={})
