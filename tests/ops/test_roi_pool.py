import math
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import torch

from fasterrcnn.ops import roi_pool


def c_round(v):
    """C's round (halves away from zero), exactly: Decimal's ROUND_HALF_UP rounds ties away from zero."""
    return int(Decimal(float(v)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def ref_roi_pool(inp, rois, output_size, spatial_scale):
    """Plain loops: (output, argmax) with argmax the flat h*W+w of the first max in row-major order, -1 if empty."""
    dt = np.float64 if inp.dtype == torch.float64 else np.float32
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    x = inp.detach().double().numpy()
    _, channels, height, width = x.shape
    out = np.zeros((len(rois), channels, oh, ow))
    argmax = np.full((len(rois), channels, oh, ow), -1)
    s = dt(spatial_scale)
    for k, (b, x1, y1, x2, y2) in enumerate(np.asarray(rois, dtype=dt)):
        start_w, start_h = c_round(x1 * s), c_round(y1 * s)
        end_w, end_h = c_round(x2 * s), c_round(y2 * s)
        roi_w, roi_h = max(end_w - start_w + 1, 1), max(end_h - start_h + 1, 1)
        bin_h, bin_w = dt(roi_h) / dt(oh), dt(roi_w) / dt(ow)
        for ph in range(oh):
            hstart = min(max(int(math.floor(dt(ph) * bin_h)) + start_h, 0), height)
            hend = min(max(int(math.ceil(dt(ph + 1) * bin_h)) + start_h, 0), height)
            for pw in range(ow):
                wstart = min(max(int(math.floor(dt(pw) * bin_w)) + start_w, 0), width)
                wend = min(max(int(math.ceil(dt(pw + 1) * bin_w)) + start_w, 0), width)
                if hend <= hstart or wend <= wstart:
                    continue
                for c in range(channels):
                    best, best_at = -math.inf, -1
                    for yy in range(hstart, hend):
                        for xx in range(wstart, wend):
                            if x[int(b), c, yy, xx] > best:
                                best, best_at = x[int(b), c, yy, xx], yy * width + xx
                    out[k, c, ph, pw] = best
                    argmax[k, c, ph, pw] = best_at
    return torch.from_numpy(out), argmax


def ref_roi_pool_grad(inp, rois, output_size, spatial_scale, grad_out):
    _, argmax = ref_roi_pool(inp, rois, output_size, spatial_scale)
    n, channels, height, width = inp.shape
    grad = np.zeros((n, channels, height * width))
    g = grad_out.double().numpy()
    for k, roi in enumerate(rois.tolist()):
        for idx in np.ndindex(*argmax.shape[1:]):
            if argmax[(k,) + idx] >= 0:
                grad[int(roi[0]), idx[0], argmax[(k,) + idx]] += g[(k,) + idx]
    return torch.from_numpy(grad.reshape(n, channels, height, width))


def random_rois(k, n, height, width, spatial_scale, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = height / spatial_scale, width / spatial_scale
    x1 = torch.rand(k, generator=g, dtype=torch.float64) * img_w * 1.4 - 0.2 * img_w
    y1 = torch.rand(k, generator=g, dtype=torch.float64) * img_h * 1.4 - 0.2 * img_h
    w = torch.rand(k, generator=g, dtype=torch.float64) * img_w * 0.8
    h = torch.rand(k, generator=g, dtype=torch.float64) * img_h * 0.8
    b = torch.randint(0, n, (k,), generator=g).double()
    return torch.stack((b, x1, y1, x1 + w, y1 + h), 1).to(dtype)


@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("output_size", [2, (3, 2), (4, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_roi_pool_matches_reference(spatial_scale, output_size, dtype):
    g = torch.Generator().manual_seed(20)
    inp = torch.randn(2, 3, 7, 10, generator=g, dtype=torch.float64).to(dtype)
    rois = random_rois(14, 2, 7, 10, spatial_scale, seed=21, dtype=dtype)
    out = roi_pool(inp, rois, output_size, spatial_scale)
    expected, _ = ref_roi_pool(inp, rois, output_size, spatial_scale)
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    assert out.shape == (14, 3, oh, ow) and out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)


def test_roi_pool_rounds_half_away_from_zero():
    x = torch.arange(30.0).view(1, 1, 5, 6)  # value = 6 * y + x
    # x1 * 0.5 = 0.5 -> round to 1 (torch.round would give 0); x2 * 0.5 = 2.5 -> 3 (torch.round: 2)
    out = roi_pool(x, torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]]), 1, spatial_scale=0.5)
    assert out.item() == 6 * 3 + 3
    # -0.5 rounds to -1, so the RoI covers rows/cols -1..0, clamped to row/col 0
    out = roi_pool(x, torch.tensor([[0, -1.0, -1.0, 0.0, 0.0]]), 1, spatial_scale=0.5)
    assert out.item() == 0.0


def test_roi_pool_hand_values_and_empty_bins():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = roi_pool(x, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]]), 2)
    assert out.tolist() == [[[[5.0, 7.0], [13.0, 15.0]]]]
    # fully outside the map: every bin is empty -> 0
    out = roi_pool(x, torch.tensor([[0, 6.0, 6.0, 9.0, 9.0], [0, -9.0, 1.0, -5.0, 2.0]]), 2)
    assert torch.equal(out, torch.zeros(2, 1, 2, 2))
    # partly outside: bins beyond the map are empty, the others see the map
    out = roi_pool(x, torch.tensor([[0, 2.0, 0.0, 5.0, 3.0]]), (1, 2))
    assert out.tolist() == [[[[15.0, 0.0]]]]


