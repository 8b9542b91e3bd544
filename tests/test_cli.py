import json
import subprocess
import sys

import pytest

from fasterrcnn.cli import SUBCOMMANDS, build_parser, main


def test_subcommands_are_registered():
    names = [c.name for c in SUBCOMMANDS]
    assert "synth" in names and "check-data" in names
    assert len(names) == len(set(names))


def test_synth_then_check_data(tmp_path, capsys):
    out = tmp_path / "s"
    rc = main(
        ["synth", "--out", str(out), "--num-train", "6", "--num-val", "2", "--seed", "1", "--size", "64x96", "--voc"]
    )
    assert rc == 0
    assert "synthetic dataset in" in capsys.readouterr().out
    data = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert len(data["images"]) == 6 and data["images"][0]["width"] == 96 and data["images"][0]["height"] == 64
    assert (out / "VOC" / "ImageSets" / "Main" / "val.txt").exists()

    assert main(["check-data", str(out / "annotations" / "instances_train.json")]) == 0
    text = capsys.readouterr().out
    assert "COCO dataset" in text and "circle" in text and "no problems" in text
    assert main(["check-data", str(out / "VOC"), "--split", "val", "--classes", "circle,square,triangle,star"]) == 0
    assert "VOC dataset" in capsys.readouterr().out


def test_check_data_with_problems_exits_1(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    ann = {
        "images": [{"id": 1, "file_name": "gone.jpg", "width": 4, "height": 4}],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    assert main(["check-data", str(tmp_path / "ann.json"), "--images", str(tmp_path / "imgs")]) == 1
    out = capsys.readouterr().out
    assert "gone.jpg" in out and "missing image" in out


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda p: p.write_text("{not json"), "ann.json: malformed json"),
        (
            lambda p: p.write_text(
                json.dumps(
                    {
                        "images": [{"id": 1, "file_name": "../x.jpg", "width": 2, "height": 2}],
                        "categories": [{"id": 1, "name": "a"}],
                    }
                )
            ),
            "escapes the image root",
        ),
        (lambda p: None, "ann.json: not found"),
    ],
)
def test_bad_input_prints_error_and_exits_2(tmp_path, capsys, setup, needle):
    setup(tmp_path / "ann.json")
    assert main(["check-data", str(tmp_path / "ann.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_bad_synth_options(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--classes", "circle,blob"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["synth", "--out", "x", "--size", "big"])
    assert e.value.code == 2
    assert "expected HxW" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "fasterrcnn", "check-data", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'none.json'}: not found (expected a COCO json file or a VOC root)"


def _fake_run_checkpoint(tmp_path):
    """A file with what `train --resume` reads first (the run's config), enough to reach its checks."""
    import torch

    from fasterrcnn.engine.config import Config

    path = tmp_path / "last.pt"
    torch.save({"model": {}, "config": Config().to_dict(), "class_names": ["__background__", "a"]}, path)
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--resume", "{tmp}/last.pt", "--config", "my.yaml"],
            "continues the run with the config saved in the checkpoint; drop --config my.yaml",
        ),
        (
            ["--resume", "{tmp}/last.pt", "solver.lr=0.1"],
            "--resume {tmp}/last.pt: cannot change 'solver.lr': only "
            "data.workers, train.threads, train.device, train.log_every",
        ),
        (["--resume", "{tmp}/last.pt", "data.workers=-1"], "data.workers must be >= 0"),
        (["--resume", "{tmp}/gone.pt"], "checkpoint not found: {tmp}/gone.pt"),
        (
            ["--resume", "{tmp}/garbage.pt"],
            "refusing to load {tmp}/garbage.pt: it is not a file of tensors and plain data",
        ),
        (["--resume", "{tmp}/cut.pt"], "cannot read checkpoint {tmp}/cut.pt: RuntimeError"),
        (["--resume", "{tmp}/weights.pt"], "{tmp}/weights.pt is not a training checkpoint of this project"),
        (["solver.lr=-1"], "solver.lr must be > 0"),
        (["--config", "{tmp}/none.yaml"], "config file not found: {tmp}/none.yaml"),
    ],
)
def test_train_command_line_errors(tmp_path, capsys, argv, message):
    import torch

    _fake_run_checkpoint(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "weights.pt")
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # a checkpoint cut short
    rc = main(["train", *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    assert message.replace("{tmp}", str(tmp_path)) in err


def test_ablate_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["ablate", "--iterations", "0"])
    assert e.value.code == 2 and "--iterations" in capsys.readouterr().err
    rc = main(["ablate", "--out", str(tmp_path / "o"), "--data", "a.json", "b.json", "c.json"])
    err = capsys.readouterr().err
    assert rc == 2 and "--data takes" in err and "Traceback" not in err
    assert main(["ablate", "--out", str(tmp_path / "o"), "--cells", "no_such_cell"]) == 2
    assert "unknown ablation cell" in capsys.readouterr().err
