"""Test-time augmentation (issue 19): a mirrored image gives mirrored detections, one pass at scale 1 is the model
itself, box voting averages as written out here, and the option reaches Detector, predict and evaluate."""

import pytest
import torch

from fasterrcnn import Detector
from fasterrcnn.model.tta import TestTimeAugmentation

from .helpers import tiny_model

NAMES = ["__background__", "a", "b", "c"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(num_classes=4, box_score_thresh=0.2).eval()


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(4)
    im = torch.rand(3, 90, 150, generator=g) * 0.3
    im[:, 20:60, 10:50] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]  # a few solid shapes: something to find
    im[:, 40:80, 90:140] = torch.tensor([0.1, 0.8, 0.9])[:, None, None]
    return im


def _sorted(det):
    order = torch.argsort(det["scores"], descending=True, stable=True)
    return {k: v[order] for k, v in det.items()}


def test_one_pass_at_scale_one_is_the_model_itself(model, image):
    plain = model([image])[0]
    same = TestTimeAugmentation(model, scales=(1.0,), hflip=False)([image])[0]
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(plain[k], same[k]), k


@pytest.mark.parametrize("merge", ["nms", "voting"])
def test_an_image_and_its_mirror_give_mirrored_detections(model, image, merge):
    tta = TestTimeAugmentation(model, scales=(0.8, 1.0, 1.25), hflip=True, merge=merge)
    a, b = (_sorted(d) for d in tta([image, image.flip(-1)]))
    assert len(a["scores"]) > 0 and len(a["scores"]) == len(b["scores"])
    width = image.shape[-1]
    mirrored = torch.stack([width - b["boxes"][:, 2], b["boxes"][:, 1], width - b["boxes"][:, 0], b["boxes"][:, 3]], 1)
    torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(a["boxes"], mirrored, atol=1e-3, rtol=0)
    assert torch.equal(a["labels"], b["labels"])
    # the sizes of the passes are restored afterwards
    assert tuple(model.transform.min_size) == (128,) and model.transform.max_size == 192


def test_box_voting_moves_each_kept_box_to_the_weighted_mean_of_its_overlapping_class_mates(model):
    tta = TestTimeAugmentation(model, merge="voting", iou_threshold=0.5)
    passes = [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[1.0, 0.0, 11.0, 10.0]]), "scores": torch.tensor([0.6]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[1.0, 0.0, 11.0, 10.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([2])},
    ]
    merged = tta._merge(passes)
    # class 1: the 0.9 box keeps, IoU with the 0.6 box = 90 / 110 >= 0.5: x1 = (0.9*0 + 0.6*1) / 1.5 = 0.4,
    # x2 = (0.9*10 + 0.6*11) / 1.5 = 10.4; class 2's box is alone (another class never votes)
    assert merged["labels"].tolist() == [1, 2] and merged["scores"].tolist() == pytest.approx([0.9, 0.5])
    torch.testing.assert_close(merged["boxes"], torch.tensor([[0.4, 0.0, 10.4, 10.0], [1.0, 0.0, 11.0, 10.0]]))


def test_what_tta_refuses(model):
    with pytest.raises(ValueError, match="needs a fasterrcnn FasterRCNN"):
        TestTimeAugmentation(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"tta scales must be numbers in \[0.1, 4\]"):
        TestTimeAugmentation(model, scales=(0.0,))
    with pytest.raises(ValueError, match="tta merge must be one of nms, voting"):
        TestTimeAugmentation(model, merge="wbf")
    with pytest.raises(RuntimeError, match="call .eval"):
        TestTimeAugmentation(tiny_model(num_classes=4).train())([torch.rand(3, 32, 32)])


def test_detector_with_tta_and_the_cli(tiny_checkpoint, tmp_path, image, capsys):
    import json

    from PIL import Image

    from fasterrcnn.cli import main

    ckpt, synth = tiny_checkpoint
    plain = Detector.load(ckpt, device="cpu", score_threshold=0.0)
    tta = Detector.load(ckpt, device="cpu", score_threshold=0.0, tta={"scales": (1.0,), "hflip": False})
    a, b = plain(image), tta(image)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
    assert isinstance(Detector.load(ckpt, device="cpu", tta=True).model, TestTimeAugmentation)
    Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(tmp_path / "x.png")
    out = tmp_path / "pred"
    argv = ["predict", str(tmp_path / "x.png"), "--weights", str(ckpt), "--out", str(out), "--tta"]
    assert main([*argv, "--tta-scales", "0.9", "1.1", "--tta-merge", "voting", "--score-threshold", "0"]) == 0
    assert json.loads((out / "images.json").read_text())["images"][0]["file_name"] == "x.png"
    val = synth / "annotations" / "instances_val.json"
    argv = ["evaluate", "--weights", str(ckpt), "--data", str(val), "--tta", "--tta-scales", "1.0"]
    assert main(argv) == 0
    assert "AP50" in capsys.readouterr().out
