"""OpenVINO for the tests, in a child process: `python -m tests.deploy.openvino_child JOB ARGS_JSON`.

Why a child: with OpenVINO loaded in a process where PyTorch's DataLoader has installed its SIGCHLD handler,
the next subprocess the process starts segfaults it (docs/design-decisions.md, issue 15). The test session
runs DataLoaders with workers and subprocesses in many tests, so OpenVINO never loads in its process: each
OpenVINO check runs here and reports back (JSON on the last line of stdout, tensors in a .pt file)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def convert(onnx_path: str, xml_path: str) -> dict:
    from fasterrcnn.deploy.export import openvino_from_onnx

    return {"path": str(openvino_from_onnx(onnx_path, xml_path))}


def detect(path: str, images: str, out: str) -> dict:
    """Each list of images in ``images`` (a .pt list of lists) run as one batch and image by image."""
    import torch

    from fasterrcnn.deploy.runtimes import load_exported

    runner = load_exported(path, "openvino", threads=1)
    groups = torch.load(images)
    torch.save([(runner(group), [runner([im])[0] for im in group]) for group in groups], out)
    return {"metadata": runner.metadata}


def detector(path: str, image: str) -> dict:
    import torch

    from fasterrcnn.deploy.runtimes import load_exported
    from fasterrcnn.inference.detector import Detector

    runner = load_exported(path, "openvino")
    found = Detector.load(path, backend="openvino", score_threshold=0.0)(torch.load(image))
    return {
        "class_names": runner.class_names,
        "label_to_cat_id": {str(k): v for k, v in runner.label_to_cat_id.items()},
        "dtype": runner.metadata["input"]["dtype"],
        "names": found.names,
        "labels": found.labels.tolist(),
    }


def blank(path: str) -> dict:
    import torch

    from fasterrcnn.deploy.runtimes import load_exported

    runner = load_exported(path, "openvino")
    images = torch.full((2, 3, 50, 70), 0.5)
    boxes, scores, labels, counts = runner.run(images.numpy())
    found = runner(list(images))
    return {
        "dtype": runner.metadata["input"]["dtype"],
        "counts": counts.tolist(),
        "any": bool(boxes.any() or scores.any() or labels.any()),
        "shape": list(boxes.shape),
        "labels_dtype": str(labels.dtype),
        "results": [[list(d[k].shape) for k in ("boxes", "scores", "labels")] for d in found],
    }


def errors(paths: list[str]) -> dict:
    from fasterrcnn.deploy.runtimes import load_exported

    out = []
    for path in paths:
        try:
            load_exported(path, "openvino")
            out.append(["loaded", ""])
        except Exception as e:
            out.append([type(e).__name__, str(e)])
    return {"errors": out}


def feeds(path: str, inputs: str, out: str) -> dict:
    """Any ONNX/IR file run on each feed of ``inputs`` (a .pt list of tuples of tensors, the model's inputs
    in order): the outputs of each, as tensors in ``out``."""
    import openvino as ov
    import torch

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    results = []
    for feed in torch.load(inputs):
        answer = request.infer({i: t.numpy() for i, t in enumerate(feed)})
        results.append([torch.from_numpy(answer[o].copy()) for o in compiled.outputs])
    torch.save(results, out)
    return {"runs": len(results)}


def quantize_check(calibration: str, images: str, xml: str, out: str) -> dict:
    """int8: the tests' decisive model (helpers.py) quantized on the calibration images, then run on ``images``
    (a .pt list of lists); what the quantized graph looks like, for the test to check."""
    import openvino as ov
    import torch

    from fasterrcnn.deploy.quantize import quantize
    from fasterrcnn.deploy.runtimes import load_exported
    from tests.deploy.helpers import decisive_model

    quantize(decisive_model(), xml, calibration_images=torch.load(calibration), num_images=6)
    runner = load_exported(xml, "openvino", threads=1)
    torch.save([runner(group) for group in torch.load(images)], out)
    ops = ov.Core().read_model(xml).get_ordered_ops()
    fed = sorted(
        {
            t.get_node().get_type_name()
            for op in ops
            if op.get_type_name() == "FakeQuantize"
            for t in op.output(0).get_target_inputs()
        }
    )
    convs = [op for op in ops if op.get_type_name() == "Convolution"]
    quantized = [c for c in convs if c.input(0).get_source_output().get_node().get_type_name() == "FakeQuantize"]
    return {"metadata": runner.metadata, "fed": fed, "convs": len(convs), "quantized_convs": len(quantized)}


def run(job: str, **kwargs) -> dict:
    """The job in a child process (from the tests): its JSON answer, or an AssertionError with its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.deploy.openvino_child", job, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert done.returncode == 0, f"openvino child {job} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    answer = globals()[sys.argv[1]](**json.loads(sys.argv[2]))
    print(json.dumps(answer))
