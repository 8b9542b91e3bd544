import json
import time

import numpy as np
import pytest
import torch

from fasterrcnn.data import CocoDetection, DataError, VocDetection
from fasterrcnn.data.synth import SynthParams, draw_image, generate

SMALL = dict(num_train=20, num_val=6, image_size=(96, 128), seed=3)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_valid_coco(tmp_path):
    paths = generate(tmp_path / "s", voc=True, **SMALL)
    assert paths.train_json == tmp_path / "s" / "annotations" / "instances_train.json"
    assert len(list(paths.train_images.glob("*.jpg"))) == 20 and len(list(paths.val_images.glob("*.jpg"))) == 6
    data = json.loads(paths.train_json.read_text())
    assert set(data) >= {"info", "images", "annotations", "categories"}
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
    assert [c["name"] for c in data["categories"]] == ["circle", "square", "triangle", "star"]
    val = json.loads(paths.val_json.read_text())
    assert [i["id"] for i in val["images"]] == list(range(21, 27))  # ids unique across splits
    for a in data["annotations"]:
        assert a["iscrowd"] == 0 and a["area"] > 0 and len(a["segmentation"][0]) >= 6
    voc = paths.voc_root
    assert (voc / "ImageSets" / "Main" / "train.txt").read_text().split() == [f"{i:06d}" for i in range(1, 21)]
    assert len(list((voc / "Annotations").glob("*.xml"))) == 26
    assert len(list((voc / "JPEGImages").glob("*.jpg"))) == 26


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_loads_in_pycocotools_and_reads_back_identically(tmp_path):
    from pycocotools.coco import COCO

    paths = generate(tmp_path / "s", voc=True, **SMALL)
    for split, json_path in (("train", paths.train_json), ("val", paths.val_json)):
        coco = COCO(str(json_path))
        ds = CocoDetection(json_path)
        assert ds.image_root == (paths.train_images if split == "train" else paths.val_images)
        assert len(ds.report) == 0 and sorted(ds.image_ids) == sorted(coco.getImgIds())
        voc = VocDetection(paths.voc_root, split, classes=ds.class_names[1:])
        assert len(voc.report) == 0
        for i, iid in enumerate(ds.image_ids):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[iid]))
            xyxy = torch.tensor(
                [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32
            ).reshape(-1, 4)
            t = ds.target(i)
            assert torch.equal(t["boxes"], xyxy)
            assert t["labels"].tolist() == [a["category_id"] for a in anns]
            assert coco.annToMask(anns[0]).sum() > 0 if anns else True
            tv = voc.target(i)
            assert voc.image_names[i] == f"{iid:06d}"
            assert torch.equal(tv["boxes"], t["boxes"]) and torch.equal(tv["labels"], t["labels"])
        image, _ = ds[0]
        assert image.shape == (3, 96, 128)


def test_deterministic_for_a_seed(tmp_path):
    a = _files(generate(tmp_path / "a", **SMALL).root)
    b = _files(generate(tmp_path / "b", workers=2, **{**SMALL, "num_train": 70}).root)
    c = _files(generate(tmp_path / "c", workers=1, **{**SMALL, "num_train": 70}).root)
    assert b == c  # worker processes do not change the output
    assert a["train/000003.jpg"] == b["train/000003.jpg"]  # an image depends on (seed, id) only
    d = _files(generate(tmp_path / "d", **{**SMALL, "seed": 4}).root)
    assert a["train/000003.jpg"] != d["train/000003.jpg"]


def test_identical_rerun_is_byte_identical(tmp_path):
    assert _files(generate(tmp_path / "a", **SMALL).root) == _files(generate(tmp_path / "b", **SMALL).root)


def test_reuse_and_regenerate(tmp_path):
    paths = generate(tmp_path / "s", **SMALL)
    stamp = paths.train_json.stat().st_mtime_ns
    time.sleep(0.01)
    again = generate(tmp_path / "s", **SMALL)
    assert again == paths and paths.train_json.stat().st_mtime_ns == stamp  # reused, not rewritten
    other = generate(tmp_path / "s", **{**SMALL, "num_train": 5})
    assert len(list(other.train_images.glob("*.jpg"))) == 5  # other parameters: regenerated
    assert json.loads(other.manifest.read_text())["params"]["num_train"] == 5


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not made by 'fasterrcnn synth'"):
        generate(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize(
    "bad",
    [
        dict(classes=("circle", "hexagon")),
        dict(classes=()),
        dict(image_size=(16, 16)),
        dict(num_train=-1),
        dict(min_object_size=200),
        dict(image_format="gif"),
        dict(empty_fraction=2.0),
    ],
)
def test_invalid_parameters(tmp_path, bad):
    with pytest.raises(DataError, match="synth"):
        generate(tmp_path / "s", **{**SMALL, **bad})


def test_boxes_are_tight_visible_extents():
    params = SynthParams(image_size=(96, 128), seed=0, max_objects=8, empty_fraction=0.0)
    overlaps = 0
    for image_id in range(1, 30):
        image, anns, inst = draw_image(params, image_id, return_instances=True)
        assert image.shape == (96, 128, 3) and image.dtype == np.uint8
        assert inst.max() == len(anns) >= 1
        for k, (label, (x, y, w, h), area, _polygon) in enumerate(anns, start=1):
            ys, xs = np.nonzero(inst == k)
            assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
            assert area == len(xs)
            assert 1 <= label <= 4
        boxes = [a[1] for a in anns]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[i], boxes[j]
                overlaps += x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1
    assert overlaps > 0  # objects do overlap sometimes


def test_variety_sizes_classes_and_empty_images(tmp_path):
    paths = generate(tmp_path / "s", num_train=120, num_val=0, seed=0)
    data = json.loads(paths.train_json.read_text())
    areas = np.array([a["bbox"][2] * a["bbox"][3] for a in data["annotations"]])
    assert (areas < 32**2).sum() > 20 and (areas >= 96**2).sum() > 5  # small to large
    assert min(a["bbox"][2] for a in data["annotations"]) <= 16
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3, 4}
    with_objects = {a["image_id"] for a in data["annotations"]}
    assert 3 <= 120 - len(with_objects) <= 30  # about 10% empty
    counts = np.bincount([a["category_id"] for a in data["annotations"]])[1:]
    assert counts.min() > 0.6 * counts.max()  # classes roughly balanced


def test_colour_does_not_determine_class():
    params = SynthParams(image_size=(96, 128), empty_fraction=0.0)
    colours = {}
    for image_id in range(1, 40):
        image, anns, inst = draw_image(params, image_id, return_instances=True)
        for k, (label, *_rest) in enumerate(anns, start=1):
            colours.setdefault(label, []).append(image[inst == k].mean(0))
    spreads = [np.std(np.array(c), axis=0).mean() for c in colours.values()]
    assert min(spreads) > 30  # every class comes in many colours


def test_other_shapes_and_png(tmp_path):
    paths = generate(
        tmp_path / "s",
        num_train=6,
        num_val=2,
        image_size=(64, 64),
        image_format="png",
        classes=("cross", "ellipse", "circle"),
    )
    ds = CocoDetection(paths.train_json)
    assert ds.class_names == ["__background__", "cross", "ellipse", "circle"]
    assert len(list(paths.train_images.glob("*.png"))) == 6
    assert ds[0][0].shape == (3, 64, 64)


def test_fast(tmp_path):
    start = time.perf_counter()
    generate(tmp_path / "s", num_train=150, num_val=50, seed=0)
    assert time.perf_counter() - start < 10.0  # ~1-2 s on two cores


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pycocotools_evaluation_runs_unchanged(tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    paths = generate(tmp_path / "s", **SMALL)
    gt = COCO(str(paths.val_json))
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # ground truth scored against itself: AP 1
