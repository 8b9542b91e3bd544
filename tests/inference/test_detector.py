"""The Python API: images of every kind in, the model's own detections out; loading from a
training checkpoint, torchvision-format weights, and an http URL through torch.hub's cache."""

import functools
import http.server
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn import Detections, Detector
from fasterrcnn.data.coco_names import COCO_CATEGORY_NAMES
from fasterrcnn.inference.detector import to_image_tensor
from fasterrcnn.model import fasterrcnn_resnet18_fpn
from fasterrcnn.model.weights import WeightsError

from ..model.helpers import tiny_model


@pytest.fixture(scope="module")
def image_u8():
    g = np.random.default_rng(0)
    return g.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)


def test_every_image_kind_gives_the_same_tensor(image_u8, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(image_u8).save(path)
    expected = torch.from_numpy(image_u8).permute(2, 0, 1).float() / 255
    rgba = np.concatenate([image_u8, np.full((90, 120, 1), 7, np.uint8)], axis=2)
    for kind in (
        str(path),
        path,
        Image.fromarray(image_u8),
        image_u8,
        image_u8.astype(np.float32) / 255,
        rgba,
        torch.from_numpy(image_u8).permute(2, 0, 1),
        expected.clone(),
    ):
        got = to_image_tensor(kind)
        assert got.dtype == torch.float32 and got.shape == (3, 90, 120)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    gray = to_image_tensor(image_u8[:, :, 0])
    assert gray.shape == (3, 90, 120) and torch.equal(gray[0], gray[2])


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            np.zeros((4, 5, 2), np.uint8),
            r"image: a NumPy image must be \[H, W\], \[H, W, 3\] or \[H, W, 4\], got \[4, 5, 2\]",
        ),
        (torch.zeros(1, 3, 8, 8), r"image: a tensor image must be \[3, H, W\], got \[1, 3, 8, 8\]"),
        (torch.full((3, 4, 4), 2.0), r"float pixels must lie in \[0, 1\] \(got 2..2\); pass uint8 for 0..255"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), "expected uint8 .* or float .* got torch.int32"),
        (3.5, "expected a path, a PIL image, a NumPy array or a tensor, got float"),
    ],
)
def test_bad_images_are_named_errors(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        to_image_tensor(bad)


def test_missing_file_names_the_file(tmp_path):
    from fasterrcnn.data.report import DataError

    with pytest.raises(DataError, match="nope.jpg: image file not found"):
        Detector(tiny_model().eval(), ["__background__", "a", "b", "c"])(str(tmp_path / "nope.jpg"))


def test_detections_are_the_models_own_above_the_threshold(image_u8):
    torch.manual_seed(0)
    model = tiny_model(num_classes=4, box_score_thresh=0.0).eval()
    names = ["__background__", "cat", "dog", "bird"]
    detector = Detector(model, names, score_threshold=0.2)
    found = detector(image_u8)
    assert isinstance(found, Detections)
    with torch.no_grad():
        raw = detector.model([to_image_tensor(image_u8)])[0]  # the optimised copy it runs
    keep = raw["scores"] >= 0.2
    assert keep.any() and not keep.all()  # the threshold matters for this model
    assert torch.equal(found.boxes, raw["boxes"][keep]) and torch.equal(found.scores, raw["scores"][keep])
    assert torch.equal(found.labels, raw["labels"][keep])
    assert found.names == [names[i] for i in raw["labels"][keep].tolist()]
    assert len(found) == int(keep.sum())
    # a list in, a list out; batches give each image its own results, in order
    second = np.ascontiguousarray(image_u8[:60, :80])
    many = detector([image_u8, second], batch_size=2)
    with torch.no_grad():
        raw2 = detector.model([to_image_tensor(image_u8), to_image_tensor(second)])
    assert len(many) == 2
    for got, want in zip(many, raw2):
        k = want["scores"] >= 0.2
        assert torch.equal(got.boxes, want["boxes"][k])


def test_results_in_coco_format():
    d = Detections(torch.tensor([[10.0, 20.0, 40.0, 60.0]]), torch.tensor([0.75]), torch.tensor([2]), ["dog"])
    assert d.to_coco(7, {1: 11, 2: 18}) == [
        {"image_id": 7, "category_id": 18, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.75}
    ]


def test_threshold_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"score_threshold must lie in \[0, 1\], got 1.5"):
        Detector(tiny_model(), ["__background__", "a", "b", "c"], score_threshold=1.5)


def test_load_a_training_checkpoint(tiny_checkpoint, image_u8):
    path, _ = tiny_checkpoint
    detector = Detector.load(path, device="cpu", score_threshold=0.0)
    assert detector.class_names == ["__background__", "circle", "square", "triangle", "star"]
    found = detector(image_u8)
    assert set(found.names) <= {"circle", "square", "triangle", "star"}


def test_load_torchvision_format_weights_gives_coco_names(tmp_path, image_u8):
    torch.manual_seed(0)
    path = tmp_path / "tv_style.pth"
    torch.save(fasterrcnn_resnet18_fpn(num_classes=91, box_score_thresh=0.0).state_dict(), path)
    detector = Detector.load(path, arch="fasterrcnn_resnet18_fpn", score_threshold=0.0)
    assert detector.class_names[1] == "person" and detector.class_names[90] == COCO_CATEGORY_NAMES[90]
    assert detector.label_to_cat_id[90] == 90
    found = detector(image_u8)
    assert all(n in COCO_CATEGORY_NAMES.values() or n.startswith("class_") for n in found.names)


@pytest.fixture
def http_folder(tmp_path):
    """A local http server over a folder: the network path of torch.hub's cache, without a network."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()


def test_url_weights_go_through_the_hub_cache(tiny_checkpoint, http_folder, tmp_path, monkeypatch, image_u8):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served, url, server = http_folder
    path, _ = tiny_checkpoint
    (served / "shapes.pt").write_bytes(path.read_bytes())
    first = Detector.load(f"{url}/shapes.pt", score_threshold=0.0)
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "shapes.pt"
    assert cached.read_bytes() == path.read_bytes()
    server.shutdown()  # the second load reads the cache, not the network
    again = Detector.load(f"{url}/shapes.pt", score_threshold=0.0)
    assert torch.equal(first(image_u8).boxes, again(image_u8).boxes)


def test_url_with_a_wrong_hash_prefix_is_refused_and_not_cached(tiny_checkpoint, http_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served, url, _ = http_folder
    (served / "shapes-deadbeef.pt").write_bytes(tiny_checkpoint[0].read_bytes())
    with pytest.raises(WeightsError, match=r"cannot download http://.*/shapes-deadbeef.pt"):
        Detector.load(f"{url}/shapes-deadbeef.pt")
    assert not (tmp_path / "torch_home" / "hub" / "checkpoints" / "shapes-deadbeef.pt").exists()


def test_unreachable_url_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(WeightsError, match="without a network, download the file elsewhere and pass its path"):
        Detector.load("http://127.0.0.1:9/missing.pt")
