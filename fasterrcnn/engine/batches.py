"""The training batches: a fixed, seeded order per epoch, resumable in the middle of an epoch."""

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from ..data import make_data_loader
from ..data.transforms import set_augmentation_epoch


class EpochBatches:
    """Batches in a fixed, seeded order per epoch, resumable in the middle of an epoch."""

    def __init__(
        self, dataset, *, batch_size: int, num_workers: int, seed: int, aspect_grouping: bool, distributed: bool
    ):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.seed, self.aspect_grouping, self.distributed = seed, aspect_grouping, distributed

    def loader(self, epoch: int, skip: int = 0) -> DataLoader:
        set_augmentation_epoch(self.dataset, epoch)  # before the workers take their copy of the dataset
        base = make_data_loader(
            self.dataset,
            self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            distributed=self.distributed,
            seed=self.seed + epoch,
            aspect_grouping=self.aspect_grouping,
            drop_last=True,
        )
        if skip == 0:
            return base
        assert base.batch_sampler is not None  # make_data_loader always batches
        batches = list(base.batch_sampler)[skip:]  # indices only: nothing is decoded for skipped batches
        return DataLoader(
            base.dataset,
            batch_sampler=batches,
            num_workers=base.num_workers,
            collate_fn=base.collate_fn,
            worker_init_fn=base.worker_init_fn,
            generator=base.generator,
        )

    def batches_per_epoch(self) -> int:
        return len(self.loader(0))


class BatchStream:
    """The batches from a run's position on, across epochs: taking one advances ``position.epoch``
    and ``position.batch_in_epoch``, so that a checkpoint says where the next one comes from."""

    def __init__(self, batches: EpochBatches, position):
        self.batches, self.position = batches, position
        self._iter: Iterator[Any] | None = iter(batches.loader(position.epoch, skip=position.batch_in_epoch))

    def next(self):
        assert self._iter is not None, "the batch stream is closed"
        try:
            batch = next(self._iter)
        except StopIteration:
            self.position.epoch, self.position.batch_in_epoch = self.position.epoch + 1, 0
            self._iter = iter(self.batches.loader(self.position.epoch))
            batch = next(self._iter)
        self.position.batch_in_epoch += 1
        return batch

    def close(self) -> None:
        """Shut the loader's workers down now (even if a traceback keeps a reference to this)."""
        self._iter = None
