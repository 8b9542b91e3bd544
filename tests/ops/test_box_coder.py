import math

import torch

from fasterrcnn.ops import BoxCoder

CLIP = math.log(1000.0 / 16)


def test_encode_hand_values_unit_weights():
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # centre (5, 5), size 10 x 10
    gt = torch.tensor([[2.0, 3.0, 12.0, 23.0]])  # centre (7, 13), size 10 x 20
    deltas = BoxCoder().encode(gt, proposal)
    # dx = (7 - 5) / 10, dy = (13 - 5) / 10, dw = log(10 / 10), dh = log(20 / 10)
    torch.testing.assert_close(deltas, torch.tensor([[0.2, 0.8, 0.0, 0.6931471805599453]]))


def test_encode_hand_values_box_head_weights():
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[2.0, 3.0, 12.0, 23.0]])
    deltas = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(gt, proposal)
    torch.testing.assert_close(deltas, torch.tensor([[2.0, 8.0, 0.0, 3.4657359027997265]]))


def test_decode_hand_values():
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # centre (20, 40), size 20 x 40
    deltas = torch.tensor([[0.5, -0.25, math.log(2.0), 0.0]])
    # centre (20 + 0.5 * 20, 40 - 0.25 * 40) = (30, 30), size 40 x 40
    out = BoxCoder().decode(deltas, box)
    torch.testing.assert_close(out, torch.tensor([[10.0, 10.0, 50.0, 50.0]]))


def test_round_trip_with_weights():
    g = torch.Generator().manual_seed(0)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights)
        xy = torch.rand(50, 2, generator=g, dtype=torch.float64) * 100
        props = torch.cat((xy, xy + 1 + torch.rand(50, 2, generator=g, dtype=torch.float64) * 50), 1)
        xy = torch.rand(50, 2, generator=g, dtype=torch.float64) * 100
        gts = torch.cat((xy, xy + 1 + torch.rand(50, 2, generator=g, dtype=torch.float64) * 50), 1)
        deltas = coder.encode(gts, props)
        torch.testing.assert_close(coder.decode(deltas, props), gts)


def test_decode_clamps_dw_dh_at_log_1000_over_16():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = BoxCoder().decode(torch.tensor([[0.0, 0.0, 10.0, -10.0]]), box)
    w = out[0, 2] - out[0, 0]
    h = out[0, 3] - out[0, 1]
    torch.testing.assert_close(w, torch.tensor(10.0 * 1000.0 / 16))  # clamped: exp(log(62.5)) * 10
    torch.testing.assert_close(h, torch.tensor(10.0 * math.exp(-10.0)))  # only the max is clamped
    # with weights, the clamp applies after dividing by the weight: 50 / 5 = 10 -> clamped; 15 / 5 = 3 -> not
    out = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(torch.tensor([[0.0, 0.0, 50.0, 15.0]]), box)
    torch.testing.assert_close(out[0, 2] - out[0, 0], torch.tensor(625.0))
    torch.testing.assert_close(out[0, 3] - out[0, 1], torch.tensor(10.0 * math.exp(3.0)))
    assert BoxCoder().bbox_xform_clip == CLIP


def test_decode_class_specific_groups_share_the_box():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0]])
    deltas = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    out = coder.decode(deltas, boxes)
    assert out.shape == (2, 12)
    for k in range(3):
        torch.testing.assert_close(out[:, 4 * k : 4 * k + 4], coder.decode(deltas[:, 4 * k : 4 * k + 4], boxes))


def test_empty_and_dtype():
    coder = BoxCoder()
    assert coder.decode(torch.zeros(0, 8), torch.zeros(0, 4)).shape == (0, 8)
    assert coder.encode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    out = coder.decode(torch.zeros(1, 4, dtype=torch.float64), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert out.dtype == torch.float64
