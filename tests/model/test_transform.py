import torch

from fasterrcnn.model.transform import DetectionTransform, resize_boxes


def test_resize_keeps_aspect_and_respects_max_size():
    t = DetectionTransform(min_size=100, max_size=150).eval()
    images = [torch.rand(3, 50, 60), torch.rand(3, 40, 120)]
    batch, _ = t(images)
    # 50x60 -> scale 2 -> 100x120; 40x120: 100/40 = 2.5 would give 300 > 150 -> scale 1.25 -> 50x150
    assert batch.image_sizes == [(100, 120), (50, 150)]
    assert batch.tensors.shape == (2, 3, 128, 160)  # padded up to multiples of 32
    assert float(batch.tensors[1, :, 50:, :].abs().sum()) == 0.0  # padding is zero


def test_normalize_and_boxes_follow_the_image():
    t = DetectionTransform(min_size=20, max_size=100, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)).eval()
    image = torch.full((3, 10, 20), 0.75)
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 10.0, 8.0]]), "labels": torch.tensor([1])}]
    batch, out = t([image], targets)
    assert torch.allclose(batch.tensors[0, :, :20, :40], torch.full((3, 20, 40), 0.5))
    assert torch.equal(out[0]["boxes"], torch.tensor([[4.0, 6.0, 20.0, 16.0]]))
    assert torch.equal(targets[0]["boxes"], torch.tensor([[2.0, 3.0, 10.0, 8.0]]))  # caller's data untouched


def test_postprocess_maps_back_to_original_size():
    t = DetectionTransform(min_size=20, max_size=100).eval()
    dets = [
        {"boxes": torch.tensor([[4.0, 6.0, 20.0, 16.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    ]
    back = t.postprocess(dets, [(20, 40)], [(10, 20)])
    assert torch.equal(back[0]["boxes"], torch.tensor([[2.0, 3.0, 10.0, 8.0]]))
    assert torch.equal(resize_boxes(torch.zeros(0, 4), (10, 10), (20, 20)), torch.zeros(0, 4))


def test_multiscale_choice_only_in_training():
    t = DetectionTransform(min_size=(32, 64), max_size=1000)
    t.train()
    sizes = {t([torch.rand(3, 16, 16)])[0].image_sizes[0] for _ in range(30)}
    assert sizes == {(32, 32), (64, 64)}
    t.eval()
    assert t([torch.rand(3, 16, 16)])[0].image_sizes[0] == (64, 64)
