import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn.data import CocoDetection, DataError
from fasterrcnn.data.coco import default_image_root
from fasterrcnn.data.report import FIXED, SKIPPED_ANNOTATION, SKIPPED_IMAGE
from fasterrcnn.data.transforms import RandomHorizontalFlip

from .helpers import coco_json, make_image, simple_coco, write_json

# ---- a COCO file in the exact style of the official instances_val2017.json -----------------------

OFFICIAL_CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 2, "name": "bicycle"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "kitchen", "id": 44, "name": "bottle"},
    {"supercategory": "furniture", "id": 62, "name": "chair"},
    {"supercategory": "indoor", "id": 90, "name": "toothbrush"},
]


def _official(tmp_path):
    root = tmp_path / "coco"
    sizes = {139: (48, 32), 285: (32, 40), 632: (40, 40)}  # id -> (width, height)
    images = []
    for iid, (w, h) in sizes.items():
        name = f"{iid:012d}.jpg"
        make_image(root / "val2017" / name, w, h, seed=iid, quality=95)
        images.append(
            {
                "license": 4,
                "file_name": name,
                "coco_url": f"http://images.cocodataset.org/val2017/{name}",
                "height": h,
                "width": w,
                "date_captured": "2013-11-14 17:02:52",
                "flickr_url": "http://farm7.staticflickr.com/6116/6255196340_da26cf2c9e_z.jpg",
                "id": iid,
            }
        )
    annotations = [
        {
            "segmentation": [[10.5, 4.2, 30.1, 4.2, 30.1, 20.9, 10.5, 20.9]],
            "area": 327.1057499999998,
            "iscrowd": 0,
            "image_id": 139,
            "bbox": [10.5, 4.2, 19.6, 16.7],
            "category_id": 18,
            "id": 1768,
        },
        {
            "segmentation": [[1.0, 1.0, 8.25, 1.0, 8.25, 30.5]],
            "area": 105.2,
            "iscrowd": 0,
            "image_id": 139,
            "bbox": [1.0, 1.0, 7.25, 29.5],
            "category_id": 1,
            "id": 1769,
        },
        # crowd: RLE over the whole 48x32 image (column-major run lengths summing to h * w)
        {
            "segmentation": {"counts": [100, 20, 300, 40, 1076], "size": [32, 48]},
            "area": 60.0,
            "iscrowd": 1,
            "image_id": 139,
            "bbox": [3.0, 3.0, 20.0, 12.0],
            "category_id": 1,
            "id": 900100139,
        },
        {
            "segmentation": [[2.3, 5.7, 29.9, 5.7, 29.9, 39.0]],
            "area": 470.77,
            "iscrowd": 0,
            "image_id": 285,
            "bbox": [2.3, 5.7, 27.6, 33.3],
            "category_id": 90,
            "id": 2001,
        },
        {
            "segmentation": [[0.0, 0.0, 4.0, 0.0, 4.0, 4.0]],
            "area": 8.0,
            "iscrowd": 0,
            "image_id": 285,
            "bbox": [0.0, 0.0, 4.0, 4.0],
            "category_id": 3,
            "id": 2002,
        },
    ]  # image 632 has no annotations
    data = {
        "info": {
            "description": "COCO 2017 Dataset",
            "url": "http://cocodataset.org",
            "version": "1.0",
            "year": 2017,
            "contributor": "COCO Consortium",
            "date_created": "2017/09/01",
        },
        "licenses": [
            {
                "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
                "id": 1,
                "name": "Attribution-NonCommercial-ShareAlike License",
            },
            {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"},
        ],
        "images": images,
        "annotations": annotations,
        "categories": OFFICIAL_CATEGORIES,
    }
    ann_file = root / "annotations" / "instances_val2017.json"
    ann_file.parent.mkdir(parents=True)
    ann_file.write_text(json.dumps(data, indent=None))
    return ann_file


def test_official_style_file_reads_correctly(tmp_path):
    ann_file = _official(tmp_path)
    ds = CocoDetection(ann_file)
    assert ds.image_root == ann_file.parent.parent / "val2017"  # guessed from the COCO layout
    assert ds.class_names == ["__background__", "person", "bicycle", "car", "dog", "bottle", "chair", "toothbrush"]
    assert ds.num_classes == 7
    assert ds.cat_id_to_label == {1: 1, 2: 2, 3: 3, 18: 4, 44: 5, 62: 6, 90: 7}
    assert ds.label_to_cat_id == {v: k for k, v in ds.cat_id_to_label.items()}
    assert ds.image_ids == [139, 285, 632]
    assert ds.aspect_ratios() == pytest.approx([48 / 32, 32 / 40, 1.0])
    assert len(ds.report) == 0

    image, t = ds[0]
    assert image.shape == (3, 32, 48) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert t["image_id"].item() == 139 and t["image_id"].dtype == torch.int64
    expected = torch.tensor([[10.5, 4.2, 30.1, 20.9], [1.0, 1.0, 8.25, 30.5]], dtype=torch.float32)
    assert torch.allclose(t["boxes"], expected) and t["boxes"].dtype == torch.float32
    assert t["labels"].tolist() == [4, 1] and t["labels"].dtype == torch.int64
    assert t["iscrowd"].tolist() == [0, 0]  # the crowd region stays out of training targets
    assert t["area"].tolist() == pytest.approx([327.1057499999998, 105.2])

    _, t = ds[1]
    assert t["labels"].tolist() == [7, 3]
    assert torch.allclose(t["boxes"][0], torch.tensor([2.3, 5.7, 29.9, 39.0]))

    image, t = ds[2]  # no annotations: kept, with empty (0, 4) boxes
    assert image.shape == (3, 40, 40)
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["area"].shape == (0,)


def test_official_style_crowd_available_for_evaluation(tmp_path):
    ds = CocoDetection(_official(tmp_path), include_crowd=True)
    t = ds.target(0)
    assert t["iscrowd"].tolist() == [0, 0, 1]
    assert t["boxes"][2].tolist() == [3.0, 3.0, 23.0, 15.0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy 2 warning
def test_official_style_loads_in_pycocotools_with_same_boxes(tmp_path):
    from pycocotools.coco import COCO

    ann_file = _official(tmp_path)
    coco = COCO(str(ann_file))
    ds = CocoDetection(ann_file, include_crowd=True)
    for i, iid in enumerate(ds.image_ids):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[iid]))
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert torch.allclose(ds.target(i)["boxes"], torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
        assert [ds.label_to_cat_id[lb] for lb in ds.target(i)["labels"].tolist()] == [a["category_id"] for a in anns]
    crowd = coco.loadAnns([900100139])[0]
    assert coco.annToMask(crowd).sum() == 60  # the hand-written RLE is a valid mask


def test_drop_empty(tmp_path):
    ds = CocoDetection(_official(tmp_path), drop_empty=True)
    assert ds.image_ids == [139, 285]


def test_transforms_are_applied(tmp_path):
    ds = CocoDetection(_official(tmp_path), transforms=RandomHorizontalFlip(p=1.0))
    image, t = ds[0]
    raw = ds.load_image(0)
    assert torch.equal(image, raw.flip(-1))
    assert torch.allclose(t["boxes"][0], torch.tensor([48 - 30.1, 4.2, 48 - 10.5, 20.9]))


def test_default_image_root(tmp_path):
    assert default_image_root(tmp_path / "ann.json") == tmp_path
    (tmp_path / "train").mkdir()
    assert default_image_root(tmp_path / "annotations" / "instances_train.json") == tmp_path / "train"
    (tmp_path / "images" / "val").mkdir(parents=True)
    assert default_image_root(tmp_path / "annotations" / "instances_val.json") == tmp_path / "images" / "val"


def test_width_height_missing_read_from_header(tmp_path):
    make_image(tmp_path / "images" / "1.png", 12, 7)
    path = write_json(tmp_path / "ann.json", coco_json([{"id": 1, "file_name": "1.png"}], []))
    ds = CocoDetection(path, tmp_path / "images")
    assert ds.aspect_ratios() == [12 / 7]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_dataset_converts_image_modes(tmp_path, mode):
    ext = "jpg" if mode == "CMYK" else "png"
    make_image(tmp_path / "images" / f"1.{ext}", 40, 30, mode=mode)
    path = write_json(
        tmp_path / "ann.json", coco_json([{"id": 1, "file_name": f"1.{ext}", "width": 40, "height": 30}], [])
    )
    image, _ = CocoDetection(path, tmp_path / "images")[0]
    assert image.shape == (3, 30, 40)


def test_exif_orientation_applied_boxes_unaffected(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "images").mkdir()
    Image.fromarray(a).save(tmp_path / "images" / "r.jpg", exif=exif)
    path = write_json(
        tmp_path / "ann.json",
        coco_json(
            [{"id": 1, "file_name": "r.jpg", "width": 10, "height": 20}],
            [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 15]}],
        ),
    )
    image, t = CocoDetection(path, tmp_path / "images")[0]
    assert image.shape == (3, 20, 10)
    assert t["boxes"].tolist() == [[1.0, 2.0, 4.0, 17.0]]


