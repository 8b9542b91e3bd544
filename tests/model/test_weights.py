import os
import pickle

import pytest
import torch

from fasterrcnn.model import FrozenBatchNorm2d, fasterrcnn_resnet18_fpn, fasterrcnn_resnet34_fpn
from fasterrcnn.model.weights import read_state_dict, upgrade_legacy_keys

from .helpers import sample_batch, tiny_model

TINY = dict(fpn_channels=32, min_size=128, max_size=192, representation_size=64)


@pytest.fixture
def trained_tiny(tmp_path):
    model = tiny_model(num_classes=5)
    with torch.no_grad():  # non-trivial statistics, so that loading them matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "detector.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_round_trip_and_num_classes_from_checkpoint(trained_tiny):
    ref, path = trained_tiny
    model = fasterrcnn_resnet18_fpn(weights=str(path), **TINY).eval()
    assert model.num_classes == 5
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d) and model.backbone.body.bn1.eps == 0.0
    ours, theirs = model.state_dict(), ref.state_dict()
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
    images, _ = sample_batch()
    with torch.no_grad():
        # BatchNorm (eps 1e-5) against FrozenBatchNorm (eps 0): the same network up to eps
        a = ref.backbone(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        b = model.backbone(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-3) for k in a)


def test_wrapped_checkpoint_and_file_url(trained_tiny, tmp_path):
    ref, path = trained_tiny
    wrapped = tmp_path / "training_checkpoint.pt"
    torch.save({"model": ref.state_dict(), "epoch": 3, "optimizer": {}}, wrapped)
    m = fasterrcnn_resnet18_fpn(weights=str(wrapped), **TINY)
    assert torch.equal(m.roi_heads.box_predictor.cls_score.weight, ref.roi_heads.box_predictor.cls_score.weight)
    m = fasterrcnn_resnet18_fpn(weights=path.as_uri(), **TINY)  # file:// URL through torch.hub's loader
    assert torch.equal(m.rpn.head.bbox_pred.bias, ref.rpn.head.bbox_pred.bias)


def test_legacy_names_are_upgraded(trained_tiny, tmp_path):
    ref, _ = trained_tiny
    legacy = {
        k.replace("rpn.head.conv.0.0.", "rpn.head.conv.").replace("inner_blocks.2.0.", "inner_blocks.2."): v
        for k, v in ref.state_dict().items()
    }
    assert "rpn.head.conv.weight" in legacy and "backbone.fpn.inner_blocks.2.weight" in legacy
    assert set(upgrade_legacy_keys(legacy)) == set(ref.state_dict())
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path)
    m = fasterrcnn_resnet18_fpn(weights=str(path), **TINY)
    assert torch.equal(m.rpn.head.conv[0][0].weight, ref.rpn.head.conv[0][0].weight)


def test_wrong_class_count_names_the_keys_and_shapes(trained_tiny):
    _, path = trained_tiny
    with pytest.raises(ValueError) as e:
        fasterrcnn_resnet18_fpn(weights=str(path), num_classes=91, **TINY)
    msg = str(e.value)
    assert str(path) in msg and "shape mismatch (4)" in msg
    assert "roi_heads.box_predictor.cls_score.weight: checkpoint (5, 64), model (91, 64)" in msg


def test_other_architecture_lists_missing_and_unexpected(trained_tiny):
    _, path = trained_tiny
    with pytest.raises(ValueError) as e:
        fasterrcnn_resnet34_fpn(weights=str(path), **TINY)
    msg = str(e.value)
    assert "missing from the checkpoint" in msg and "backbone.body.layer1.2.conv1.weight" in msg


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        read_state_dict(bad)
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(ValueError, match="list.pth holds no state_dict"):
        read_state_dict(notdict)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"x": payload}}, f)
    with pytest.raises(ValueError, match="evil.pth"):
        fasterrcnn_resnet18_fpn(weights=str(evil), **TINY)
    assert not os.path.exists(marker)
