import math

import torch

from fasterrcnn.model.anchors import AnchorGenerator, cell_anchors


def test_cell_anchors_hand_derived():
    # size 32: ratio 0.5 -> w = 32/sqrt(.5) = 45.25, h = 22.63 -> half sides 22.63, 11.31 -> rounded 23, 11
    # ratio 1 -> 16, 16; ratio 2 -> w 22.63, h 45.25 -> 11, 23
    got = cell_anchors((32,), (0.5, 1.0, 2.0))
    expected = torch.tensor([[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]])
    assert torch.equal(got, expected)


def test_cell_anchors_ratio_major_order():
    got = cell_anchors((128, 256), (1.0, 2.0))
    # ratio 1 with sizes 128, 256; then ratio 2 (h = s*sqrt2, w = s/sqrt2)
    h2 = [round(s * math.sqrt(2) / 2) for s in (128, 256)]
    w2 = [round(s / math.sqrt(2) / 2) for s in (128, 256)]
    expected = torch.tensor(
        [[-64, -64, 64, 64], [-128, -128, 128, 128], [-w2[0], -h2[0], w2[0], h2[0]], [-w2[1], -h2[1], w2[1], h2[1]]],
        dtype=torch.float32,
    )
    assert torch.equal(got, expected)


def test_grid_anchors_layout_and_strides():
    gen = AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((1.0,),))
    images = torch.zeros(2, 3, 64, 96)
    feats = [torch.zeros(2, 8, 16, 24), torch.zeros(2, 8, 8, 12)]  # strides 4 and 8
    anchors = gen(images, feats)
    assert len(anchors) == 2 and torch.equal(anchors[0], anchors[1])
    a = anchors[0]
    assert a.shape == (16 * 24 + 8 * 12, 4)
    # level 0, row 0: x shifts 0, 4, 8, ...; the anchor at (row 1, col 2) is index 1*24 + 2
    assert torch.equal(a[0], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    assert torch.equal(a[1], torch.tensor([-12.0, -16.0, 20.0, 16.0]))
    assert torch.equal(a[1 * 24 + 2], torch.tensor([8.0 - 16, 4.0 - 16, 8.0 + 16, 4.0 + 16]))
    # level 1 starts after level 0, stride 8, size 64
    assert torch.equal(a[16 * 24 + 12 + 1], torch.tensor([8.0 - 32, 8.0 - 32, 8.0 + 32, 8.0 + 32]))


def test_anchor_levels_must_match_feature_maps():
    gen = AnchorGenerator()
    try:
        gen(torch.zeros(1, 3, 64, 64), [torch.zeros(1, 4, 16, 16)])
    except ValueError as e:
        assert "feature maps" in str(e)
    else:
        raise AssertionError("a level-count mismatch must be refused")
