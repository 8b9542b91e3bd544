"""Issue 20, the training side: a run checks before any work that its data has objects for the
classes it trains and that every image file it will read exists (validation images included);
a second Ctrl-C during a checkpoint write aborts cleanly; --resume names what is wrong with the
file given; a run name is a plain folder name; iterations and epochs are not both given; a failed
run leaves no empty run folder."""

import logging
import os
import signal

import pytest

from fasterrcnn.cli import main
from fasterrcnn.data import CocoDetection
from fasterrcnn.engine import preflight
from fasterrcnn.engine.checkpoint import load_checkpoint
from fasterrcnn.engine.config import ConfigError, load_config
from fasterrcnn.engine.setup import build_data
from fasterrcnn.files import stale_temps

from ..data.helpers import make_voc, simple_coco
from .helpers import TINY_MODEL, tiny_config

TINY = [f"model.options.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "model.arch=fasterrcnn_resnet18_fpn",
    "train.iterations=2",
    "train.batch_size=1",
    "data.workers=0",
    "train.name=t",
    "train.device=cpu",
]


def _train(tmp_path, capsys, *overrides):
    rc = main(["train", *TINY, f"train.out_dir={tmp_path / 'runs'}", *overrides])
    return rc, capsys.readouterr().err


def test_a_voc_root_with_its_own_class_names_is_refused_before_training(tmp_path, capsys):
    """Issue 20 #3: without data.voc_classes the 20 VOC classes were used and every object dropped;
    the run trained on nothing and exited 0. Now: an error naming the root and data.voc_classes, and
    no run folder left behind."""
    items = {"a": [("widget", 2, 3, 20, 20, 0)], "b": [("gadget", 5, 5, 30, 25, 0)]}
    root = make_voc(tmp_path / "voc", items, split="train")
    make_voc(root, items, split="val")
    rc, err = _train(tmp_path, capsys, f"data.train={root}", "data.format=voc")
    assert rc == 2
    assert str(root) in err and "no object" in err and "data.voc_classes=['gadget', 'widget']" in err
    assert not (tmp_path / "runs" / "t").exists()  # the failed run removed the folder it made


@pytest.mark.parametrize(
    "annotations, needle",
    [
        ([{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5], "iscrowd": 1}], "all crowd boxes"),
        ([], "no usable annotation"),
    ],
)
def test_a_coco_set_with_only_crowd_boxes_or_no_annotations_is_refused(tmp_path, capsys, annotations, needle):
    """Issue 20 #3: a COCO set with only crowd boxes, or none, trained with no warning at all."""
    ann = simple_coco(tmp_path / "coco", annotations=annotations)
    rc, err = _train(tmp_path, capsys, f"data.train={ann}", f"data.train_images={ann.parent / 'images'}")
    assert rc == 2 and str(ann) in err and "no object" in err and needle in err and "data.train" in err
    assert not (tmp_path / "runs" / "t").exists()


def test_classes_without_objects_are_a_warning(tmp_path, caplog):
    ann = simple_coco(tmp_path / "coco")  # categories a and b, one box of a
    with caplog.at_level(logging.WARNING, logger="fasterrcnn"):
        preflight.check_training_objects(CocoDetection(ann), voc_classes_option=False)
    assert "1 of the 2 classes have no object in the training set" in caplog.text and ": b" in caplog.text


def test_a_wrong_validation_image_folder_is_found_before_training(tmp_path, capsys):
    """Issue 20 #4: data.val_images falls back to data.train_images; a val json whose images are
    elsewhere failed only at the end-of-run evaluation. Now: before training, naming the option."""
    train_ann = simple_coco(tmp_path / "train")
    val_ann = simple_coco(
        tmp_path / "val",
        images=[{"id": 1, "file_name": "v1.png", "width": 40, "height": 30}],
        annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5]}],
    )
    rc, err = _train(
        tmp_path,
        capsys,
        f"data.train={train_ann}",
        f"data.train_images={tmp_path / 'train' / 'images'}",
        f"data.val={val_ann}",
    )
    assert rc == 2 and str(val_ann) in err and "1 of the 1 validation images are not found" in err
    assert "v1.png" in err and "set data.val_images" in err
    assert not (tmp_path / "runs" / "t").exists()


