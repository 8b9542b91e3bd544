import pytest
import torch

from fasterrcnn.data import VOC_CLASSES, DataError, VocDetection
from fasterrcnn.data.report import FIXED, SKIPPED_ANNOTATION, SKIPPED_IMAGE
from fasterrcnn.data.voc import scan_class_names

from .helpers import make_image, make_voc, voc_xml


def _voc(tmp_path):
    return make_voc(
        tmp_path / "VOC2007",
        {
            "000005": [("chair", 1, 1, 40, 30, 0), ("person", 5, 6, 10, 20, 1)],
            "000007": [("car", 11, 3, 11, 3, 0)],  # a single pixel: xmin == xmax
            "000009": [],
        },
    )


def test_reads_voc_layout_with_default_classes(tmp_path):
    ds = VocDetection(_voc(tmp_path), "train")
    assert ds.class_names == ["__background__", *VOC_CLASSES] and ds.num_classes == 20
    assert ds.image_names == ["000005", "000007", "000009"]
    assert ds.image_ids == [0, 1, 2]
    assert ds.aspect_ratios() == pytest.approx([40 / 30] * 3)
    assert len(ds.report) == 0
    image, t = ds[0]
    assert image.shape == (3, 30, 40)
    # 1-based inclusive -> 0-based edges: the whole image 1..40 x 1..30 is [0, 0, 40, 30]
    assert t["boxes"].tolist() == [[0.0, 0.0, 40.0, 30.0], [4.0, 5.0, 10.0, 20.0]]
    assert t["labels"].tolist() == [VOC_CLASSES.index("chair") + 1, VOC_CLASSES.index("person") + 1]
    assert t["difficult"].tolist() == [False, True] and t["difficult"].dtype == torch.bool
    assert t["iscrowd"].tolist() == [0, 0]
    assert t["area"].tolist() == [1200.0, 90.0]
    assert t["image_id"].item() == 0
    assert ds.target(1)["boxes"].tolist() == [[10.0, 2.0, 11.0, 3.0]]
    assert ds.target(2)["boxes"].shape == (0, 4) and ds.target(2)["difficult"].shape == (0,)


def test_keep_difficult_false_and_drop_empty(tmp_path):
    ds = VocDetection(_voc(tmp_path), keep_difficult=False, drop_empty=True)
    assert ds.image_names == ["000005", "000007"]
    assert ds.target(0)["difficult"].tolist() == [False]


def test_user_class_list_and_unknown_class(tmp_path):
    root = make_voc(tmp_path / "v", {"a": [("circle", 2, 2, 9, 9, 0), ("blob", 2, 2, 9, 9, 0)]})
    ds = VocDetection(root, classes=["square", "circle"])
    assert ds.class_names == ["__background__", "square", "circle"]
    assert ds.target(0)["labels"].tolist() == [2]
    p = ds.report.problems[0]
    assert (p.action, p.kind, p.field) == (SKIPPED_ANNOTATION, "unknown class name", "name")
    assert "a.xml" in str(p) and "image a object 1" in str(p) and "'blob'" in str(p)
    assert scan_class_names(root, "train") == ["blob", "circle"]


@pytest.mark.parametrize(
    "obj, kind",
    [
        (("car", 9, 2, 5, 8, 0), "negative box size"),
        (("car", 50, 2, 60, 8, 0), "box outside image"),
        (("car", "nan", 2, 5, 8, 0), "non-finite box"),
        (("car", "x", 2, 5, 8, 0), "malformed box"),
    ],
)
def test_bad_boxes_skipped(tmp_path, obj, kind):
    ds = VocDetection(make_voc(tmp_path / "v", {"img": [obj]}))
    p = ds.report.problems[0]
    assert (p.action, p.kind, p.field) == (SKIPPED_ANNOTATION, kind, "bndbox")
    assert "img.xml" in str(p)
    assert ds.target(0)["boxes"].shape == (0, 4)


def test_box_partly_outside_clipped(tmp_path):
    ds = VocDetection(make_voc(tmp_path / "v", {"img": [("car", 30, 2, 45, 8, 0)]}))
    assert ds.report.problems[0].action == FIXED
    assert ds.target(0)["boxes"].tolist() == [[29.0, 1.0, 40.0, 8.0]]