def test_targets_are_fresh_each_call(tmp_path):
    ds = CocoDetection(simple_coco(tmp_path), tmp_path / "images")
    t = ds.target(0)
    t["boxes"].add_(100)
    assert ds.target(0)["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0]]


# ---- bad input: skipped and counted ------------------------------------------------------------


def _one_box(tmp_path, bbox, **extra):
    ann = {"id": 7, "image_id": 1, "category_id": 1, "bbox": bbox, **extra}
    path = simple_coco(tmp_path, annotations=[ann])
    return CocoDetection(path, tmp_path / "images")


def _only_problem(ds, action, kind):
    assert len(ds.report) == 1, str(ds.report)
    p = ds.report.problems[0]
    assert p.action == action and p.kind == kind
    text = str(p)
    assert "ann.json" in text and "annotation id 7" in text  # names the file and the record
    return p


@pytest.mark.parametrize(
    "bbox, kind",
    [
        ([2, 3, -4, 5], "negative box size"),
        ([2, 3, 4, -5], "negative box size"),
        ([2, 3, 0, 5], "zero-size box"),
        ([2, 3, math.nan, 5], "non-finite box"),
        ([50, 3, 4, 5], "box outside image"),
        ([-9, -9, 4, 5], "box outside image"),
        ([1, 2, 3], "malformed box"),
        ("10,10,4,4", "malformed box"),
    ],
)
def test_bad_box_skipped_and_counted(tmp_path, bbox, kind):
    ds = _one_box(tmp_path, bbox)
    p = _only_problem(ds, SKIPPED_ANNOTATION, kind)
    assert p.field == "bbox"
    assert ds.target(0)["boxes"].shape == (0, 4)
    assert len(ds) == 2  # the image itself is kept


def test_box_partly_outside_is_clipped_and_reported(tmp_path):
    ds = _one_box(tmp_path, [30, 20, 20, 20])  # 40x30 image
    _only_problem(ds, FIXED, "box clipped to image")
    assert ds.target(0)["boxes"].tolist() == [[30.0, 20.0, 40.0, 30.0]]


def test_unknown_category_skipped_and_counted(tmp_path):
    ds = _one_box(tmp_path, [2, 3, 4, 5], category_id=99)
    p = _only_problem(ds, SKIPPED_ANNOTATION, "unknown category id")
    assert p.field == "category_id" and "99" in p.detail


def test_unknown_image_id_skipped_and_counted(tmp_path):
    path = simple_coco(tmp_path, annotations=[{"id": 7, "image_id": 5, "category_id": 1, "bbox": [1, 1, 2, 2]}])
    ds = CocoDetection(path, tmp_path / "images")
    p = _only_problem(ds, SKIPPED_ANNOTATION, "unknown image id")
    assert p.field == "image_id"


# ---- bad input: clear errors naming the file ---------------------------------------------------


def test_malformed_json(tmp_path):
    (tmp_path / "ann.json").write_text('{"images": [ {"id": 1,,} ]}')
    with pytest.raises(DataError, match=r"ann\.json: malformed json at line 1 column"):
        CocoDetection(tmp_path / "ann.json")


def test_json_not_an_object(tmp_path):
    (tmp_path / "ann.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"ann\.json: expected a json object"):
        CocoDetection(tmp_path / "ann.json")


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.json: annotation file not found"):
        CocoDetection(tmp_path / "nothere.json")


def test_missing_categories(tmp_path):
    write_json(tmp_path / "ann.json", {"images": [], "annotations": []})
    with pytest.raises(DataError, match=r"ann\.json: categories: missing"):
        CocoDetection(tmp_path / "ann.json")


def test_duplicate_image_id(tmp_path):
    images = [
        {"id": 1, "file_name": "1.png", "width": 40, "height": 30},
        {"id": 1, "file_name": "2.png", "width": 40, "height": 30},
    ]
    path = simple_coco(tmp_path, images=images, annotations=[])
    with pytest.raises(DataError, match=r"ann\.json: images\[1\]: id: duplicate image id 1 \(first at images\[0\]\)"):
        CocoDetection(path, tmp_path / "images")


def test_duplicate_annotation_id(tmp_path):
    anns = [
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 1, 2, 2]},
    ]
    path = simple_coco(tmp_path, annotations=anns)
    with pytest.raises(DataError, match=r"ann\.json: annotations\[1\]: id: duplicate annotation id 3"):
        CocoDetection(path, tmp_path / "images")


