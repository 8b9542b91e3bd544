import importlib
import math

import numpy as np
import pytest
import torch

from fasterrcnn.ops import roi_align

roi_align_module = importlib.import_module("fasterrcnn.ops.roi_align")


def ref_bilinear(fmap, y, x, dt):
    """fmap: float64 array [C, H, W]; y, x: numpy scalars of dtype dt."""
    _, height, width = fmap.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(fmap.shape[0])
    y = max(y, dt(0))
    x = max(x, dt(0))
    y_low, x_low = int(math.floor(y)), int(math.floor(x))
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = dt(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = dt(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - dt(y_low), x - dt(x_low)
    hy, hx = dt(1) - ly, dt(1) - lx
    return (
        float(hy * hx) * fmap[:, y_low, x_low]
        + float(hy * lx) * fmap[:, y_low, x_high]
        + float(ly * hx) * fmap[:, y_high, x_low]
        + float(ly * lx) * fmap[:, y_high, x_high]
    )


def ref_roi_align(inp, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Plain loops. Coordinates in the input's precision (as the op), sums in float64."""
    dt = np.float64 if inp.dtype == torch.float64 else np.float32
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    x = inp.detach().double().numpy()
    out = np.zeros((len(rois), x.shape[1], oh, ow))
    s = dt(spatial_scale)
    offset = dt(0.5) if aligned else dt(0)
    for k, (b, x1, y1, x2, y2) in enumerate(np.asarray(rois, dtype=dt)):
        start_x, start_y = x1 * s - offset, y1 * s - offset
        roi_w, roi_h = x2 * s - offset - start_x, y2 * s - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, dt(1)), max(roi_h, dt(1))
        bin_h, bin_w = roi_h / dt(oh), roi_w / dt(ow)
        gh = sampling_ratio if sampling_ratio > 0 else max(int(math.ceil(roi_h / dt(oh))), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(int(math.ceil(roi_w / dt(ow))), 0)
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                acc = np.zeros(x.shape[1])
                for iy in range(gh):
                    yy = start_y + dt(ph) * bin_h + (dt(iy) + dt(0.5)) * bin_h / dt(gh)
                    for ix in range(gw):
                        xx = start_x + dt(pw) * bin_w + (dt(ix) + dt(0.5)) * bin_w / dt(gw)
                        acc += ref_bilinear(x[int(b)], yy, xx, dt)
                out[k, :, ph, pw] = acc / count
    return torch.from_numpy(out)


def random_rois(k, n, height, width, spatial_scale, seed, dtype=torch.float64, tiny=False):
    """Boxes in input pixels, partly / fully outside the map, some tiny."""
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = height / spatial_scale, width / spatial_scale
    x1 = torch.rand(k, generator=g, dtype=torch.float64) * img_w * 1.4 - 0.2 * img_w
    y1 = torch.rand(k, generator=g, dtype=torch.float64) * img_h * 1.4 - 0.2 * img_h
    w = torch.rand(k, generator=g, dtype=torch.float64) * img_w * (0.1 if tiny else 0.8)
    h = torch.rand(k, generator=g, dtype=torch.float64) * img_h * (0.1 if tiny else 0.8)
    b = torch.randint(0, n, (k,), generator=g).double()
    return torch.stack((b, x1, y1, x1 + w, y1 + h), 1).to(dtype)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, -1, 1, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 0.25])
def test_roi_align_matches_reference_float64(aligned, sampling_ratio, spatial_scale):
    g = torch.Generator().manual_seed(7)
    inp = torch.randn(2, 3, 7, 9, generator=g, dtype=torch.float64)  # non-square
    rois = torch.cat(
        (random_rois(12, 2, 7, 9, spatial_scale, seed=1), random_rois(6, 2, 7, 9, spatial_scale, seed=2, tiny=True))
    )
    out = roi_align(inp, rois, (3, 2), spatial_scale, sampling_ratio, aligned)
    assert out.shape == (18, 3, 3, 2) and out.dtype == torch.float64
    expected = ref_roi_align(inp, rois, (3, 2), spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_matches_reference_float32(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(8)
    inp = torch.randn(1, 4, 10, 6, generator=g)
    rois = random_rois(15, 1, 10, 6, 0.5, seed=3, dtype=torch.float32)
    out = roi_align(inp, rois, 3, 0.5, sampling_ratio, aligned)
    assert out.dtype == torch.float32
    expected = ref_roi_align(inp, rois, 3, 0.5, sampling_ratio, aligned).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_roi_align_degenerate_boxes():
    inp = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, 2.0, 2.0, 2.0, 2.0],  # zero size
            [0, 3.0, 3.0, 1.0, 1.0],  # inverted
            [0, -20.0, -20.0, -10.0, -10.0],  # fully outside (top-left)
            [0, 30.0, 1.0, 40.0, 5.0],  # fully outside (right)
            [0, 5.5, 5.5, 5.9, 5.9],  # tiny, at the last row / column
            [0, -1.5, -0.7, 0.3, 0.2],
        ],
        dtype=torch.float64,
    )  # straddling the top-left border
    for aligned in (False, True):
        for sr in (0, 2):
            out = roi_align(inp, rois, 2, 1.0, sr, aligned)
            torch.testing.assert_close(out, ref_roi_align(inp, rois, 2, 1.0, sr, aligned), rtol=1e-12, atol=1e-12)
    out = roi_align(inp, rois[2:4], 2, 1.0, 2, False)
    assert torch.equal(out, torch.zeros_like(out))


