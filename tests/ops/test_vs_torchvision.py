"""Our ops against torchvision.ops on the same inputs (small, with ties and boxes over the borders).

Runs where torchvision is importable (never a dependency of the project; skipped otherwise):

    PYTHONPATH=. ~/.cache/fasterrcnn-reference-env/bin/python -m pytest -q tests/ops/test_vs_torchvision.py
"""

import os

import pytest
import torch

from fasterrcnn.ops import MultiScaleRoIAlign, batched_nms, nms, roi_align, roi_pool

if os.environ.get("FASTERRCNN_REQUIRE_TORCHVISION") == "1":  # `make test-parity` (CI): missing is a failure
    import torchvision.ops as tv_ops
else:
    tv_ops = pytest.importorskip("torchvision.ops")


def random_boxes(n, seed, size=60.0, spread=200.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * spread
    wh = torch.rand(n, 2, generator=g) * size + 1
    return torch.cat((xy, xy + wh), 1), torch.rand(n, generator=g)


def random_rois(k, n, height, width, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(k, generator=g) * width / scale * 1.3 - 0.15 * width / scale
    y1 = torch.rand(k, generator=g) * height / scale * 1.3 - 0.15 * height / scale
    w = torch.rand(k, generator=g) * width / scale * 0.7
    h = torch.rand(k, generator=g) * height / scale * 0.7
    b = torch.randint(0, n, (k,), generator=g).float()
    return torch.stack((b, x1, y1, x1 + w, y1 + h), 1)


@pytest.mark.parametrize("n", [0, 1, 300, 3000])
@pytest.mark.parametrize("thr", [0.3, 0.7])
def test_nms_same_indices_as_torchvision(n, thr):
    boxes, scores = random_boxes(n, seed=n)
    assert torch.equal(nms(boxes, scores, thr), tv_ops.nms(boxes, scores, thr))


@pytest.mark.parametrize("n,classes", [(50, 3), (800, 10), (3000, 80)])  # torchvision: offsets below 1000 boxes
def test_batched_nms_same_indices_as_torchvision(n, classes):
    boxes, scores = random_boxes(n, seed=n + 1)
    idxs = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(n))
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), tv_ops.batched_nms(boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_roi_pool_same_values_and_gradient_as_torchvision(scale):
    g = torch.Generator().manual_seed(3)
    # quantised values: many ties inside bins, so the argmax rule (first maximum) matters
    x = torch.randint(0, 4, (2, 5, 23, 31), generator=g).float()
    rois = random_rois(40, 2, 23, 31, scale, seed=4)
    grad_out = torch.randn(40, 5, 7, 7, generator=g)
    ours_x, tv_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = roi_pool(ours_x, rois, 7, scale)
    theirs = tv_ops.roi_pool(tv_x, rois, 7, scale)
    assert torch.equal(ours, theirs)
    ours.backward(grad_out)
    theirs.backward(grad_out)
    assert torch.equal(ours_x.grad, tv_x.grad)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_torchvision(sampling_ratio, aligned):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 19, 27, generator=g)
    rois = random_rois(30, 2, 19, 27, 0.5, seed=6)
    grad_out = torch.randn(30, 4, 7, 7, generator=g)
    ours_x, tv_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = roi_align(ours_x, rois, 7, 0.5, sampling_ratio, aligned)
    theirs = tv_ops.roi_align(tv_x, rois, 7, 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.backward(grad_out)
    theirs.backward(grad_out)
    torch.testing.assert_close(ours_x.grad, tv_x.grad, rtol=1e-5, atol=1e-5)


def test_multiscale_roi_align_matches_torchvision():
    g = torch.Generator().manual_seed(7)
    names = ["0", "1", "2", "3"]
    feats = {name: torch.randn(2, 3, 128 // s, 160 // s, generator=g) for name, s in zip(names, (4, 8, 16, 32))}
    boxes = [random_boxes(25, seed=8, size=120.0, spread=100.0)[0], random_boxes(9, seed=9, size=20.0)[0]]
    sizes = [(128, 160), (120, 150)]
    ours = MultiScaleRoIAlign(names, 7, 2)(feats, boxes, sizes)
    theirs = tv_ops.MultiScaleRoIAlign(names, 7, 2)(feats, boxes, sizes)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