def test_duplicate_category_id(tmp_path):
    cats = [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]
    path = simple_coco(tmp_path, categories=cats)
    with pytest.raises(DataError, match=r"ann\.json: categories\[1\]: id: duplicate category id 1"):
        CocoDetection(path, tmp_path / "images")


def test_record_field_errors_name_file_record_field(tmp_path):
    images = [{"id": "one", "file_name": "1.png", "width": 40, "height": 30}]
    path = simple_coco(tmp_path, images=images, annotations=[])
    with pytest.raises(DataError, match=r"ann\.json: images\[0\]: id: expected an integer, got 'one'"):
        CocoDetection(path, tmp_path / "images")
    images = [{"id": 1, "file_name": "1.png", "width": 0, "height": 30}]
    path = simple_coco(tmp_path, images=images, annotations=[])
    with pytest.raises(DataError, match=r"ann\.json: image id 1: width: expected a positive integer"):
        CocoDetection(path, tmp_path / "images")


@pytest.mark.parametrize("name", ["../secret.png", "a/../../secret.png", "/abs/secret.png"])
def test_file_name_escaping_root(tmp_path, name):
    images = [{"id": 4, "file_name": name, "width": 40, "height": 30}]
    path = simple_coco(tmp_path, images=images, annotations=[])
    with pytest.raises(DataError, match=r"ann\.json: image id 4: file_name: .*(escapes the image root|absolute)"):
        CocoDetection(path, tmp_path / "images")


