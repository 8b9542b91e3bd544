"""Issue 20's property-style test: images of random sizes (1x1 up to 1x5000 and 5000x1), dtypes,
channel counts and NaN/inf pixels through `Detector`, `predict` over files and one training step.
Every case gives detections (possibly none) or a named error, never a traceback from inside the model."""

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn import Detector
from fasterrcnn.data.report import DataError
from fasterrcnn.inference.predict_files import collect_images, predict_files

from ..model.helpers import tiny_model

SIZES = [(1, 1), (1, 5000), (5000, 1), (1, 4000), (3, 2000), (2, 2)]
DTYPES = [np.uint8, np.float32, np.float64, np.int16]
NAMES = ["__background__", "a", "b", "c"]


def cases(seed: int, n: int):
    g = np.random.default_rng(seed)
    for k in range(n):
        h, w = SIZES[k] if k < len(SIZES) else tuple(int(v) for v in g.integers(1, 300, size=2))
        dtype = DTYPES[int(g.integers(len(DTYPES)))]
        channels = int(g.choice([1, 2, 3, 4]))
        if dtype == np.uint8 or dtype == np.int16:
            pixels = g.integers(0, 256, size=(h, w, channels)).astype(dtype)
        else:
            pixels = g.random((h, w, channels)).astype(dtype)
            if g.random() < 0.4:  # a NaN or an inf somewhere
                pixels[int(g.integers(h)), int(g.integers(w)), 0] = g.choice([np.nan, np.inf, -np.inf])
        yield k, pixels


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return Detector(tiny_model(box_score_thresh=0.0).eval(), NAMES, score_threshold=0.0)


def test_detector_on_any_image(detector):
    outcomes = {"detections": 0, "named error": 0}
    for k, pixels in cases(seed=20, n=30):
        as_tensor = k % 2 == 1
        image = (
            torch.from_numpy(pixels).permute(2, 0, 1)
            if as_tensor
            else (pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        )
        try:
            found = detector([torch.rand(3, 8, 8), image])[1]
        except (ValueError, TypeError) as e:
            assert "image 1" in str(e), f"case {k}: {e}"  # names the image
            outcomes["named error"] += 1
            continue
        assert found.boxes.shape[1:] == (4,) and torch.isfinite(found.boxes).all(), f"case {k}"
        outcomes["detections"] += 1
    assert outcomes["detections"] >= 5 and outcomes["named error"] >= 5, outcomes


def test_predict_on_any_image_file(detector, tmp_path):
    g = np.random.default_rng(21)
    folder = tmp_path / "imgs"
    folder.mkdir()
    written = 0
    for k, (h, w) in enumerate(SIZES + [tuple(int(v) for v in g.integers(1, 300, size=2)) for _ in range(6)]):
        mode = ["L", "LA", "RGB", "RGBA", "I;16", "F"][k % 6]
        if mode == "I;16":
            image = Image.fromarray(g.integers(0, 65536, size=(h, w), dtype=np.uint16))
        elif mode == "F":
            pixels = g.random((h, w)).astype(np.float32) * 255
            pixels[0, 0] = np.nan
            image = Image.fromarray(pixels, mode="F")
        else:
            image = Image.fromarray(g.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).convert(mode)
        image.save(folder / f"{k:02d}_{h}x{w}.{'tif' if mode in ('F', 'I;16') else 'png'}")
        written += 1
    summary = predict_files(
        detector, collect_images([str(folder)]), tmp_path / "out", workers=0, batch_size=3, show_progress=False
    )
    assert summary.num_images + len(summary.skipped) == written and not summary.partial
    for err in summary.skipped:
        assert str(folder) in err  # a named, counted skip
    assert sum("NaN or infinite" in e for e in summary.skipped) == 2  # the two float (F) files


def test_one_training_step_on_any_image():
    torch.manual_seed(0)
    model = tiny_model().train()
    for k, pixels in cases(seed=22, n=16):
        h, w = pixels.shape[:2]
        image = torch.from_numpy(pixels[:, :, :1].repeat(3, axis=2)).permute(2, 0, 1)
        image = image.float() / 255 if image.dtype in (torch.uint8, torch.int16) else image.float()
        target = {"boxes": torch.tensor([[0.0, 0.0, float(w), float(h)]]), "labels": torch.tensor([1])}
        try:
            losses = model([image], [target])
        except (ValueError, TypeError, DataError) as e:
            assert "images[0]" in str(e) or "targets[0]" in str(e), f"case {k}: {e}"
            continue
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}, f"case {k}"
        sum(losses.values()).backward()  # NaN pixels give NaN losses: the trainer's non-finite loss check names them
        model.zero_grad()
