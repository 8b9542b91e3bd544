"""`fasterrcnn explain` on a training checkpoint: the figures, the summary, and the errors."""

import pytest
import torch

from fasterrcnn.cli import main
from fasterrcnn.engine.setup import build_model
from fasterrcnn.explain.figures import FIGURES

from ..engine.helpers import tiny_config
from .helpers import CLASSES, synth_example


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain_cli")
    paths, image_path, _, _ = synth_example(tmp / "synth")
    cfg = tiny_config(tmp, tmp / "synth")
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=len(CLASSES))
    ckpt = tmp / "last.pt"  # what the trainer writes, less the optimizer and RNG states
    torch.save(
        {
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "class_names": CLASSES,
            "label_to_cat_id": {i: i for i in range(1, len(CLASSES))},
        },
        ckpt,
    )
    return ckpt, paths, image_path


def test_explain_with_coco_annotations_into_the_default_folder(setup, tmp_path, monkeypatch, capsys):
    ckpt, paths, image_path = setup
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "explain",
            "--weights",
            str(ckpt),
            str(image_path),
            "--annotations",
            str(paths.val_json),
            "--device",
            "cpu",
            "--score-threshold",
            "0.1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    folder = tmp_path / "explain" / image_path.stem
    for name in FIGURES:
        assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = (folder / "summary.txt").read_text()
    assert summary in out and "written: explain/" in out
    assert [line.split()[0] for line in summary.splitlines() if not line.startswith(" ")] == [
        "preprocess",
        "features",
        "propose",
        "detect",
        "postprocess",
    ]


def test_explain_with_voc_xml_and_options(setup, tmp_path, capsys, monkeypatch):
    import fasterrcnn.explain.figures

    ckpt, _, image_path = setup
    # the figures were drawn through the command above; here only the ground truth and the options matter
    drawn = {}
    monkeypatch.setattr(
        fasterrcnn.explain.figures,
        "write_explain_figures",
        lambda trace, out, **kwargs: drawn.update(kwargs, trace=trace) or {},
    )
    xml = tmp_path / "img.xml"
    xml.write_text(
        "<annotation><object><name>circle</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>50</xmax>"
        "<ymax>60</ymax></bndbox></object><object><name>dragon</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"
    )
    out = tmp_path / "ex"
    rc = main(
        [
            "explain",
            "--weights",
            str(ckpt),
            str(image_path),
            "--annotations",
            str(xml),
            "--out",
            str(out),
            "--level",
            "P5",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "note:" in text and "dragon" in text  # the class the model does not know, left out
    assert "1 gt boxes" in (out / "summary.txt").read_text()
    assert drawn["level"] == 3 and drawn["score_threshold"] == 0.5  # P5, and the default threshold
    assert drawn["trace"].anchor_labels.gt_boxes.tolist() == [[10.0, 20.0, 50.0, 60.0]]  # 96x120: not resized


@pytest.mark.parametrize("case", ["missing image", "image not in json", "bad level", "bad weights"])
def test_bad_input_is_a_clear_error(setup, tmp_path, capsys, case):
    ckpt, paths, image_path = setup
    args = ["explain", "--weights", str(ckpt), str(image_path), "--out", str(tmp_path / "o"), "--device", "cpu"]
    if case == "missing image":
        args[3], expected = str(tmp_path / "nope.jpg"), "nope.jpg"
    elif case == "image not in json":
        args += ["--annotations", str(paths.train_json)]
        expected = "instances_train.json"
    elif case == "bad level":
        args += ["--level", "P9"]
        expected = "P9"
    else:
        bad = tmp_path / "bad.pt"
        torch.save({"something": torch.zeros(1)}, bad)
        args[2], expected = str(bad), "bad.pt"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and expected in err and "Traceback" not in err