def test_roi_pool_gradient_goes_to_first_argmax():
    # quantised values create many ties inside bins: the first maximum in row-major order gets the gradient
    g = torch.Generator().manual_seed(22)
    inp = torch.randint(0, 3, (2, 2, 6, 7), generator=g).double().requires_grad_()
    rois = random_rois(10, 2, 6, 7, 1.0, seed=23)
    grad_out = torch.randn(10, 2, 3, 2, generator=g, dtype=torch.float64)
    (roi_pool(inp, rois, (3, 2)) * grad_out).sum().backward()
    torch.testing.assert_close(inp.grad, ref_roi_pool_grad(inp, rois, (3, 2), 1.0, grad_out), rtol=0, atol=1e-12)


def test_roi_pool_gradcheck():
    g = torch.Generator().manual_seed(24)
    inp = torch.randn(2, 2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)  # no ties
    rois = torch.tensor(
        [[0, 0.0, 0.0, 4.0, 5.0], [1, 1.2, -1.0, 6.0, 3.7], [1, 3.0, 3.0, 3.0, 3.0]], dtype=torch.float64
    )
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (2, 3), 1.0), (inp,))
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, [rois[:1, 1:], rois[1:, 1:]], 2, 0.5), (inp,))


def test_roi_pool_list_format_and_empty():
    g = torch.Generator().manual_seed(25)
    inp = torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([[1.0, 2.0, 5.0, 3.0], [0.0, 0.0, 1.0, 1.0]])]
    rois = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [1, 1.0, 2.0, 5.0, 3.0], [1, 0.0, 0.0, 1.0, 1.0]])
    assert torch.equal(roi_pool(inp, boxes, 2), roi_pool(inp, rois, 2))
    for empty in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]):
        out = roi_pool(inp, empty, (2, 3))
        assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert torch.equal(inp.grad, torch.zeros_like(inp))


def test_roi_pool_wide_bins_chunks_and_layouts(monkeypatch):
    # bins wider than 256 columns need 16-bit window offsets; a tiny gather budget forces one chunk per bin
    import importlib

    roi_pool_module = importlib.import_module("fasterrcnn.ops.roi_pool")
    g = torch.Generator().manual_seed(26)
    inp = torch.randint(0, 5, (1, 2, 3, 600), generator=g).double().requires_grad_()
    rois = torch.tensor([[0, 0.0, 0.0, 599.0, 2.0], [0, 40.0, 1.0, 350.0, 2.0]], dtype=torch.float64)
    grad_out = torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64)
    out = roi_pool(inp, rois, 2)
    expected, _ = ref_roi_pool(inp, rois, 2, 1.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.backward(grad_out)
    torch.testing.assert_close(inp.grad, ref_roi_pool_grad(inp, rois, 2, 1.0, grad_out), rtol=0, atol=1e-12)

    small = torch.randint(0, 3, (2, 3, 9, 11), generator=g).double()
    rois = random_rois(12, 2, 9, 11, 1.0, seed=27)
    expected = roi_pool(small, rois, (3, 2))
    monkeypatch.setattr(roi_pool_module, "_GATHER_BUDGET", 1)
    assert torch.equal(roi_pool(small, rois, (3, 2)), expected)
    # a channels-last input (no transpose) and a strided one give the same values and gradients
    grad_out = torch.randn(12, 3, 3, 2, generator=g, dtype=torch.float64)
    wide = torch.zeros(2, 3, 9, 22, dtype=torch.float64)
    wide[..., ::2] = small
    grads = []
    for x in (small.clone(), small.contiguous(memory_format=torch.channels_last), wide[..., ::2]):
        x.requires_grad_()
        out = roi_pool(x, rois, (3, 2))
        assert torch.equal(out, expected)
        out.backward(grad_out)
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
