"""`fasterrcnn evaluate` on a checkpoint of a short run: the tables, the json files, and the errors."""

import json
from typing import ClassVar

import pytest
import torch

from fasterrcnn.cli import main
from fasterrcnn.data.coco import default_image_root
from fasterrcnn.engine.trainer import train

from .helpers import tiny_config


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = tiny_config(tmp, tmp / "synth", "train.iterations=2")
    return train(cfg, show_progress=False), tmp / "synth"


def test_evaluate_writes_coco_and_voc_numbers(short_run, tmp_path, capsys):
    result, synth = short_run
    out = tmp_path / "ev"
    rc = main(
        [
            "evaluate",
            "--weights",
            str(result.run_dir / "last.pt"),
            "--data",
            str(synth / "annotations" / "instances_val.json"),
            "--out",
            str(out),
            "--batch-size",
            "2",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "AP50" in text and "VOC2007 11-point" in text and "circle" in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"AP", "AP50", "AR100", "VOC07_mAP50", "VOC_mAP50"}
    assert json.loads((out / "eval.json").read_text())["AP"] == summary["AP"]
    results = json.loads((out / "predictions.json").read_text())
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)


def test_no_detections_gives_zero_with_a_message(short_run, tmp_path, capsys, monkeypatch):
    result, synth = short_run
    import fasterrcnn.inference.detector as detector  # evaluate loads through detector.load_weights

    original = detector.load_model_for_inference

    def silent_model(*args, **kwargs):
        model, names, mapping = original(*args, **kwargs)
        model.roi_heads.score_thresh = 1.1  # nothing can pass
        return model, names, mapping

    monkeypatch.setattr(detector, "load_model_for_inference", silent_model)
    rc = main(
        [
            "evaluate",
            "--weights",
            str(result.run_dir / "last.pt"),
            "--data",
            str(synth / "annotations" / "instances_val.json"),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "no detections" in text.lower()
    assert "AP      0.000" in text


def test_bad_weights_are_a_clear_error(tmp_path, short_run, capsys):
    _, synth = short_run
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(1)}, bad)
    rc = main(["evaluate", "--weights", str(bad), "--data", str(synth / "annotations" / "instances_val.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "Traceback" not in err


def test_ground_truth_moves_into_the_models_label_space():
    from fasterrcnn.engine.evaluator import targets_in_model_labels

    class Data:  # a COCO dataset with categories 3 and 7 as labels 1 and 2
        label_to_cat_id: ClassVar[dict[int, int]] = {1: 3, 2: 7}

        def __len__(self):
            return 1

        def target(self, i):
            return {
                "boxes": torch.tensor([[0.0, 0, 5, 5], [1.0, 1, 6, 6], [2.0, 2, 8, 8]]),
                "labels": torch.tensor([1, 2, 1]),
                "iscrowd": torch.zeros(3, dtype=torch.int64),
                "image_id": torch.tensor(5),
            }

    # a model in torchvision's layout (label == category id) that knows category 3 but not 7
    (t,) = targets_in_model_labels(Data(), {i: i for i in range(1, 5)})
    assert t["labels"].tolist() == [3, 3]
    assert t["boxes"].tolist() == [[0.0, 0, 5, 5], [2.0, 2, 8, 8]] and int(t["image_id"]) == 5
    (same,) = targets_in_model_labels(Data(), {1: 3, 2: 7})
    assert same["labels"].tolist() == [1, 2, 1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--device", "gpu"], "device 'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
        (["--weights", "{tmp}/nope.pt"], "weights file not found: {tmp}/nope.pt"),
        (["--data", "{tmp}/nope.json"], "nope.json: annotation file not found"),
        (["--out", "{tmp}/a_file/out"], "a_file/out"),
    ]
    + ([] if torch.cuda.is_available() else [(["--amp", "fp16"], "--amp fp16 needs a CUDA device")]),
)
def test_bad_values_are_clear_errors(short_run, tmp_path, capsys, args, message):
    result, synth = short_run
    (tmp_path / "a_file").write_text("not a folder")
    argv = [
        "evaluate",
        "--weights",
        str(result.run_dir / "last.pt"),
        "--data",
        str(synth / "annotations" / "instances_val.json"),
        "--batch-size",
        "2",
    ]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]  # (a repeated option: the last one counts)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    assert message.replace("{tmp}", str(tmp_path)) in err


def test_the_optimised_evaluation_scores_as_the_model_as_trained(short_run, tmp_path, capsys):
    result, synth = short_run
    summaries, predictions = {}, {}
    for flag in ("", "--no-optimize"):
        out = tmp_path / (flag or "optimised")
        argv = [
            "evaluate",
            "--weights",
            str(result.run_dir / "last.pt"),
            "--data",
            str(synth / "annotations" / "instances_val.json"),
            "--out",
            str(out),
        ]
        assert main(argv + ([flag] if flag else [])) == 0
        summaries[flag] = json.loads((out / "summary.json").read_text())
        predictions[flag] = json.loads((out / "predictions.json").read_text())
    capsys.readouterr()
    optimised, plain = predictions[""], predictions["--no-optimize"]
    assert len(plain) > 10  # the test has detections to compare
    assert len(optimised) == len(plain)
    # the same detections up to float rounding (BatchNorm folded, channels-last, fc6's columns permuted)
    key = lambda r: (r["image_id"], r["category_id"], -r["score"])  # noqa: E731
    for a, b in zip(sorted(optimised, key=key), sorted(plain, key=key)):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert abs(a["score"] - b["score"]) < 1e-4
        assert max(abs(u - v) for u, v in zip(a["bbox"], b["bbox"])) < 0.05
    for name in ("AP", "AP50", "VOC_mAP50"):
        assert abs(summaries[""][name] - summaries["--no-optimize"][name]) < 2e-3, name


def test_evaluate_in_bf16_runs_the_network_in_bf16(short_run, tmp_path, capsys, monkeypatch):
    result, synth = short_run
    import fasterrcnn.engine.evaluator as evaluator

    seen = []
    original = evaluator.predict_dataset

    def spy(model, *args, **kwargs):
        seen.append((model.backbone.body.conv1.weight.dtype, kwargs.get("amp")))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(evaluator, "predict_dataset", spy)
    out = tmp_path / "bf16"
    assert (
        main(
            [
                "evaluate",
                "--weights",
                str(result.run_dir / "last.pt"),
                "--amp",
                "bf16",
                "--data",
                str(synth / "annotations" / "instances_val.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    # the optimised copy is cast to bfloat16 (no autocast on top), and the detections come back as usual
    assert seen == [(torch.bfloat16, "none")]
    assert len(json.loads((out / "predictions.json").read_text())) > 10


def _renumbered(src, dst, new_ids):
    """The json at ``src`` with its categories renumbered ``{old id: new id}`` (or renamed, for str values)."""
    data = json.loads(src.read_text())
    for cat in data["categories"]:
        new = new_ids[cat["id"]]
        if isinstance(new, str):
            cat["name"] = new
        else:
            cat["id"] = new
    for ann in data["annotations"]:
        new = new_ids[ann["category_id"]]
        ann["category_id"] = ann["category_id"] if isinstance(new, str) else new
    dst.write_text(json.dumps(data))
    return dst, data["categories"]


@pytest.mark.parametrize("kind", ["swapped", "far"])
def test_categories_are_matched_by_name_not_id(short_run, tmp_path, capsys, kind):
    """Issue 20 #2: ids assigned in another order (names swapped between two ids) scored under the
    wrong names; the same names under ids 7/42/1000 raised after the whole inference."""
    result, synth = short_run
    val = synth / "annotations" / "instances_val.json"
    ids = sorted(c["id"] for c in json.loads(val.read_text())["categories"])
    new_ids = dict(zip(ids, list(reversed(ids)) if kind == "swapped" else [7, 42, 1000, 5000][: len(ids)]))
    other, _ = _renumbered(val, tmp_path / "instances_val.json", new_ids)
    weights = str(result.run_dir / "last.pt")
    assert main(["evaluate", "--weights", weights, "--data", str(val), "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--weights",
                weights,
                "--data",
                str(other),
                "--images",
                str(default_image_root(val)),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "categories matched by name" in text
    assert json.loads((tmp_path / "a" / "summary.json").read_text()) == json.loads(
        (tmp_path / "b" / "summary.json").read_text()
    )
    # every detection lands in the category of the same name as before
    for folder, ann in (("a", val), ("b", other)):
        names = {c["id"]: c["name"] for c in json.loads(ann.read_text())["categories"]}
        found = [
            (r["image_id"], names[r["category_id"]], r["score"])
            for r in json.loads((tmp_path / folder / "predictions.json").read_text())
        ]
        if folder == "a":
            expected = sorted(found)
        else:
            assert sorted(found) == expected and found


def test_match_categories_by_name_unit():
    from fasterrcnn.data.report import DataError
    from fasterrcnn.engine.evaluator import match_categories_by_name

    model = ["__background__", "triangle", "star", "moon"]  # checkpoint: triangle=3, star=4, moon=9
    mapping, notes = match_categories_by_name(
        model,
        {1: 3, 2: 4, 3: 9},
        ["__background__", "star", "triangle"],
        {1: 3, 2: 4},
        data_source="val.json",
        model_source="w.pt",
    )
    assert mapping == {1: 4, 2: 3}  # triangle -> the json's 4, star -> its 3; moon not in the data
    assert "'star' (model id 4, data id 3)" in notes[0] and "moon" in notes[1]
    with pytest.raises(DataError, match=r"val.json: categories 'sun' \(id 5\) are not classes of the model in w.pt"):
        match_categories_by_name(
            model, {1: 3, 2: 4, 3: 9}, ["__background__", "sun"], {1: 5}, data_source="val.json", model_source="w.pt"
        )


def test_other_category_names_are_refused_before_inference(short_run, tmp_path, capsys, monkeypatch):
    import fasterrcnn.engine.evaluator as evaluator

    result, synth = short_run
    val = synth / "annotations" / "instances_val.json"
    ids = [c["id"] for c in json.loads(val.read_text())["categories"]]
    other, _ = _renumbered(val, tmp_path / "instances_val.json", {i: f"thing{i}" for i in ids})

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran")

    monkeypatch.setattr(evaluator, "predict_dataset", no_inference)
    rc = main(
        [
            "evaluate",
            "--weights",
            str(result.run_dir / "last.pt"),
            "--data",
            str(other),
            "--images",
            str(default_image_root(val)),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "'thing" in err and "not classes of the model" in err and "Traceback" not in err


def test_out_that_is_a_file_or_cannot_be_made_names_the_option(short_run, tmp_path, capsys):
    """Issue 20 #8: --out on an existing file or an unwritable place printed a raw [Errno 17]/[Errno 2]."""
    result, synth = short_run
    (tmp_path / "file").write_text("x")
    for out, needle in ((tmp_path / "file", "this is a file"), (tmp_path / "file" / "sub", "cannot create")):
        rc = main(
            [
                "evaluate",
                "--weights",
                str(result.run_dir / "last.pt"),
                "--data",
                str(synth / "annotations" / "instances_val.json"),
                "--out",
                str(out),
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2 and f"--out {out}" in err and needle in err and "[Errno" not in err


def test_an_image_the_model_cannot_use_is_scored_empty_named_and_counted(caplog):
    """Issue 20 #1 (evaluate side): one unusable image (NaN pixels here) must not stop the evaluation."""
    from fasterrcnn.engine.evaluator import predict_dataset

    from ..model.helpers import tiny_model

    nan = torch.rand(3, 40, 50)
    nan[0, 1, 2] = float("nan")
    items = [
        (torch.rand(3, 40, 50), {"image_id": torch.tensor(1)}),
        (nan, {"image_id": torch.tensor(2)}),
        (torch.rand(3, 1, 400), {"image_id": torch.tensor(3)}),
    ]

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    model = tiny_model(box_score_thresh=0.0)
    ids, dets = predict_dataset(model, Items(), batch_size=3, show_progress=False)
    assert ids == [1, 2, 3] and len(dets[1]["boxes"]) == 0 and len(dets[0]["boxes"]) > 0
    assert "1 image(s) the model cannot use" in caplog.text and "image id 2: 1 of its 6000 pixel values" in caplog.text


def test_evaluate_writes_the_error_analysis_of_its_own_detections(short_run, tmp_path, capsys):
    """Issue 18: confusion matrix (PNG and CSV), F1 curve and error grid; the CSV's counts are those of the
    detections evaluate wrote to predictions.json against the ground truth of the json it read."""
    import csv

    from PIL import Image

    from fasterrcnn.evaluation.confusion import confusion_matrix

    result, synth = short_run
    val = synth / "annotations" / "instances_val.json"
    out = tmp_path / "ev"
    args = ["evaluate", "--weights", str(result.run_dir / "last.pt"), "--data", str(val), "--out", str(out)]
    assert main([*args, "--score-threshold", "0.05", "--iou-threshold", "0.4"]) == 0
    text = capsys.readouterr().out
    assert "best F1" in text and "the --score-threshold for predict" in text
    for name in ("confusion_matrix.png", "f1_curve.png", "val_predictions.jpg"):
        assert Image.open(out / name).size[0] > 300, name
    with open(out / "confusion_matrix.csv", newline="") as f:
        table = list(csv.reader(f))
    header, body = table[0], table[1 : table.index([])]
    assert header[1:] == ["circle", "square", "triangle", "star", "background"]
    counts = [[int(v) for v in row[1:]] for row in body]
    gt = json.loads(val.read_text())
    dets = json.loads((out / "predictions.json").read_text())
    images = []
    for image in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        mine = [d for d in dets if d["image_id"] == image["id"]]

        def xyxy(records):
            return torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in records)]).reshape(-1, 4)

        images.append(
            {
                "gt_boxes": xyxy(anns),
                "gt_labels": torch.tensor([a["category_id"] for a in anns]),
                "gt_crowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
                "det_boxes": xyxy(mine),
                "det_labels": torch.tensor([d["category_id"] for d in mine]),
                "det_scores": torch.tensor([d["score"] for d in mine]),
            }
        )
    names = ["__background__", "circle", "square", "triangle", "star"]
    expected = confusion_matrix(images=images, class_names=names, score_threshold=0.05, iou_threshold=0.4)
    assert counts == expected.counts.tolist()
    assert sum(map(sum, counts)) > 0


@pytest.mark.parametrize("flag, value", [("--score-threshold", "1.5"), ("--iou-threshold", "-1")])
def test_thresholds_outside_zero_one_are_usage_errors(short_run, flag, value, capsys):
    result, synth = short_run
    val = synth / "annotations" / "instances_val.json"
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--weights", str(result.run_dir / "last.pt"), "--data", str(val), flag, value])
    assert e.value.code == 2 and "expected a number in [0, 1]" in capsys.readouterr().err
