"""`fasterrcnn export` and `fasterrcnn predict --backend` on a user's training checkpoint: the exported file
predicts what the checkpoint predicts, with its class names and category ids."""

import json
import subprocess
import sys
from collections import defaultdict

import torch

from fasterrcnn.cli import main

from .helpers import matched
from .openvino_child import ROOT


def _by_image(records: list[dict]) -> dict[int, dict]:
    grouped: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        grouped[r["image_id"]].append(r)
    out = {}
    for image_id, rs in grouped.items():
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rs)])
        out[image_id] = {
            "boxes": boxes,
            "scores": torch.tensor([r["score"] for r in rs]),
            "labels": torch.tensor([r["category_id"] for r in rs]),
        }
    return out


def test_export_then_predict_with_each_backend_gives_the_checkpoints_predictions(tiny_checkpoint, tmp_path, capsys):
    ckpt, synth = tiny_checkpoint
    photos = sorted((synth / "val").iterdir())[:3]
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(ckpt), "--format", "onnx", "--out", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert f"written: {onnx_path}" in out and "--backend onnxruntime" in out
    ts_path = tmp_path / "model.torchscript"
    assert main(["export", "--weights", str(ckpt), "--format", "torchscript", "--out", str(ts_path)]) == 0

    runs = {"checkpoint": (ckpt, "torch"), "onnx": (onnx_path, "onnxruntime"), "torchscript": (ts_path, "torch")}
    results = {}
    for name, (weights, backend) in runs.items():
        folder = tmp_path / name
        argv = ["predict", *map(str, photos), "--weights", str(weights), "--backend", backend]
        assert main([*argv, "--out", str(folder), "--score-threshold", "0.01", "--no-images"]) == 0
        results[name] = json.loads((folder / "predictions.json").read_text())
        categories = json.loads((folder / "images.json").read_text())["categories"]
        results[name + " categories"] = categories
    # OpenVINO runs the .onnx, in a child process (openvino_child.py says why)
    folder = tmp_path / "openvino"
    argv = ["predict", *map(str, photos), "--weights", str(onnx_path), "--backend", "openvino", "--threads", "1"]
    argv += ["--out", str(folder), "--score-threshold", "0.01", "--no-images"]
    done = subprocess.run(
        [sys.executable, "-m", "fasterrcnn", *argv], capture_output=True, text=True, cwd=ROOT, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results["openvino"] = json.loads((folder / "predictions.json").read_text())
    results["openvino categories"] = json.loads((folder / "images.json").read_text())["categories"]

    assert results["checkpoint"], "the tiny checkpoint predicts nothing at 0.01: the comparison would be empty"
    reference = _by_image(results["checkpoint"])
    for name in ("onnx", "torchscript", "openvino"):
        assert results[name + " categories"] == results["checkpoint categories"]
        found = _by_image(results[name])
        assert sorted(found) == sorted(reference)
        for image_id, ref in reference.items():
            # the json rounds boxes to 0.01 px and scores to 1e-5: the criterion's IoU 0.99 still holds
            hit, total = matched([ref], [found[image_id]])
            assert hit >= 0.98 * total, (name, image_id, hit, total)


def test_export_refuses_what_it_cannot_write_in_one_line(tiny_checkpoint, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    argv = ["export", "--weights", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert main([*argv, "--score-threshold", "1"]) == 2
    err = capsys.readouterr().err
    assert "score_threshold must lie in [0, 1)" in err and "Traceback" not in err
    assert main(["export", "--weights", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "none.pt" in capsys.readouterr().err
