"""Issue 20, inference side: thin images, symlinks, partial results, stale drawings, file modes and
the messages for --out, --weights and batch_size."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn import Detector
from fasterrcnn.cli import main
from fasterrcnn.inference.predict_files import collect_images, output_names

from ..model.helpers import tiny_model

THIN = [(1, 4000), (4000, 1), (3, 2000)]  # (height, width): resized to 0 pixels on one side before


@pytest.fixture
def thin_folder(tmp_path):
    folder = tmp_path / "thin"
    folder.mkdir()
    g = np.random.default_rng(0)
    for h, w in THIN + [(90, 120)]:
        Image.fromarray(g.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / f"img_{h}x{w}.png")
    return folder


def test_thin_images_are_predicted_not_a_crash(tiny_checkpoint, thin_folder, tmp_path, capsys):
    """#1: a 1x4000, 4000x1 or 3x2000 image crashed the whole run (`Input and output sizes should be
    greater than 0`), with no predictions.json."""
    out = tmp_path / "pred"
    rc = main(
        [
            "predict",
            str(thin_folder),
            "--weights",
            str(tiny_checkpoint[0]),
            "--out",
            str(out),
            "--score-threshold",
            "0",
            "--workers",
            "0",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    records = json.loads((out / "images.json").read_text())
    assert sorted((r["height"], r["width"]) for r in records["images"]) == sorted(THIN + [(90, 120)])
    assert records["partial"] is False


def test_the_model_keeps_a_side_of_at_least_one_pixel():
    model = tiny_model().eval()
    for h, w in THIN + [(1, 1)]:
        images, _ = model.transform([torch.rand(3, h, w)])
        ((rh, rw),) = images.image_sizes
        scale = min(128 / min(h, w), 192 / max(h, w))  # tiny_model: min_size 128, max_size 192
        assert (rh, rw) == (max(1, int(h * scale)), max(1, int(w * scale)))
        with torch.no_grad():
            out = model([torch.rand(3, h, w)])[0]
        assert out["boxes"].shape[1] == 4 and torch.isfinite(out["boxes"]).all()


def test_detector_thin_images_and_unusable_images_are_named(tmp_path):
    detector = Detector(tiny_model().eval(), ["__background__", "a", "b", "c"])
    for h, w in THIN:
        assert len(detector(torch.rand(3, h, w))) >= 0
    nan = torch.rand(3, 20, 30)
    nan[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"image 1: 1 of its 1800 pixel values are NaN or infinite"):
        detector([torch.rand(3, 20, 30), nan])
    with pytest.raises(ValueError, match=r"image 0: empty image of shape \(3, 0, 5\)"):
        detector(torch.rand(3, 0, 5))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_batch_size_below_one_is_a_clear_error(bad):
    """#8: Detector(..., batch_size=0) said `range() arg 3 must not be zero`."""
    detector = Detector(tiny_model().eval(), ["__background__", "a", "b", "c"])
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        detector([torch.rand(3, 20, 20)], batch_size=bad)


def test_symlinks_keep_their_own_names(tiny_checkpoint, thin_folder, tmp_path, capsys):
    """#6: results took the link target's name, two links to one file became one result, and
    --annotations matching by file name failed."""
    links = tmp_path / "links"
    links.mkdir()
    target = thin_folder / "img_90x120.png"
    os.symlink(target, links / "first.png")
    os.symlink(target, links / "second.png")
    found = collect_images([str(links)])
    assert [p.name for p in found] == ["first.png", "second.png"]
    assert output_names(found) == ["first.png", "second.png"]
    ann = tmp_path / "gt.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 5, "file_name": "first.png"}, {"id": 6, "file_name": "second.png"}],
                "annotations": [],
                "categories": [],
            }
        )
    )
    out = tmp_path / "pred"
    rc = main(
        [
            "predict",
            str(links),
            "--weights",
            str(tiny_checkpoint[0]),
            "--out",
            str(out),
            "--annotations",
            str(ann),
            "--workers",
            "0",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    images = json.loads((out / "images.json").read_text())["images"]
    assert [(r["id"], r["file_name"]) for r in images] == [(5, "first.png"), (6, "second.png")]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["first.png", "second.png"]


def test_results_files_get_the_umask_mode(tiny_checkpoint, thin_folder, tmp_path):
    """Smaller: predictions.json and images.json were 0600 while everything else was 0644."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "pred"
        assert (
            main(
                [
                    "predict",
                    str(thin_folder / "img_90x120.png"),
                    "--weights",
                    str(tiny_checkpoint[0]),
                    "--out",
                    str(out),
                    "--workers",
                    "0",
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    for name in ("predictions.json", "images.json", "images/img_90x120.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_or_failing_run_writes_what_is_done_marked_partial(
    tiny_checkpoint, thin_folder, tmp_path, monkeypatch, caplog, stop
):
    """Smaller: an interrupted predict discarded the finished results."""
    real_detect = Detector.detect
    calls = []

    def detect(self, images):
        calls.append(1)
        if len(calls) == 3:
            raise stop("stopped on the third batch")
        return real_detect(self, images)

    monkeypatch.setattr(Detector, "detect", detect)
    out = tmp_path / "pred"
    rc = (
        main(
            [
                "predict",
                str(thin_folder),
                "--weights",
                str(tiny_checkpoint[0]),
                "--out",
                str(out),
                "--workers",
                "0",
                "--score-threshold",
                "0",
            ]
        )
        if stop is KeyboardInterrupt
        else None
    )
    if stop is RuntimeError:
        with pytest.raises(RuntimeError):
            main(
                [
                    "predict",
                    str(thin_folder),
                    "--weights",
                    str(tiny_checkpoint[0]),
                    "--out",
                    str(out),
                    "--workers",
                    "0",
                    "--score-threshold",
                    "0",
                ]
            )
    else:
        assert rc == 130
    records = json.loads((out / "images.json").read_text())
    assert records["partial"] is True and len(records["images"]) == 2
    results = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in results} <= {r["id"] for r in records["images"]}
    assert "predict stopped after 2 of 4 images" in caplog.text and '"partial": true' in caplog.text


def test_stale_drawings_of_an_earlier_run_are_removed(tiny_checkpoint, thin_folder, tmp_path):
    """Smaller: stale annotated images stayed beside new results in a reused --out."""
    out = tmp_path / "pred"
    assert (
        main(["predict", str(thin_folder), "--weights", str(tiny_checkpoint[0]), "--out", str(out), "--workers", "0"])
        == 0
    )
    (out / "images" / "mine.txt").write_text("not ours")
    assert (
        main(
            [
                "predict",
                str(thin_folder / "img_90x120.png"),
                "--weights",
                str(tiny_checkpoint[0]),
                "--out",
                str(out),
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (out / "images").iterdir()) == ["img_90x120.png", "mine.txt"]


def test_out_that_is_a_file_or_cannot_be_made_names_the_option(tiny_checkpoint, thin_folder, tmp_path, capsys):
    """#8: --out on an existing file or an unwritable path printed a raw [Errno 17] / [Errno 2]."""
    (tmp_path / "file").write_text("x")
    for out, needle in ((tmp_path / "file", "this is a file"), (tmp_path / "file" / "sub", "cannot create")):
        rc = main(["predict", str(thin_folder), "--weights", str(tiny_checkpoint[0]), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"--out {out}" in err and needle in err and "[Errno" not in err


def test_weights_messages_say_what_the_file_is(tiny_checkpoint, thin_folder, tmp_path, capsys):
    """#8: a folder as --weights was "not found"; a JSON file was said to need unpickling that "can
    run any code"; a bare state_dict of another architecture never said which --arch was assumed."""
    run_dir = tiny_checkpoint[0].parent
    rc = main(["predict", str(thin_folder), "--weights", str(run_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "a folder, not a weights file" in err and "last.pt" in err
    (tmp_path / "w.json").write_text('{"model": {}}')
    rc = main(["predict", str(thin_folder), "--weights", str(tmp_path / "w.json"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a PyTorch weights file at all" in err and "JSON" in err and "any code" not in err
    torch.save(tiny_model().state_dict(), tmp_path / "bare.pt")
    rc = main(["predict", str(thin_folder), "--weights", str(tmp_path / "bare.pt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "built as --arch fasterrcnn_resnet50_fpn" in err and "pass the --arch" in err