def test_malformed_xml_names_file(tmp_path):
    root = _voc(tmp_path)
    (root / "Annotations" / "000007.xml").write_text("<annotation><size></annotation>")
    with pytest.raises(DataError, match=r"000007\.xml: malformed XML at line 1"):
        VocDetection(root)


def test_wrong_root_element(tmp_path):
    root = _voc(tmp_path)
    (root / "Annotations" / "000007.xml").write_text("<html></html>")
    with pytest.raises(DataError, match=r"000007\.xml: expected an <annotation> root"):
        VocDetection(root)


def test_missing_split_and_annotation(tmp_path):
    root = _voc(tmp_path)
    with pytest.raises(DataError, match=r"val\.txt: split file not found"):
        VocDetection(root, "val")
    (root / "Annotations" / "000009.xml").unlink()
    with pytest.raises(DataError, match=r"000009\.xml: annotation file not found"):
        VocDetection(root)


def test_duplicate_id_in_split(tmp_path):
    root = _voc(tmp_path)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000005\n000007\n000005\n")
    with pytest.raises(DataError, match=r"train\.txt: line 3: duplicate image id '000005' \(first on line 1\)"):
        VocDetection(root)


def test_filename_escaping_root(tmp_path):
    root = _voc(tmp_path)
    (root / "Annotations" / "000009.xml").write_text(voc_xml("../../x.jpg", 40, 30, []))
    with pytest.raises(DataError, match=r"000009\.xml: image 000009: filename: .*escapes"):
        VocDetection(root)


@pytest.mark.parametrize("width", ["abc", "0", "-3", "inf", "nan", "12.5"])
def test_bad_size_field(tmp_path, width):
    root = _voc(tmp_path)
    (root / "Annotations" / "000009.xml").write_text(voc_xml("000009.jpg", width, 30, []))
    with pytest.raises(DataError, match=r"000009\.xml: image 000009: size: expected positive integer"):
        VocDetection(root)


def test_split_entry_escaping_root(tmp_path):
    root = _voc(tmp_path)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000005\n../../../etc/passwd\n")
    with pytest.raises(DataError, match=r"train\.txt: image \.\./\.\./\.\./etc/passwd: image id: .*escapes"):
        VocDetection(root)


def test_missing_size_read_from_header(tmp_path):
    root = _voc(tmp_path)
    (root / "Annotations" / "000009.xml").write_text("<annotation><filename>000009.jpg</filename></annotation>")
    ds = VocDetection(root)
    assert ds.records[2].width == 40 and ds.records[2].height == 30


def test_missing_image_error_and_skip(tmp_path):
    root = _voc(tmp_path)
    (root / "JPEGImages" / "000007.jpg").unlink()
    ds = VocDetection(root)
    with pytest.raises(DataError, match=r"000007\.xml: image 000007: file_name: .*000007\.jpg: image file not found"):
        ds[1]
    ds = VocDetection(root, on_bad_image="skip")
    assert ds.image_names == ["000005", "000009"]
    p = ds.report.problems[0]
    assert (p.action, p.kind) == (SKIPPED_IMAGE, "missing image") and "000007.jpg" in str(p)


def test_png_filename_tag_is_used(tmp_path):
    root = _voc(tmp_path)
    make_image(root / "JPEGImages" / "000009.png", 40, 30)
    (root / "JPEGImages" / "000009.jpg").unlink()
    (root / "Annotations" / "000009.xml").write_text(voc_xml("000009.png", 40, 30, []))
    assert VocDetection(root)[2][0].shape == (3, 30, 40)


def test_bad_class_list(tmp_path):
    with pytest.raises(DataError, match="distinct"):
        VocDetection(_voc(tmp_path), classes=["a", "a"])


def test_missing_size_and_missing_image(tmp_path):
    root = _voc(tmp_path)
    (root / "Annotations" / "000009.xml").write_text("<annotation><filename>000009.jpg</filename></annotation>")
    (root / "JPEGImages" / "000009.jpg").unlink()
    with pytest.raises(DataError, match=r"000009\.xml: image 000009: size: missing, and .*000009\.jpg"):
        VocDetection(root)
    ds = VocDetection(root, on_bad_image="skip")
    assert ds.image_names == ["000005", "000007"]
    assert ds.report.problems[0].kind == "missing image"
