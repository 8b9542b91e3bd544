import math

import torch

from fasterrcnn.ops import box_area, box_iou, clip_boxes_to_image, min_size_mask, remove_small_boxes


def test_box_area_hand_values():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0], [-1.0, -2.0, 1.0, 2.0]])
    assert torch.equal(box_area(boxes), torch.tensor([6.0, 0.0, 8.0]))


def test_box_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 2.0, 1.0]])
    iou = box_iou(a, b)
    # [0,0,2,2] vs [1,1,3,3]: inter 1, union 4 + 4 - 1 = 7
    expected = torch.tensor([[1 / 7, 1.0, 0.0, 2 / 4], [0.0, 1 / 4, 0.0, 1 / 2]])
    assert iou.shape == (2, 4)
    torch.testing.assert_close(iou, expected)


def test_box_iou_zero_area_is_zero_not_nan():
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 4.0]])
    b = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    iou = box_iou(a, b)
    assert not torch.isnan(iou).any()
    assert torch.equal(iou, torch.zeros(2, 2))


def test_box_iou_gradient_is_finite_for_degenerate_pairs():
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]], requires_grad=True)
    box_iou(a, a.detach()).sum().backward()
    assert torch.isfinite(a.grad).all()


def test_box_iou_empty():
    assert box_iou(torch.zeros(0, 4), torch.zeros(3, 4)).shape == (0, 3)
    assert box_iou(torch.zeros(2, 4), torch.zeros(0, 4)).shape == (2, 0)
    assert box_area(torch.zeros(0, 4)).shape == (0,)


def test_box_iou_matches_plain_loop():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g, dtype=torch.float64) * 50
    wh = torch.rand(20, 2, generator=g, dtype=torch.float64) * 30
    boxes = torch.cat((xy, xy + wh), 1)
    iou = box_iou(boxes[:12], boxes[12:])
    for i in range(12):
        for j in range(8):
            p, q = boxes[i].tolist(), boxes[12 + j].tolist()
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            assert math.isclose(iou[i, j].item(), inter / union, rel_tol=1e-12, abs_tol=1e-15)


def test_clip_boxes_any_leading_dims():
    boxes = torch.tensor([[[-5.0, -1.0, 30.0, 12.0], [3.0, 4.0, 5.0, 6.0], [25.0, 15.0, 40.0, 40.0]]] * 2)
    assert boxes.shape == (2, 3, 4)
    clipped = clip_boxes_to_image(boxes, (10, 20))  # h = 10, w = 20
    expected = torch.tensor([[0.0, 0.0, 20.0, 10.0], [3.0, 4.0, 5.0, 6.0], [20.0, 10.0, 20.0, 10.0]])
    assert clipped.shape == (2, 3, 4)
    assert torch.equal(clipped[0], expected) and torch.equal(clipped[1], expected)
    assert clip_boxes_to_image(torch.zeros(0, 4), (5, 5)).shape == (0, 4)
    flat = clip_boxes_to_image(torch.tensor([[-1.0, 2.0, 7.0, 12.0]]), (10, 5))
    assert torch.equal(flat, torch.tensor([[0.0, 2.0, 5.0, 10.0]]))


def test_remove_small_boxes():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # exactly min_size: kept
            [0.0, 0.0, 0.5, 2.0],  # too narrow
            [0.0, 0.0, 2.0, 0.99],  # too short
            [5.0, 5.0, 9.0, 9.0],
        ]
    )
    keep = remove_small_boxes(boxes, 1.0)
    assert keep.dtype == torch.int64
    assert keep.tolist() == [0, 3]
    empty = remove_small_boxes(torch.zeros(0, 4), 1.0)
    assert empty.dtype == torch.int64 and empty.shape == (0,)


def test_clip_boxes_each_to_its_own_image():
    # a batch [B, K, 4] with sizes [B, 1, 2], and flat boxes [M, 4] with one (h, w) per box
    boxes = torch.tensor(
        [[[-5.0, -1.0, 30.0, 12.0], [3.0, 4.0, 50.0, 60.0]], [[-5.0, -1.0, 30.0, 12.0], [3.0, 4.0, 50.0, 60.0]]]
    )
    sizes = torch.tensor([[10, 20], [40, 45]])  # (h, w)
    clipped = clip_boxes_to_image(boxes, sizes[:, None, :])
    for i, (h, w) in enumerate(sizes.tolist()):
        assert torch.equal(clipped[i], clip_boxes_to_image(boxes[i], (h, w)))
    assert clipped[1].tolist() == [[0.0, 0.0, 30.0, 12.0], [3.0, 4.0, 45.0, 40.0]]
    flat = clip_boxes_to_image(boxes.reshape(-1, 4), sizes.repeat_interleave(2, dim=0))
    assert torch.equal(flat, clipped.reshape(-1, 4))


def test_min_size_mask_is_remove_small_boxes_as_a_mask():
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 2.0]], [[0.0, 0.0, 2.0, 0.99], [5.0, 5.0, 9.0, 9.0]]])
    mask = min_size_mask(boxes, 1.0)
    assert mask.dtype == torch.bool and mask.tolist() == [[True, False], [False, True]]
    assert torch.equal(torch.nonzero(mask.reshape(-1)).flatten(), remove_small_boxes(boxes.reshape(-1, 4), 1.0))
