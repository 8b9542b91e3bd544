"""`fasterrcnn predict`: files, folders and globs in; a COCO results json that pycocotools loads,
the images' records, and annotated copies out; unreadable images skipped and reported."""

import json

import matplotlib.cbook
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fasterrcnn.cli import main
from fasterrcnn.inference.predict_files import collect_images, output_names


@pytest.fixture
def photos(tmp_path):
    """A folder of real photographs (matplotlib ships one), in two formats and a sub-folder."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    hopper = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    hopper = hopper.resize((hopper.width // 4, hopper.height // 4))  # 128 x 150: quick on two cores
    hopper.save(folder / "hopper.jpg", quality=95)
    hopper.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "hopper_flipped.png")
    hopper.crop((10, 10, 110, 130)).save(folder / "more" / "crop.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_a_folder_writes_results_pycocotools_loads(tiny_checkpoint, photos, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "pred"
    rc = main(
        [
            "predict",
            str(photos),
            "--recursive",
            "--weights",
            str(ckpt),
            "--out",
            str(out),
            "--score-threshold",
            "0",
            "--batch-size",
            "2",
            "--workers",
            "0",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "in 3 images" in text and str(out / "predictions.json") in text
    records = json.loads((out / "images.json").read_text())
    assert [r["file_name"] for r in records["images"]] == ["hopper.jpg", "hopper_flipped.png", "more/crop.jpg"]
    assert [r["id"] for r in records["images"]] == [1, 2, 3]
    assert records["images"][0]["width"] == 128 and records["images"][2]["height"] == 120
    assert [c["name"] for c in records["categories"]] == ["circle", "square", "triangle", "star"]
    for name in ("hopper.jpg", "hopper_flipped.png", "more/crop.jpg"):
        drawn = Image.open(out / "images" / name)
        assert drawn.size == Image.open(photos / name).size
    results = json.loads((out / "predictions.json").read_text())
    assert results and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    # a matching ground truth: the images' records plus one box each; loadRes and COCOeval accept the results
    gt = COCO()
    gt.dataset = {
        **records,
        "annotations": [
            {"id": r["id"], "image_id": r["id"], "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0}
            for r in records["images"]
        ],
    }
    gt.createIndex()
    dt = gt.loadRes(str(out / "predictions.json"))
    assert len(dt.getAnnIds()) == len(results)
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    assert ev.eval["precision"].shape[2] == 4  # one column per category of the checkpoint


def test_annotation_ids_are_used_and_missing_names_refused(tiny_checkpoint, photos, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    ann = tmp_path / "gt.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 42, "file_name": "val/hopper.jpg"}, {"id": 7, "file_name": "hopper_flipped.png"}],
                "annotations": [],
                "categories": [],
            }
        )
    )
    out = tmp_path / "pred"
    rc = main(
        [
            "predict",
            str(photos / "hopper.jpg"),
            str(photos / "hopper_flipped.png"),
            "--weights",
            str(ckpt),
            "--out",
            str(out),
            "--annotations",
            str(ann),
            "--score-threshold",
            "0",
            "--no-images",
        ]
    )
    assert rc == 0
    ids = {r["image_id"] for r in json.loads((out / "predictions.json").read_text())}
    assert ids <= {42, 7} and ids
    assert not (out / "images").exists()
    rc = main(
        ["predict", str(photos), "--recursive", "--weights", str(ckpt), "--out", str(out), "--annotations", str(ann)]
    )
    assert rc == 2
    assert "gt.json: no unique images[].file_name for 1 of the images: more/crop.jpg" in capsys.readouterr().err


def test_unreadable_image_is_skipped_and_reported(tiny_checkpoint, photos, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "pred"
    rc = main(["predict", str(photos), "--weights", str(ckpt), "--out", str(out), "--workers", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "skipped 1 image(s) that could not be read" in err and "broken.jpg" in err
    names = [r["file_name"] for r in json.loads((out / "images.json").read_text())["images"]]
    assert names == ["hopper.jpg", "hopper_flipped.png"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nowhere/"], "nowhere/: no such file or folder"),
        (["{tmp}/*.bmp"], r"\*.bmp: the pattern matches no image or video file"),
        (["{tmp}/empty"], "empty: no image or video files in this folder"),
    ],
)
def test_sources_that_name_nothing_are_errors(tiny_checkpoint, tmp_path, capsys, argv, message):
    import re

    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(["predict", *argv, "--weights", str(tiny_checkpoint[0]), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flag, value", [("--score-threshold", "1.5"), ("--batch-size", "0"), ("--workers", "-1")])
def test_bad_option_values_are_usage_errors(tiny_checkpoint, photos, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", str(photos), "--weights", str(tiny_checkpoint[0]), flag, value])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_globs_and_names(photos):
    found = collect_images([str(photos / "**" / "*.jpg")])
    assert [p.name for p in found] == ["hopper.jpg", "crop.jpg"]
    assert collect_images([str(photos / "hopper.jpg"), str(photos)]) == collect_images([str(photos)])
    assert output_names([photos / "a" / "x.jpg", photos / "b" / "x.jpg"]) == ["a/x.jpg", "b/x.jpg"]


def test_a_failure_midway_leaves_the_previous_json_whole(tmp_path):
    from fasterrcnn.inference.predict_files import JsonArrayWriter

    path = tmp_path / "predictions.json"
    with JsonArrayWriter(path) as w:
        w.write({"a": 1})
        w.write({"a": 2})
    assert json.loads(path.read_text()) == [{"a": 1}, {"a": 2}]
    with pytest.raises(RuntimeError), JsonArrayWriter(path) as w:
        w.write({"a": 3})
        raise RuntimeError("killed midway")
    assert json.loads(path.read_text()) == [{"a": 1}, {"a": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.json"]  # no temporary file left