def test_roi_align_hand_values_on_arange_map():
    x = torch.arange(16.0).view(1, 1, 4, 4)  # value = 4 * y + x
    # one sample at the centre (1.5, 1.5) of the box (0, 0)-(3, 3): 4 * 1.5 + 1.5
    out = roi_align(x, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]]), 1, sampling_ratio=1)
    assert out.item() == 7.5
    # 2x2 bins of size 1.5; adaptive grid ceil(1.5) = 2, so samples at 0.375 and 1.125 in the first bin:
    # mean y = 0.75, mean x = 0.75 -> 4 * 0.75 + 0.75 = 3.75 (the map is linear, bilinear is exact)
    out = roi_align(x, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]]), 2)
    torch.testing.assert_close(out, torch.tensor([[[[3.75, 5.25], [9.75, 11.25]]]]))
    # aligned: start -0.5, bins of 1.5, samples at y = -0.125 (read as 0) and 0.625
    # -> mean over {0, 0.625} x {0, 0.625}: (0 + 0.625 + 2.5 + 3.125) / 4
    out = roi_align(x, [torch.tensor([[0.0, 0.0, 3.0, 3.0]])], 2, aligned=True)
    assert out[0, 0, 0, 0].item() == 1.5625
    # a sample beyond the last row/column reads the border value: y = x = 3.5 -> 15
    out = roi_align(x, torch.tensor([[0, 3.0, 3.0, 4.0, 4.0]]), 1, sampling_ratio=1)
    assert out.item() == 15.0
    # spatial_scale 0.5: box (0, 0)-(4, 4) in image pixels is (0, 0)-(2, 2) on the map, centre (1, 1) -> 5
    out = roi_align(x, torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), 1, spatial_scale=0.5, sampling_ratio=1)
    assert out.item() == 5.0


def test_roi_align_list_and_tensor_formats_agree():
    g = torch.Generator().manual_seed(10)
    inp = torch.randn(3, 2, 8, 5, generator=g)
    boxes = [random_rois(4, 1, 8, 5, 1.0, seed=s, dtype=torch.float32)[:, 1:] for s in (11, 12, 13)]
    boxes[1] = boxes[1][:0]  # an image without boxes
    rois = torch.cat([torch.cat((torch.full((len(b), 1), float(i)), b), 1) for i, b in enumerate(boxes)])
    a = roi_align(inp, boxes, (2, 3), 1.0, 2, True)
    b = roi_align(inp, rois, (2, 3), 1.0, 2, True)
    assert a.shape == (8, 2, 2, 3)
    assert torch.equal(a, b)
    # each RoI reads its own image
    torch.testing.assert_close(a[4:], roi_align(inp[2:3], [boxes[2]], (2, 3), 1.0, 2, True))


def test_roi_align_empty():
    inp = torch.randn(2, 3, 5, 5, requires_grad=True)
    for boxes in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)], []):
        out = roi_align(inp, boxes, (2, 3), 0.5, 2, False)
        assert out.shape == (0, 3, 2, 3) and out.dtype == torch.float32
    out.sum().backward()
    assert torch.equal(inp.grad, torch.zeros_like(inp))
    assert roi_align(inp.detach(), torch.zeros(0, 5), 7, sampling_ratio=0).shape == (0, 3, 7, 7)


def test_roi_align_gradcheck():
    g = torch.Generator().manual_seed(11)
    inp = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.4, 3.9, 4.2], [1, -1.2, 1.1, 2.5, 7.0], [1, 2.2, 0.1, 8.3, 3.3]], dtype=torch.float64
    )
    for aligned in (False, True):
        for sr in (0, 2):
            assert torch.autograd.gradcheck(
                lambda t, sr=sr, aligned=aligned: roi_align(t, rois, (2, 3), 0.8, sr, aligned), (inp,)
            )


def test_roi_align_backward_matches_reference_weights():
    # the gradient of <out, G> w.r.t. the input is linear: check it against the reference by probing
    g = torch.Generator().manual_seed(12)
    inp = torch.randn(1, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 3.5, 2.5], [0, 1.0, 1.0, 1.5, 1.5]], dtype=torch.float64)
    grad_out = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)
    (roi_align(inp, rois, 2, 1.0, 0, False) * grad_out).sum().backward()
    expected = torch.zeros(4, 5, dtype=torch.float64)
    for yy in range(4):
        for xx in range(5):
            probe = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
            probe[0, 0, yy, xx] = 1
            expected[yy, xx] = (ref_roi_align(probe, rois, 2, 1.0, 0, False) * grad_out).sum()
    torch.testing.assert_close(inp.grad[0, 0], expected, rtol=1e-12, atol=1e-12)


