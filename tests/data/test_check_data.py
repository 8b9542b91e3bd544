import pytest

from fasterrcnn.data import DataError, check_dataset
from fasterrcnn.data.check_data import size_bucket
from fasterrcnn.data.synth import generate
from fasterrcnn.data.voc import UNKNOWN_CLASS, VOC_CLASSES, scan_class_names

from .helpers import make_voc, simple_coco


def _coco_with_problems(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 120, "height": 120} for i in (1, 2, 3, 4)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},  # small (100)
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]},  # medium (1600)
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 100, 100]},  # large (10000)
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20], "iscrowd": 1},
        {"id": 5, "image_id": 2, "category_id": 7, "bbox": [5, 5, 20, 20]},  # unknown category
        {"id": 6, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 20]},  # zero size
        {"id": 7, "image_id": 4, "category_id": 1, "bbox": [5, 5, 10, 10]},  # its image is missing
    ]  # image 3: no objects
    path = simple_coco(tmp_path, annotations=anns, images=images)
    (tmp_path / "images" / "4.png").unlink()
    return path


def test_size_buckets_follow_coco():
    assert [size_bucket(a) for a in (0, 1023.9, 1024, 9215, 9216)] == ["small", "small", "medium", "medium", "large"]


def test_coco_check_counts_sizes_empties_and_problems(tmp_path):
    check = check_dataset(_coco_with_problems(tmp_path), tmp_path / "images")
    assert check.format == "COCO" and check.num_images == 3  # image 4 skipped
    assert check.per_class["a"] == {"objects": 2, "images": 1, "small": 1, "medium": 1, "large": 0, "crowd": 0}
    assert check.per_class["b"] == {"objects": 1, "images": 1, "small": 0, "medium": 0, "large": 1, "crowd": 1}
    assert check.sizes == {"small": 1, "medium": 1, "large": 1}
    assert check.empty_images == ["image id 3"]
    assert not check.ok
    kinds = sorted(p.kind for p in check.report)
    assert kinds == ["missing image", "unknown category id", "zero-size box"]
    text = str(check)
    for needle in (
        "class",
        "objects",
        "small",
        "medium",
        "large",
        "total",
        "image id 3",
        "annotation id 5",
        "annotation id 6",
        "4.png",
        "ann.json",
        "3 problems",
    ):
        assert needle in text, needle


def test_clean_synth_check_agrees_between_coco_and_voc(tmp_path):
    paths = generate(tmp_path / "s", num_train=12, num_val=4, image_size=(96, 128), voc=True, seed=2)
    coco = check_dataset(paths.train_json)
    assert coco.ok and coco.num_images == 12
    voc = check_dataset(paths.voc_root, classes=coco.class_names[1:])  # split: train (no trainval)
    assert voc.ok and voc.format == "VOC" and voc.num_images == 12
    for name, stats in coco.per_class.items():
        assert {k: v for k, v in stats.items() if k != "crowd"} == {
            k: v for k, v in voc.per_class[name].items() if k != "difficult"
        }
    assert coco.sizes == voc.sizes and len(coco.empty_images) == len(voc.empty_images)
    assert check_dataset(paths.voc_root, voc_split="val").num_images == 4


def test_voc_root_with_its_own_class_names_is_checked_as_training_reads_it(tmp_path):
    """Issue 20 #3: check-data said "no problems" on a VOC root whose names are not VOC's, where
    training (data.voc_classes unset) uses the 20 VOC classes and drops every object."""
    paths = generate(tmp_path / "s", num_train=6, num_val=2, image_size=(64, 80), voc=True, seed=2)
    check = check_dataset(paths.voc_root)
    found = scan_class_names(paths.voc_root, "train")
    assert not check.ok and check.num_objects == 0
    assert check.class_names[1:] == list(VOC_CLASSES)
    assert check.report.count(kind=UNKNOWN_CLASS) == sum(1 for p in check.report)  # every object, by name
    note = next(n for n in check.notes if "not VOC classes" in n)
    assert f"data.voc_classes=[{','.join(found)}]" in note and f"--classes {','.join(found)}" in note
    assert check_dataset(paths.voc_root, classes=found).ok  # the setting the note names makes it whole


def test_voc_check_with_voc_classes_and_difficult(tmp_path):
    root = make_voc(
        tmp_path / "v", {"a": [("dog", 1, 1, 10, 10, 1), ("cat", 1, 1, 40, 30, 0)], "b": []}, split="trainval"
    )
    check = check_dataset(root)
    assert check.notes == ["split trainval"]
    assert check.class_names[1:4] == ["aeroplane", "bicycle", "bird"]
    assert check.per_class["dog"]["difficult"] == 1 and check.per_class["cat"]["large"] == 0
    assert check.empty_images == ["b"]


def test_check_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(DataError, match="expected a COCO json file or a VOC root"):
        check_dataset(tmp_path)
    with pytest.raises(DataError, match="nothing.json: not found"):
        check_dataset(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="bad.json: malformed json"):
        check_dataset(tmp_path / "bad.json")
