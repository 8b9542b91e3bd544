"""Exported files under each runtime: ONNX under ONNX Runtime, the OpenVINO IR under OpenVINO, TorchScript under
torch.jit (also in a process that never imports fasterrcnn): the eager model's detections on sizes other than
the export example's, at batch 1 and 2, a valid empty result, the class names inside, and clear errors for a
damaged file or a missing extra. OpenVINO runs in a child process (openvino_child.py says why)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fasterrcnn.cli import main
from fasterrcnn.deploy import export
from fasterrcnn.deploy.export import MissingExtraError, require
from fasterrcnn.deploy.runtimes import BackendOptionError, ExportedFileError, load_exported
from fasterrcnn.inference.detector import Detector

from . import openvino_child
from .helpers import NAMES, SIZES, assert_same_detections, decisive_model, images

LABEL_TO_CAT_ID = {1: 11, 2: 12, 3: 13, 4: 14}


@pytest.fixture(scope="module")
def model():
    return decisive_model()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    """The model exported once in each format (uint8 input), from an example of 96x128."""
    tmp = tmp_path_factory.mktemp("exported")
    options = dict(class_names=NAMES, label_to_cat_id=LABEL_TO_CAT_ID, example_size=(96, 128))
    onnx_path = export(model, tmp / "tiny.onnx", format="onnx", **options)
    return {
        "onnxruntime": onnx_path,
        "openvino": Path(
            openvino_child.run("convert", onnx_path=str(onnx_path), xml_path=str(tmp / "tiny.xml"))["path"]
        ),
        "torch": export(model, tmp / "tiny.torchscript", format="torchscript", **options),
    }


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_each_runtime_gives_the_eager_detections(model, files, backend, tmp_path):
    groups = [images(size, count=2) for size in SIZES.values()]
    if backend == "openvino":
        torch.save(groups, tmp_path / "images.pt")
        openvino_child.run(
            "detect", path=str(files[backend]), images=str(tmp_path / "images.pt"), out=str(tmp_path / "o.pt")
        )
        found = torch.load(tmp_path / "o.pt")
    else:
        runner = load_exported(files[backend], backend, threads=1)
        found = [(runner(ims), [runner([im])[0] for im in ims]) for ims in groups]
    for ims, (batch_2, batch_1) in zip(groups, found, strict=True):
        with torch.no_grad():
            eager = model(ims)
        assert_same_detections(eager, batch_2)
        assert_same_detections(eager, batch_1)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_each_runtime_gives_the_eager_detections_on_sizes_whose_side_is_a_whole_quotient(
    model, files, backend, tmp_path
):
    """Sizes where a resized side is exactly min_size or max_size (50 x 82 -> 78 x 128: 82 * 128 / 82), which the
    graph computes as a floor division of whole numbers: a runtime that divides inexactly (127.99994) makes the
    side one pixel short and moves every detection (tests/deploy/test_runtime_ops.py sweeps the sizes)."""
    groups = [images(size, count=2) for size in ((50, 82), (82, 50), (41, 61))]
    if backend == "openvino":
        torch.save(groups, tmp_path / "images.pt")
        openvino_child.run(
            "detect", path=str(files[backend]), images=str(tmp_path / "images.pt"), out=str(tmp_path / "o.pt")
        )
        found = [batch_2 for batch_2, _ in torch.load(tmp_path / "o.pt")]
    else:
        runner = load_exported(files[backend], backend, threads=1)
        found = [runner(ims) for ims in groups]
    for ims, batch_2 in zip(groups, found, strict=True):
        with torch.no_grad():
            eager = model(ims)
        assert_same_detections(eager, batch_2)


def test_mixed_sizes_run_size_by_size_in_order(files):
    """(The eager model pads a mixed batch to its largest image, which changes what the network sees at the
    borders; the file runs each size on its own, so each image's detections are its own.)"""
    runner = load_exported(files["onnxruntime"], "onnxruntime")
    ims = images((70, 90), count=1) + images((100, 60), count=2) + images((70, 90), count=1, seed=5)
    one_by_one = [runner([im])[0] for im in ims]
    together = runner(ims)
    assert len(together) == len(ims)
    for a, b in zip(one_by_one, together):
        assert a["scores"].numel() > 0
        torch.testing.assert_close(a, b)


def test_the_onnx_input_has_a_dynamic_batch_height_and_width(files):
    graph = onnx.load(str(files["onnxruntime"])).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"] and dims[1].dim_value == 3
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.output] == ["boxes", "scores", "labels", "num_detections"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_the_class_names_travel_inside_the_file(files, backend, tmp_path):
    image = images((80, 100), count=1)[0]
    if backend == "openvino":
        torch.save(image, tmp_path / "image.pt")
        got = openvino_child.run("detector", path=str(files[backend]), image=str(tmp_path / "image.pt"))
        class_names, dtype, names, labels = got["class_names"], got["dtype"], got["names"], got["labels"]
        label_to_cat_id = {int(k): v for k, v in got["label_to_cat_id"].items()}
    else:
        runner = load_exported(files[backend], backend)
        class_names, label_to_cat_id, dtype = (
            runner.class_names,
            runner.label_to_cat_id,
            runner.metadata["input"]["dtype"],
        )
        found = Detector.load(files[backend], backend=backend, score_threshold=0.0)(image)
        names, labels = found.names, found.labels.tolist()
    assert class_names == NAMES and label_to_cat_id == LABEL_TO_CAT_ID and dtype == "uint8"
    assert len(names) > 0 and set(names) <= set(NAMES[1:])
    assert names == [NAMES[lb] for lb in labels]


def test_a_float_input_file_and_an_empty_result(model, tmp_path):
    path = export(model, tmp_path / "f.onnx", input_dtype="float32", score_threshold=0.999, example_size=(64, 64))
    blank = torch.full((2, 3, 50, 70), 0.5)
    runner = load_exported(path, "onnxruntime")
    boxes, scores, labels, counts = runner.run(blank.numpy())
    ort = {
        "dtype": runner.metadata["input"]["dtype"],
        "counts": counts.tolist(),
        "any": bool(boxes.any() or scores.any() or labels.any()),
        "shape": list(boxes.shape),
        "labels_dtype": str(labels.dtype),
        "results": [[list(d[k].shape) for k in ("boxes", "scores", "labels")] for d in runner(list(blank))],
    }
    ov = openvino_child.run("blank", path=str(path))  # OpenVINO reads the .onnx too
    for got in (ort, ov):
        assert got["dtype"] == "float32" and got["counts"] == [0, 0] and not got["any"]
        assert got["shape"] == [2, 100, 4] and got["labels_dtype"] == "int64"
        assert got["results"] == [[[0, 4], [0], [0]]] * 2
    # the default names when none are given
    assert load_exported(path, "onnxruntime").class_names == [f"class_{i}" for i in range(5)]


def test_torchscript_runs_in_a_process_that_never_imports_fasterrcnn(files, tmp_path):
    ims = torch.stack([(im * 255).round().to(torch.uint8) for im in images((90, 70), count=2)])
    torch.save(ims, tmp_path / "images.pt")
    script = f"""
import sys, json, torch
files = {{"fasterrcnn.json": ""}}
module = torch.jit.load({str(files["torch"])!r}, _extra_files=files)
boxes, scores, labels, counts = module(torch.load({str(tmp_path / "images.pt")!r}))
torch.save((boxes, scores, labels, counts), {str(tmp_path / "out.pt")!r})
print(json.dumps({{"names": json.loads(files["fasterrcnn.json"])["class_names"],
                  "imported": [m for m in sys.modules if m.startswith("fasterrcnn")]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["imported"] == [] and report["names"] == NAMES
    boxes, scores, labels, counts = torch.load(tmp_path / "out.pt")
    here = torch.jit.load(str(files["torch"]))(ims)
    assert counts.tolist() == here[3].tolist() and int(counts.sum()) > 0
    torch.testing.assert_close(boxes, here[0])
    torch.testing.assert_close(scores, here[1])
    assert torch.equal(labels, here[2])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_a_damaged_file_is_a_clear_error_naming_it(files, backend, tmp_path):
    good = files[backend].read_bytes()
    truncated = tmp_path / f"truncated{files[backend].suffix}"
    truncated.write_bytes(good[: len(good) // 2])
    noise = tmp_path / f"noise{files[backend].suffix}"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    bad = [truncated, noise, tmp_path / f"missing{files[backend].suffix}"]
    if backend == "openvino":
        got = openvino_child.run("errors", paths=[str(p) for p in bad])["errors"]
    else:
        got = []
        for path in bad:
            with pytest.raises(ExportedFileError) as caught:
                load_exported(path, backend)
            got.append([type(caught.value).__name__, str(caught.value)])
    for path, (kind, message) in zip(bad, got, strict=True):
        assert kind == "ExportedFileError" and message.startswith(str(path)), (path, kind, message)


def test_an_onnx_file_without_our_metadata_is_named(tmp_path):
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(plain), dynamo=True)
    with pytest.raises(ExportedFileError, match="no fasterrcnn metadata"):
        load_exported(plain, "onnxruntime")


def test_the_wrong_file_for_a_backend_and_unsupported_options_are_named(files):
    with pytest.raises(ExportedFileError, match="runs .onnx files"):
        load_exported(files["openvino"], "onnxruntime")
    with pytest.raises(ExportedFileError, match="not a TorchScript file"):
        load_exported(files["onnxruntime"], "torch")
    with pytest.raises(BackendOptionError, match="no bfloat16"):
        load_exported(files["onnxruntime"], "onnxruntime", bf16=True)
    with pytest.raises(BackendOptionError, match="backend must be one of"):
        load_exported(files["onnxruntime"], "tensorrt")


def test_an_exported_file_without_its_backend_says_which_backend(files, tmp_path, capsys):
    for key, backend in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        with pytest.raises(ExportedFileError, match=f"run it with --backend {backend}"):
            Detector.load(files[key])
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (40, 30)).save(image)
    assert main(["predict", str(image), "--weights", str(files["onnxruntime"]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(files["onnxruntime"]) in err and "--backend onnxruntime" in err and "Traceback" not in err


def test_a_missing_extra_says_what_to_install(monkeypatch, files, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'fasterrcnn\[deploy\]'"):
        require("onnxruntime", "the onnxruntime backend")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray((images((60, 80), count=1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(image)
    argv = ["predict", str(image), "--weights", str(files["onnxruntime"]), "--backend", "onnxruntime"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "fasterrcnn[deploy]" in err and "Traceback" not in err


def test_a_damaged_file_through_the_cli_is_one_line_and_exit_2(files, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(files["onnxruntime"].read_bytes()[:1000])
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (40, 30)).save(image)
    rc = main(["predict", str(image), "--weights", str(bad), "--backend", "onnxruntime", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "Traceback" not in err
