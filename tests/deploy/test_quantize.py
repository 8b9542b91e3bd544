"""int8 (`fasterrcnn quantize`, deploy.quantize): the network quantized, boxes and NMS in float, the same
detections as the float model within int8's rounding; a clear error for what cannot be quantized. OpenVINO
and NNCF run in a child process (openvino_child.py says why)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasterrcnn.cli import main
from fasterrcnn.deploy.graph import ExportError
from fasterrcnn.deploy.quantize import quantize
from fasterrcnn.deploy.runtimes import BackendOptionError, ExportedModel

from . import openvino_child
from .helpers import SIZES, decisive_model, images

pytest.importorskip("nncf")


def test_int8_model_detects_what_the_float_model_detects(tmp_path):
    torch.save(images((96, 128), count=6, seed=11), tmp_path / "calibration.pt")
    groups = [images(size, count=2, seed=5) for size in SIZES.values()]
    torch.save(groups, tmp_path / "images.pt")
    answer = openvino_child.run(
        "quantize_check",
        calibration=str(tmp_path / "calibration.pt"),
        images=str(tmp_path / "images.pt"),
        xml=str(tmp_path / "int8.xml"),
        out=str(tmp_path / "found.pt"),
    )
    assert answer["metadata"]["precision"] == "int8"
    assert answer["metadata"]["quantization"]["calibration_images"] == 6
    assert answer["metadata"]["class_names"] == [f"class_{i}" for i in range(5)]
    # only the network's inputs are quantized: convolutions, matrix products, adds of feature maps
    assert set(answer["fed"]) <= {"Convolution", "MatMul", "Add"}, answer["fed"]
    assert answer["quantized_convs"] >= 0.9 * answer["convs"] > 0, answer
    # well-formed detections in float: boxes inside the image, sorted scores above the threshold, valid labels.
    # (How close int8 comes to float is measured on a trained model, docs/results.md: a random network like
    # this one amplifies rounding as no trained one does, as bench_inference.py shows for bfloat16.)
    found = torch.load(tmp_path / "found.pt")
    assert sum(len(d["scores"]) for group in found for d in group) > 0, "the int8 model detects nothing"
    for group, out in zip(groups, found, strict=True):
        for image, d in zip(group, out, strict=True):
            h, w = image.shape[-2:]
            boxes = d["boxes"]
            assert boxes.dtype == torch.float32 and d["scores"].dtype == torch.float32
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
            assert (d["scores"][:-1] >= d["scores"][1:]).all() and (d["scores"] > 0.05).all()
            assert ((d["labels"] >= 1) & (d["labels"] <= 4)).all()


def test_quantize_refuses_what_it_cannot_do_before_loading_openvino(tmp_path):
    model = decisive_model()
    calib = images((96, 128), count=2)
    loaded = "openvino" in sys.modules
    with pytest.raises(ExportError, match=r"\.xml"):
        quantize(model, tmp_path / "int8.onnx", calibration_images=calib)
    with pytest.raises(ExportError, match="num_images"):
        quantize(model, tmp_path / "int8.xml", calibration_images=calib, num_images=0)
    with pytest.raises(ExportError, match="no calibration images"):
        quantize(model, tmp_path / "int8.xml", calibration_images=[])
    with pytest.raises(ExportError, match=r"calibration image 1: expected a float tensor \[3, H, W\]"):
        quantize(model, tmp_path / "int8.xml", calibration_images=[calib[0], torch.rand(1, 3, 8, 8)])
    assert ("openvino" in sys.modules) == loaded, "a refused quantization loaded OpenVINO"


def test_an_exported_model_evaluates_but_cannot_train():
    exported = ExportedModel(Path("int8.xml"), {"input": {"dtype": "uint8"}, "class_names": ["bg", "a"]})
    assert exported.training is False
    assert exported.train(False) is exported and exported.eval() is exported  # what the evaluator calls
    with pytest.raises(BackendOptionError, match="int8.xml: an exported model cannot train"):
        exported.train()


def test_quantize_cli_then_evaluate_the_int8_model(tiny_checkpoint, tmp_path, capsys):
    ckpt, synth = tiny_checkpoint
    train_json = synth / "annotations" / "instances_train.json"
    val_json = synth / "annotations" / "instances_val.json"
    assert main(["quantize", "--weights", str(ckpt), "--data", str(train_json), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "give a .xml path" in capsys.readouterr().err
    xml = tmp_path / "int8.xml"
    cli = [sys.executable, "-m", "fasterrcnn"]
    done = subprocess.run(
        [
            *cli,
            "quantize",
            "--weights",
            str(ckpt),
            "--data",
            str(train_json),
            "--out",
            str(xml),
            "--calibration-images",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=openvino_child.ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "int8, calibrated on 4 images" in done.stdout
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    done = subprocess.run(
        [*cli, "evaluate", "--weights", str(xml), "--backend", "openvino", "--data", str(val_json)],
        capture_output=True,
        text=True,
        cwd=openvino_child.ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AP50" in done.stdout


def test_a_missing_calibration_image_is_named_before_anything_is_written(tiny_checkpoint, tmp_path, capsys):
    import json

    ckpt, synth = tiny_checkpoint
    data = json.loads((synth / "annotations" / "instances_train.json").read_text())
    data["images"][0]["file_name"] = "missing.jpg"
    broken = tmp_path / "train.json"
    broken.write_text(json.dumps(data))
    images = synth / "train"
    out = tmp_path / "int8.xml"
    code = main(["quantize", "--weights", str(ckpt), "--data", str(broken), "--images", str(images), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "missing.jpg" in err and str(broken) in err, err
    assert not out.exists()