def test_roi_align_adaptive_groups_and_chunks(monkeypatch):
    # boxes of very different sizes -> several grid groups; a small budget forces several chunks per group
    g = torch.Generator().manual_seed(13)
    inp = torch.randn(2, 2, 20, 24, generator=g, dtype=torch.float64)
    rois = torch.cat(
        (
            random_rois(10, 2, 20, 24, 1.0, seed=14),
            random_rois(10, 2, 20, 24, 1.0, seed=15, tiny=True),
            torch.tensor([[1, -5.0, -5.0, 40.0, 30.0]], dtype=torch.float64),
        )
    )
    full = roi_align(inp, rois, 2, 1.0, 0, False)
    torch.testing.assert_close(full, ref_roi_align(inp, rois, 2, 1.0, 0, False), rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(roi_align_module, "_TAP_BUDGET", 50)
    torch.testing.assert_close(roi_align(inp, rois, 2, 1.0, 0, False), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        roi_align(inp, rois, 2, 1.0, 2, True), ref_roi_align(inp, rois, 2, 1.0, 2, True), rtol=1e-12, atol=1e-12
    )


def test_roi_align_low_precision_input():
    g = torch.Generator().manual_seed(16)
    inp = torch.randn(1, 3, 6, 6, generator=g)
    rois = torch.tensor([[0, 0.5, 0.5, 4.5, 5.0]])
    out = roi_align(inp.to(torch.bfloat16), rois, 2, 1.0, 2, True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), roi_align(inp.to(torch.bfloat16).float(), rois, 2, 1.0, 2, True), rtol=1e-2, atol=1e-2
    )


def test_roi_align_rejects_bad_batch_index():
    with pytest.raises(ValueError, match="batch"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.tensor([[1, 0.0, 0.0, 2.0, 2.0]]), 2)


def test_roi_align_any_memory_layout():
    g = torch.Generator().manual_seed(17)
    inp = torch.randn(2, 5, 6, 7, generator=g)
    rois = random_rois(8, 2, 6, 7, 1.0, seed=18, dtype=torch.float32)
    expected = roi_align(inp, rois, 3, 1.0, 2, False)
    torch.testing.assert_close(
        roi_align(inp.contiguous(memory_format=torch.channels_last), rois, 3, 1.0, 2, False), expected, rtol=0, atol=0
    )
    wide = torch.randn(2, 5, 6, 14, generator=g)
    wide[..., ::2] = inp
    torch.testing.assert_close(roi_align(wide[..., ::2], rois, 3, 1.0, 2, False), expected, rtol=0, atol=0)


def test_roi_align_gradient_is_contiguous_nchw():
    # the channels-last transpose is its own autograd function: the input gets a plain NCHW gradient,
    # equal to the one of the generic permuted path
    from fasterrcnn.ops._utils import to_channels_first, to_channels_last

    g = torch.Generator().manual_seed(19)
    x = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    assert torch.equal(to_channels_last(x), x.permute(0, 2, 3, 1))
    assert torch.equal(to_channels_first(to_channels_last(x)), x)
    rois = random_rois(9, 2, 6, 7, 1.0, seed=20)
    grad_out = torch.randn(9, 5, 3, 3, generator=g, dtype=torch.float64)
    a = x.clone().requires_grad_()
    roi_align(a, rois, 3, 1.0, 2, True).backward(grad_out)
    b = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    roi_align(b, rois, 3, 1.0, 2, True).backward(grad_out)
    assert a.grad.is_contiguous()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_roi_align_rows_is_roi_align_before_its_transpose():
    from fasterrcnn.ops.roi_align import roi_align_rows

    g = torch.Generator().manual_seed(17)
    inp = torch.randn(2, 5, 12, 16, generator=g, dtype=torch.float64)
    rois = torch.cat((random_rois(6, 2, 12, 16, 1.0, seed=18), random_rois(4, 2, 12, 16, 1.0, seed=19, tiny=True)))
    for sampling in (0, 2):
        rows = roi_align_rows(inp, rois, (3, 4), 1.0, sampling, False)
        assert rows.shape == (10, 12, 5) and rows.is_contiguous()
        torch.testing.assert_close(
            rows.view(10, 3, 4, 5).permute(0, 3, 1, 2),
            roi_align(inp, rois, (3, 4), 1.0, sampling, False),
            rtol=0,
            atol=0,
        )
    assert roi_align_rows(inp, rois[:0], 3).shape == (0, 9, 5)
