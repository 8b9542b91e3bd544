import math

import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler, Subset

from fasterrcnn.data import CocoDetection, GroupedBatchSampler, aspect_ratio_groups, collate, make_data_loader
from fasterrcnn.data.batching import dataset_aspect_ratios, set_epoch
from fasterrcnn.data.synth import generate


class Sized(torch.utils.data.Dataset):
    """Items are (image of the given size, target naming the index)."""

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        h, w = self.sizes[i]
        return torch.zeros(3, h, w), {"image_id": torch.tensor(i), "boxes": torch.zeros(0, 4)}

    def aspect_ratios(self):
        return [w / h for h, w in self.sizes]


SIZES = [(10, 20), (20, 10), (10, 10), (10, 21), (30, 10), (10, 19), (12, 10), (10, 30), (20, 11), (10, 10), (16, 17)]


def test_collate_keeps_lists():
    ds = Sized([(4, 5), (6, 7)])
    images, targets = collate([ds[0], ds[1]])
    assert [tuple(i.shape) for i in images] == [(3, 4, 5), (3, 6, 7)]
    assert [t["image_id"].item() for t in targets] == [0, 1]


def test_aspect_ratio_groups():
    assert aspect_ratio_groups([0.5, 0.99, 1.0, 3.0], bins=0) == [0, 0, 1, 1]
    assert aspect_ratio_groups([0.4, 0.6, 1.0, 1.5, 2.5], bins=[0.5, 1.0, 2.0]) == [0, 1, 2, 2, 3]
    groups = aspect_ratio_groups([0.25, 0.5, 1.0, 2.0, 4.0], bins=1)  # boundaries 1/2, 1, 2
    assert groups == [0, 1, 2, 3, 3]
    with pytest.raises(ValueError):
        aspect_ratio_groups([1.0], bins=[2.0, 1.0])


@pytest.mark.parametrize("drop_last", [False, True])
def test_grouped_batches_are_homogeneous_and_complete(drop_last):
    ds = Sized(SIZES)
    groups = aspect_ratio_groups(ds.aspect_ratios(), bins=0)  # portrait vs landscape
    sampler = GroupedBatchSampler(SequentialSampler(ds), groups, batch_size=3, drop_last=drop_last)
    batches = list(sampler)
    assert len(batches) == len(sampler) == (len(SIZES) // 3 if drop_last else math.ceil(len(SIZES) / 3))
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))
    if not drop_last:
        assert sorted(seen) == list(range(len(SIZES)))
    full_group_batches = [b for b in batches if len({groups[i] for i in b}) == 1]
    assert len(full_group_batches) >= 2
    # batches formed while iterating are single-group; only the leftovers at the end may mix
    for b in batches[: len(full_group_batches)]:
        assert len({groups[i] for i in b}) == 1


def test_grouped_sampler_with_distributed_sampler():
    ds = Sized(SIZES)
    groups = aspect_ratio_groups(ds.aspect_ratios())
    per_rank = []
    for rank in range(2):
        inner = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=5)
        gbs = GroupedBatchSampler(inner, groups, batch_size=2)
        gbs.set_epoch(1)
        assert inner.epoch == 1
        per_rank.append(list(gbs))
        assert len(per_rank[-1]) == len(gbs)
    assert len(per_rank[0]) == len(per_rank[1])  # equal batch counts: no rank waits forever
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(len(SIZES)))


def test_make_data_loader_shuffle_is_seeded():
    ds = Sized(SIZES)

    def order(seed):
        return [t["image_id"].item() for _, ts in make_data_loader(ds, 2, True, seed=seed) for t in ts]

    assert order(1) == order(1)
    assert sorted(order(1)) == list(range(len(SIZES)))
    assert order(1) != order(2)


def test_make_data_loader_without_grouping_and_subset():
    ds = Sized(SIZES)
    loader = make_data_loader(ds, 4, False, aspect_grouping=False)
    assert [len(images) for images, _ in loader] == [4, 4, 3]
    sub = Subset(ds, [1, 4, 6])
    assert dataset_aspect_ratios(sub) == [0.5, 1 / 3, 10 / 12]
    assert len(list(make_data_loader(sub, 2, False))) == 2
    with pytest.raises(TypeError, match="aspect_grouping=False"):
        make_data_loader(torch.utils.data.TensorDataset(torch.zeros(3)), 2, False)


def test_make_data_loader_distributed_and_set_epoch():
    ds = Sized(SIZES)
    loader = make_data_loader(ds, 2, True, distributed=True, num_replicas=2, rank=1, seed=3)
    set_epoch(loader, 4)
    assert loader.batch_sampler.sampler.epoch == 4
    assert sum(len(images) for images, _ in loader) == math.ceil(len(SIZES) / 2)


def test_make_data_loader_with_worker_processes(tmp_path):
    paths = generate(tmp_path / "s", num_train=8, num_val=0, image_size=(64, 80), seed=1)
    ds = CocoDetection(paths.train_json)
    loader = make_data_loader(ds, batch_size=3, shuffle=True, num_workers=2, seed=0)
    ids = []
    for images, targets in loader:
        assert all(img.shape == (3, 64, 80) for img in images)
        ids += [t["image_id"].item() for t in targets]
    assert sorted(ids) == ds.image_ids
