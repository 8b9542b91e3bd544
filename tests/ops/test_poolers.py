import math

import pytest
import torch

from fasterrcnn.ops import (
    MultiScalePooler,
    MultiScaleRoIAlign,
    MultiScaleRoIPool,
    assign_fpn_levels,
    infer_scale,
    roi_align,
    roi_pool,
)


def square(side, x0=0.0):
    return [x0, 0.0, x0 + side, side]


def test_assign_fpn_levels_hand_values():
    boxes = torch.tensor([square(112), square(224), square(448), square(896)])
    # k = floor(4 + log2(side / 224)): 3, 4, 5, 6 -> clamped to [2, 5], minus k_min = 2
    levels = assign_fpn_levels(boxes, 2, 5)
    assert levels.dtype == torch.int64
    assert levels.tolist() == [1, 2, 3, 3]
    # just below a power of two goes one level down; tiny, zero-area and huge boxes are clamped
    boxes = torch.tensor([square(111.9), square(223.9), square(1.0), [5.0, 5.0, 5.0, 5.0], square(1e5)])
    assert assign_fpn_levels(boxes, 2, 5).tolist() == [0, 1, 0, 0, 3]
    # a 56 x 56 box is level 2 and a 2000 x 2000 one level 7 without clamping
    assert assign_fpn_levels(torch.tensor([square(56), square(2000)]), 0, 10).tolist() == [2, 7]
    # other canonical values: 100 px at level 3 -> 200 px is level 4
    assert assign_fpn_levels(torch.tensor([square(200)]), 2, 5, canonical_scale=100, canonical_level=3).tolist() == [2]
    assert assign_fpn_levels(torch.zeros(0, 4), 2, 5).shape == (0,)


def make_features(batch, channels, height, width, strides, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        str(i): torch.randn(batch, channels, math.ceil(height / s), math.ceil(width / s), generator=g, dtype=dtype)
        for i, s in enumerate(strides)
    }


def random_boxes(k, height, width, seed, max_side):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * torch.tensor([width, height])
    wh = torch.rand(k, 2, generator=g) * max_side + 1
    return torch.cat((xy, xy + wh), 1)


def test_multiscale_matches_per_level_roi_align():
    strides = [4, 8, 16, 32]
    feats = make_features(2, 3, 128, 192, strides, seed=30, dtype=torch.float64)
    feats["pool"] = torch.randn(2, 3, 2, 3, dtype=torch.float64)  # not in featmap_names: ignored
    image_sizes = [(128, 192), (100, 150)]  # original size = (128, 192)
    boxes = [
        random_boxes(25, 128, 192, seed=31, max_side=900).double(),
        random_boxes(15, 100, 150, seed=32, max_side=100).double(),
    ]
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], (7, 5), 2)
    out = pooler(feats, boxes, image_sizes)
    assert out.shape == (40, 3, 7, 5) and out.dtype == torch.float64
    scales, k_min, k_max = pooler.scales_and_levels([feats[k] for k in "0123"], image_sizes)
    assert scales == [0.25, 0.125, 0.0625, 0.03125] and (k_min, k_max) == (2, 5)
    all_boxes = torch.cat(boxes)
    batch = torch.tensor([0] * 25 + [1] * 15)
    levels = assign_fpn_levels(all_boxes, 2, 5)
    assert len(set(levels.tolist())) == 4  # the data exercises every level
    for r in range(40):
        lvl = int(levels[r])
        roi = torch.cat((batch[r : r + 1].double(), all_boxes[r])).view(1, 5)
        expected = roi_align(feats[str(lvl)], roi, (7, 5), scales[lvl], 2, aligned=False)
        torch.testing.assert_close(out[r : r + 1], expected, rtol=0, atol=0)


def test_multiscale_scale_inference_rounds_in_log2():
    # padded feature sizes (ceil) and a smaller second image still give exact powers of two
    feats = make_features(1, 2, 100, 150, [4, 8], seed=33)
    pooler = MultiScaleRoIAlign(["0", "1"], 7, 2)
    scales, k_min, k_max = pooler.scales_and_levels(list(feats.values()), [(100, 150), (90, 40)])
    assert scales == [0.25, 0.125] and (k_min, k_max) == (2, 3)


def test_multiscale_single_map_and_gradients():
    feats = make_features(2, 2, 32, 48, [8], seed=34)
    feats["0"].requires_grad_()
    boxes = [random_boxes(3, 32, 48, seed=35, max_side=20), random_boxes(2, 32, 48, seed=36, max_side=20)]
    pooler = MultiScaleRoIAlign(["0"], 3, 0)
    out = pooler(feats, boxes, [(32, 48), (32, 48)])
    expected = roi_align(feats["0"], boxes, 3, 0.125, 0, aligned=False)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert feats["0"].grad.abs().sum() > 0


