import pytest
import torch
from PIL import Image

from fasterrcnn.data.transforms import (
    ColorJitter,
    Compose,
    RandomHorizontalFlip,
    RandomResize,
    ToTensor,
    train_transforms,
)


def _sample(h=20, w=30):
    image = torch.zeros(3, h, w)
    image[:, 4:10, 2:8] = 1.0  # a white block at x 2..8, y 4..10
    target = {
        "boxes": torch.tensor([[2.0, 4.0, 8.0, 10.0], [10.0, 0.0, 30.0, 20.0]]),
        "labels": torch.tensor([1, 2]),
        "area": torch.tensor([36.0, 400.0]),
        "image_id": torch.tensor(7),
        "iscrowd": torch.tensor([0, 0]),
    }
    return image, target


def _snapshot(image, target):
    return image.clone(), {k: v.clone() for k, v in target.items()}


def _unchanged(before, image, target):
    img0, t0 = before
    assert torch.equal(img0, image)
    assert set(t0) == set(target)
    for k in t0:
        assert torch.equal(t0[k], target[k]), k


ALL = [
    ToTensor(),
    RandomHorizontalFlip(1.0),
    RandomResize([10, 40], 100),
    ColorJitter(0.5, 0.5, 0.5),
    Compose([RandomResize([16], 50), RandomHorizontalFlip(1.0), ColorJitter(0.3, 0.3, 0.3)]),
]


@pytest.mark.parametrize("t", ALL, ids=repr)
def test_never_mutates_inputs(t):
    image, target = _sample()
    before = _snapshot(image, target)
    torch.manual_seed(0)
    out_image, out_target = t(image, target)
    _unchanged(before, image, target)
    assert out_target is not target
    out_target["boxes"] = None  # a new dict: the caller's is not affected
    assert target["boxes"] is not None


@pytest.mark.parametrize("t", ALL, ids=repr)
def test_empty_targets_pass_through(t):
    image, _ = _sample()
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "area": torch.zeros(0)}
    _, out = t(image, target)
    assert out["boxes"].shape == (0, 4)


def test_flip_moves_boxes_with_pixels():
    image, target = _sample()
    img, t = RandomHorizontalFlip(p=1.0)(image, target)
    assert t["boxes"].tolist() == [[22.0, 4.0, 28.0, 10.0], [0.0, 0.0, 20.0, 20.0]]
    x1, y1, x2, y2 = (int(v) for v in t["boxes"][0])
    assert img[:, y1:y2, x1:x2].min() == 1.0  # the white block is inside its flipped box
    assert img.sum() == image.sum()
    img2, t2 = RandomHorizontalFlip(p=1.0)(img, t)
    assert torch.equal(img2, image) and torch.equal(t2["boxes"], target["boxes"])


def test_flip_probability_zero_and_seeded():
    image, target = _sample()
    img, t = RandomHorizontalFlip(p=0.0)(image, target)
    assert torch.equal(img, image) and torch.equal(t["boxes"], target["boxes"])
    g = torch.Generator().manual_seed(3)
    flips_a = [RandomHorizontalFlip(0.5, g)(image, target)[1]["boxes"][0, 0].item() for _ in range(20)]
    g.manual_seed(3)
    flips_b = [RandomHorizontalFlip(0.5, g)(image, target)[1]["boxes"][0, 0].item() for _ in range(20)]
    assert flips_a == flips_b and len(set(flips_a)) == 2


def test_resize_short_side_and_max_size():
    image, target = _sample(20, 30)
    img, t = RandomResize([40], 1000)(image, target)
    assert img.shape == (3, 40, 60)
    assert torch.allclose(t["boxes"], target["boxes"] * 2)
    assert torch.allclose(t["area"], target["area"] * 4)
    img, t = RandomResize([40], 45)(image, target)  # long side capped: 30 -> 45, 20 -> 30
    assert img.shape == (3, 30, 45)
    assert torch.allclose(t["boxes"], target["boxes"] * 1.5)
    assert img.min() >= 0.0 and img.max() <= 1.0


def test_resize_choice_is_random_and_reproducible():
    image, target = _sample(20, 30)
    t = RandomResize([10, 20, 30], 1000)
    torch.manual_seed(0)
    a = [t(image, target)[0].shape[1] for _ in range(30)]
    torch.manual_seed(0)
    b = [t(image, target)[0].shape[1] for _ in range(30)]
    assert a == b and set(a) == {10, 20, 30}


def test_resize_rejects_bad_sizes():
    with pytest.raises(ValueError):
        RandomResize([0], 100)


def test_color_jitter_range_and_boxes():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    target = {"boxes": torch.tensor([[1.0, 1.0, 3.0, 3.0]])}
    torch.manual_seed(1)
    img, t = ColorJitter(0.8, 0.8, 0.8)(image, target)
    assert img.shape == image.shape and not torch.equal(img, image)
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert torch.equal(t["boxes"], target["boxes"])
    img, _ = ColorJitter()(image, target)
    assert torch.equal(img, image)
    with pytest.raises(ValueError):
        ColorJitter(brightness=-1)


def test_saturation_zero_gives_gray():
    image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator()
    jitter = ColorJitter(saturation=1.0, generator=g)
    jitter._factor = lambda x: 0.0  # the lowest factor of the range
    img, _ = jitter(image, {})
    assert torch.allclose(img[0], img[1]) and torch.allclose(img[1], img[2])


def test_to_tensor_from_pil():
    img, t = ToTensor()(Image.new("RGB", (5, 3), (255, 0, 0)), {"labels": torch.tensor([1])})
    assert img.shape == (3, 3, 5) and img[0].min() == 1.0 and img[1].max() == 0.0


def test_train_transforms():
    t = train_transforms(min_sizes=[16], max_size=100, flip_p=0.5, jitter=0.2)
    assert [type(s).__name__ for s in t.transforms] == ["RandomResize", "RandomHorizontalFlip", "ColorJitter"]
    image, target = _sample()
    img, _ = t(image, target)
    assert min(img.shape[-2:]) == 16


def test_seeded_augmentation_depends_only_on_seed_epoch_and_image():
    import random

    import numpy as np
    from torch.utils.data import Subset

    from fasterrcnn.data.transforms import SeededAugmentation, set_augmentation_epoch

    aug = SeededAugmentation(Compose([RandomHorizontalFlip(0.5), ColorJitter(0.5, 0.5, 0.5)]), seed=3)

    def run(image_id, draws_before=0):
        torch.rand(draws_before)  # whatever the process drew before does not matter
        image, target = _sample()
        return aug(image, {**target, "image_id": torch.tensor(image_id)})

    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    first = [run(i) for i in range(8)]
    assert torch.equal(torch.get_rng_state(), torch_state)  # the global RNGs are left as they were
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state[1])
    again = [run(i, draws_before=5 + i) for i in reversed(range(8))][::-1]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"]) for a, b in zip(first, again))
    assert len({tuple(b[1]["boxes"][0].tolist()) for b in first}) == 2  # both flip outcomes occur

    class Wrapped:
        transforms = aug

    set_augmentation_epoch(Subset(Wrapped(), [0]), 1)  # found through a Subset
    assert aug.epoch == 1
    assert any(not torch.equal(a[0], run(i)[0]) for i, a in enumerate(first))  # a new epoch draws anew
    with pytest.raises(KeyError, match="image_id"):
        aug(*_sample()[:1], {"boxes": torch.zeros(0, 4)})