def test_resume_may_fix_the_validation_images(tmp_path, capsys):
    """Issue 20 #4: `--resume ... data.val_images=...` was refused ("cannot change"); data.val and
    data.val_images may now be given with --resume, and are checked before any work."""
    box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0}
    train_ann = simple_coco(tmp_path / "train", annotations=[box])
    val_ann = simple_coco(
        tmp_path / "val", images=[{"id": 1, "file_name": "v1.png", "width": 40, "height": 30}], annotations=[box]
    )
    rc, _ = _train(
        tmp_path,
        capsys,
        f"data.train={train_ann}",
        f"data.train_images={tmp_path / 'train' / 'images'}",
        f"data.val={train_ann}",
        "train.iterations=1",
    )
    last = tmp_path / "runs" / "t" / "last.pt"
    assert rc == 0 and last.is_file()
    rc = main(["train", "--resume", str(last), f"data.val={val_ann}"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot change" not in err and "validation images are not found" in err
    rc = main(["train", "--resume", str(last), f"data.val={val_ann}", f"data.val_images={tmp_path / 'val' / 'images'}"])
    assert rc == 0
    assert load_checkpoint(last)["iteration"] == 1


def test_a_second_ctrl_c_during_the_checkpoint_write_aborts_cleanly(tmp_path, monkeypatch, capsys, caplog):
    """Issue 20 #7: the second Ctrl-C arrives while last.pt's temporary file is being written (the
    second write of last.pt): no RuntimeError from torch.save's zip writer, exit 130, a message that
    names the whole last.pt, no temporary file left, and no "training failed"."""
    import fasterrcnn.files as files

    real_open_temp = files._open_temp
    calls = []

    class Interrupting:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop after this step
                os.kill(os.getpid(), signal.SIGINT)  # the second: abort now
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def open_temp(path, mode, **kwargs):
        f, tmp = real_open_temp(path, mode, **kwargs)
        calls.append(path.name)
        if path.name == "last.pt" and calls.count("last.pt") == 2:
            return Interrupting(f), tmp
        return f, tmp

    monkeypatch.setattr(files, "_open_temp", open_temp)
    cfg = tiny_config(tmp_path, tmp_path / "synth", "train.iterations=3", "train.checkpoint_every=1")
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(cfg.to_dict()))
    with caplog.at_level(logging.INFO, logger="fasterrcnn"):
        rc = main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    last = tmp_path / "runs" / "t" / "last.pt"
    assert rc == 130
    assert "second Ctrl-C" in err and f"{last} (the last checkpoint) is whole" in err and "Traceback" not in err
    assert "training failed" not in caplog.text and "enforce fail" not in err
    assert load_checkpoint(last)["iteration"] == 1
    assert not stale_temps(last.parent)


def test_resume_of_a_text_file_or_a_folder_names_the_option_and_what_to_give(tmp_path, capsys):
    """Issue 20 #8: a text file as --resume gave `KeyError: 101`; a folder was "not found"."""
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    assert main(["train", "--resume", str(text)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {text}" in err and "it is not a file torch.save wrote" in err and "last.pt" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {run}" in err and "is a folder" in err and str(run / "last.pt") in err


def test_a_voc_run_without_data_val_says_it_evaluates_on_the_val_split(tmp_path, caplog):
    """Issue 20 #8: "data.val is not set: evaluating on the training data" was printed on a VOC run
    that evaluated on val.txt."""
    items = {"a": [("dog", 2, 3, 20, 20, 0)]}
    root = make_voc(tmp_path / "voc", items, split="train")
    make_voc(root, items, split="val")
    cfg = load_config(overrides=[f"data.train={root}", "data.format=voc", "data.voc_classes=[dog]"])
    with caplog.at_level(logging.INFO, logger="fasterrcnn"):
        build_data(cfg.data)
    assert "evaluating on the training data" not in caplog.text
    assert "evaluating on the split 'val' (data.voc_val_split)" in caplog.text


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "."])
def test_a_run_name_must_be_a_plain_folder_name(name):
    """Issue 20: train.name=../../x wrote outside train.out_dir."""
    with pytest.raises(ConfigError, match=r"train.name must be a plain folder name"):
        load_config(overrides=[f"train.name={name}"])


def test_iterations_and_epochs_together_are_refused(tmp_path, capsys):
    """Issue 20: train.iterations with train.epochs silently ignored the epochs."""
    rc, err = _train(tmp_path, capsys, "train.epochs=3")
    assert rc == 2 and "train.iterations=2 and train.epochs=3 are both set: give one" in err