def test_multiscale_backward_reaches_every_level():
    feats = make_features(1, 1, 640, 640, [4, 8, 16, 32], seed=37)
    for f in feats.values():
        f.requires_grad_()
    boxes = [torch.tensor([square(60.0), square(150.0), square(300.0), square(600.0)])]
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 2, 2)
    assert assign_fpn_levels(boxes[0], 2, 5).tolist() == [0, 1, 2, 3]
    pooler(feats, boxes, [(640, 640)]).sum().backward()
    assert all(f.grad.abs().sum() > 0 for f in feats.values())


def test_multiscale_empty_boxes_and_dtype():
    feats = make_features(2, 4, 64, 64, [4, 8], seed=38, dtype=torch.float64)
    pooler = MultiScaleRoIAlign(["0", "1"], (7, 7), 2)
    out = pooler(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 64), (64, 64)])
    assert out.shape == (0, 4, 7, 7) and out.dtype == torch.float64
    out = pooler(feats, [torch.tensor([square(10.0)]), torch.zeros(0, 4)], [(64, 64), (64, 64)])
    assert out.shape == (1, 4, 7, 7) and out.dtype == torch.float64


def test_multiscale_errors():
    feats = make_features(1, 2, 64, 64, [4, 16], seed=39)
    with pytest.raises(ValueError, match="level"):
        MultiScaleRoIAlign(["0", "1"], 7, 2)(feats, [torch.tensor([square(10.0)])], [(64, 64)])
    with pytest.raises(KeyError, match="none of the maps"):
        MultiScaleRoIAlign(["x", "y"], 7, 2)(feats, [torch.tensor([square(10.0)])], [(64, 64)])


def test_names_the_features_lack_are_passed_over_and_equal_scales_pool_from_the_first_map():
    # torchvision's pooler: the default names ["0", "1", "2", "3"] fit a backbone with fewer maps, and
    # MobileNetV3's two stride-32 maps send every RoI to the first
    feats = make_features(1, 2, 64, 64, [4, 16], seed=39)
    boxes, sizes = [torch.tensor([square(10.0), [0.0, 0.0, 60.0, 60.0]])], [(64, 64)]
    only = MultiScaleRoIAlign(["0"], 7, 2)(feats, boxes, sizes)
    assert torch.equal(MultiScaleRoIAlign(["0", "x"], 7, 2)(feats, boxes, sizes), only)
    same = {"0": feats["1"], "1": feats["1"] * 2.0 + 1.0}
    first = MultiScaleRoIAlign(["0"], 7, 2)({"0": feats["1"]}, boxes, sizes)
    assert torch.equal(MultiScaleRoIAlign(["0", "1"], 7, 2)(same, boxes, sizes), first)


def test_multiscale_output_is_a_channels_last_view_and_its_gradient_matches_per_level_roi_align():
    strides = [4, 8, 16, 32]
    feats = make_features(2, 3, 128, 192, strides, seed=40, dtype=torch.float64)
    image_sizes = [(128, 192), (128, 160)]
    boxes = [
        random_boxes(20, 128, 192, seed=41, max_side=900).double(),
        random_boxes(12, 128, 160, seed=42, max_side=150).double(),
    ]
    all_boxes, batch = torch.cat(boxes), torch.tensor([0.0] * 20 + [1.0] * 12, dtype=torch.float64)
    levels = assign_fpn_levels(all_boxes, 2, 5)
    assert len(set(levels.tolist())) == 4
    g = torch.Generator().manual_seed(43)
    probe = torch.randn(32, 3, 7, 7, generator=g, dtype=torch.float64)

    leaves = {k: v.clone().requires_grad_() for k, v in feats.items()}
    out = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(leaves, boxes, image_sizes)
    # [R, C, oh, ow] with channels-last strides: its (R, oh, ow, C) permutation is the contiguous rows
    assert out.shape == (32, 3, 7, 7) and out.permute(0, 2, 3, 1).is_contiguous()
    (out * probe).sum().backward()

    ref_leaves = {k: v.clone().requires_grad_() for k, v in feats.items()}
    total = 0.0
    for r in range(32):
        lvl = int(levels[r])
        roi = torch.cat((batch[r : r + 1], all_boxes[r])).view(1, 5)
        piece = roi_align(ref_leaves[str(lvl)], roi, 7, 1.0 / strides[lvl], 2, aligned=False)
        torch.testing.assert_close(out[r : r + 1].detach(), piece.detach(), rtol=0, atol=0)
        total = total + (piece * probe[r : r + 1]).sum()
    total.backward()
    for k in leaves:
        torch.testing.assert_close(leaves[k].grad, ref_leaves[k].grad, rtol=1e-12, atol=1e-12)