def _with_bad_image(tmp_path, damage):
    path = simple_coco(tmp_path)
    damage(tmp_path / "images" / "2.png")
    return path


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


BAD_IMAGES = {
    "missing image": (lambda p: p.unlink(), "not found"),
    "corrupt image": (lambda p: p.write_bytes(b"garbage"), "cannot identify"),
    "truncated image": (_truncate, "truncated|corrupt"),
    "image size mismatch": (lambda p: make_image(p, 41, 30), "41x30"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_errors_at_load_naming_file(tmp_path, case):
    damage, reason = BAD_IMAGES[case]
    ds = CocoDetection(_with_bad_image(tmp_path, damage), tmp_path / "images")  # default "error"
    assert len(ds) == 2
    ds[0]  # the good one loads
    with pytest.raises(DataError, match=rf"ann\.json: image id 2: .*2\.png.*({reason})"):
        ds[1]


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_skipped_and_reported(tmp_path, case):
    damage, _ = BAD_IMAGES[case]
    ds = CocoDetection(_with_bad_image(tmp_path, damage), tmp_path / "images", on_bad_image="skip")
    assert ds.image_ids == [1]
    assert len(ds.report) == 1
    p = ds.report.problems[0]
    kind = "corrupt image" if case == "truncated image" else case
    assert (p.action, p.kind, p.record, p.field) == (SKIPPED_IMAGE, kind, "image id 2", "file_name")
    assert "2.png" in str(p) and "ann.json" in str(p)


def test_on_bad_image_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="on_bad_image"):
        CocoDetection(simple_coco(tmp_path), tmp_path / "images", on_bad_image="ignore")


def test_missing_size_and_missing_image(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "width": 40, "height": 30}, {"id": 2, "file_name": "none.png"}]
    path = simple_coco(
        tmp_path, images=images, annotations=[{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 2, 2]}]
    )
    (tmp_path / "images" / "none.png").unlink()
    with pytest.raises(DataError, match=r"ann\.json: image id 2: width/height: missing, and .*none\.png"):
        CocoDetection(path, tmp_path / "images")
    ds = CocoDetection(path, tmp_path / "images", on_bad_image="skip")
    assert ds.image_ids == [1] and len(ds.report) == 1  # its annotation leaves with it, unreported
    p = ds.report.problems[0]
    assert (p.action, p.kind, p.record) == (SKIPPED_IMAGE, "missing image", "image id 2") and "none.png" in str(p)