def test_multiscale_on_bfloat16_maps_keeps_the_boxes_in_float32():
    # boxes far from the origin with fractional corners: rounded to bfloat16 (8 bits) they would move by
    # up to 2 pixels and read other features; the bf16 result must instead be the float32 one, rounded
    feats = make_features(1, 8, 512, 768, [4, 8], seed=44)
    feats_bf16 = {k: v.to(torch.bfloat16) for k, v in feats.items()}
    g = torch.Generator().manual_seed(45)
    xy = 500 + torch.rand(30, 2, generator=g) * 200
    boxes = [torch.cat((xy, xy + 20 + torch.rand(30, 2, generator=g) * 40), 1)]
    pooler = MultiScaleRoIAlign(["0", "1"], 7, 2)
    out = pooler(feats_bf16, boxes, [(512, 768)])
    assert out.dtype == torch.bfloat16
    expected = pooler({k: v.float() for k, v in feats_bf16.items()}, boxes, [(512, 768)])
    # one bfloat16 rounding of the weights and of the output: a few parts in a thousand
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=2e-2)
    rounded = pooler({k: v.float() for k, v in feats_bf16.items()}, [boxes[0].to(torch.bfloat16).float()], [(512, 768)])
    assert (rounded - expected).abs().max() > 0.1  # the test can tell rounded boxes apart


def test_roi_levels_are_the_maps_forward_pools_from():
    strides = [4, 8, 16, 32]
    feats = make_features(2, 3, 256, 256, strides, seed=45, dtype=torch.float64)
    boxes = [random_boxes(20, 256, 256, seed=46, max_side=250), random_boxes(15, 256, 256, seed=47, max_side=120)]
    image_sizes = [(256, 256), (200, 240)]
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 3, 2, canonical_scale=56)  # RoIs on every level
    levels = pooler.roi_levels(feats, boxes, image_sizes)
    assert levels.dtype == torch.int64 and set(levels.tolist()) == {0, 1, 2, 3}
    out = pooler(feats, boxes, image_sizes)
    batch = torch.cat([torch.full((len(b),), float(i)) for i, b in enumerate(boxes)]).double()
    for r, (lvl, box) in enumerate(zip(levels.tolist(), torch.cat(boxes).double())):
        roi = torch.cat((batch[r : r + 1], box)).view(1, 5)
        expected = roi_align(feats[str(lvl)], roi, 3, 1 / strides[lvl], 2)
        torch.testing.assert_close(out[r : r + 1], expected, rtol=0, atol=0)
    one_map = MultiScaleRoIAlign(["2"], 3, 2)
    assert one_map.roi_levels(feats, boxes, image_sizes).tolist() == [0] * 35


def test_infer_scale_is_the_power_of_two_nearest_in_log2():
    # the ratio of the map's height to the batch's largest image height, rounded in log2
    assert infer_scale(torch.zeros(1, 1, 25, 38), [(100, 150), (90, 40)]) == 0.25
    assert infer_scale(torch.zeros(1, 1, 13, 19), [(100, 150)]) == 0.125  # 0.13 (a padded map): 2^-3
    assert infer_scale(torch.zeros(1, 1, 50, 10), [(40, 150), (100, 20)]) == 0.5  # heights only
    assert infer_scale(torch.zeros(1, 1, 64, 64), [(64, 64)]) == 1.0


def test_roipool_pooler_is_a_sibling_of_the_roialign_one():
    feats = make_features(1, 2, 64, 64, [4, 8], seed=48, dtype=torch.float64)
    boxes = [torch.tensor([square(10.0), square(40.0, 8.0)])]
    pool = MultiScaleRoIPool(["0", "1"], 2, canonical_scale=16, canonical_level=2)
    assert isinstance(pool, MultiScalePooler) and not isinstance(pool, MultiScaleRoIAlign)
    levels = pool.roi_levels(feats, boxes, [(64, 64)])
    assert levels.tolist() == [0, 1]  # sides 10 and 40 at canonical 16 / level 2: k = 2 and 3
    out = pool(feats, boxes, [(64, 64)])
    for r, lvl in enumerate(levels.tolist()):
        roi = torch.cat((torch.zeros(1, dtype=torch.float64), boxes[0][r].double())).view(1, 5)
        torch.testing.assert_close(out[r : r + 1], roi_pool(feats[str(lvl)], roi, 2, 0.25 / 2**lvl), rtol=0, atol=0)
