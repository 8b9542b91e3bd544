"""Batching: collate to lists, aspect-ratio grouped batches, and a DataLoader helper.

Images differ in size, so a batch is ``(list[Tensor[3,H,W]], list[target])``; the model pads.
Grouping images of similar aspect ratio into a batch keeps that padding small.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import random
import signal
import threading

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
)


def collate(batch):
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])``."""
    images, targets = [], []
    for image, target in batch:
        images.append(image)
        targets.append(target)
    return images, targets


def aspect_ratio_groups(ratios, bins=3) -> list[int]:
    """Group id per image from its aspect ratio (width / height).

    ``bins`` is either a sorted list of boundaries (group ``g`` holds ratios in
    ``[bins[g-1], bins[g])``; len(bins) + 1 groups) or an int ``k``: ``2k + 1`` boundaries spaced
    evenly in log scale from 1/2 to 2 (so ``k=0`` gives the boundary 1: portrait vs landscape).
    """
    if isinstance(bins, int):
        if bins < 0:
            raise ValueError(f"bins must be >= 0, got {bins}")
        bins = [1.0] if bins == 0 else [2.0 ** (i / bins) for i in range(-bins, bins + 1)]
    bins = [float(b) for b in bins]
    if bins != sorted(bins):
        raise ValueError(f"bins must be sorted, got {bins}")
    return [bisect.bisect_right(bins, float(r)) for r in ratios]


class GroupedBatchSampler(Sampler):
    """Batches of ``batch_size`` indices from ``sampler`` whose ``group_ids`` agree.

    Indices are taken in the inner sampler's order and held per group until a group has a full
    batch. At the end, the indices still waiting are batched together in the order they arrived
    (mixing groups), so the number of batches is always ``ceil(len(sampler) / batch_size)``
    (``floor`` with ``drop_last``) -- the same on every rank under a ``DistributedSampler``.
    ``set_epoch`` is passed to the inner sampler.
    """

    def __init__(self, sampler, group_ids, batch_size: int, drop_last: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        waiting: dict[int, list[tuple[int, int]]] = {}  # group -> [(arrival position, index)]
        for pos, index in enumerate(self.sampler):
            group = waiting.setdefault(self.group_ids[index], [])
            group.append((pos, index))
            if len(group) == self.batch_size:
                yield [i for _, i in group]
                group.clear()
        leftover = [i for _, i in sorted(p for g in waiting.values() for p in g)]
        for start in range(0, len(leftover), self.batch_size):
            batch = leftover[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def dataset_aspect_ratios(dataset) -> list[float]:
    """``dataset.aspect_ratios()``, looking through ``torch.utils.data.Subset`` wrappers."""
    if isinstance(dataset, Subset):
        parent = dataset_aspect_ratios(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    if not hasattr(dataset, "aspect_ratios"):
        raise TypeError(
            f"{type(dataset).__name__} has no aspect_ratios(); pass aspect_grouping=False "
            "or give the dataset an aspect_ratios() method"
        )
    return list(dataset.aspect_ratios())


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker (base seed from the loader's generator + worker id); Python's and
    # NumPy's RNGs are derived from it so anything a transform draws is reproducible too.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    # Ctrl-C reaches every process of the terminal's group, workers included. Stopping is the main
    # process's decision (it finishes its step, saves, then shuts the workers down); a worker that
    # died on the signal would instead make the main process fail on its next batch. (SIGTERM keeps
    # its default: it is how the main process ends a worker that does not stop by itself.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_data_loader(
    dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    aspect_grouping: bool = True,
    drop_last: bool = False,
    bins=3,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
    """A DataLoader yielding ``(list[image], list[target])`` batches.

    ``distributed=True`` uses a ``DistributedSampler`` (``num_replicas``/``rank`` default to the
    process group's); call ``set_epoch(loader, epoch)`` at the start of each epoch.
    Shuffling is seeded by ``seed``; so are the worker processes' RNGs (torch, numpy, random), which
    random transforms draw from. With ``num_workers=0`` transforms use the main process's RNG.
    """
    sampler: Sampler[int]
    batch_sampler: Sampler[list[int]]
    if distributed:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    if aspect_grouping:
        groups = aspect_ratio_groups(dataset_aspect_ratios(dataset), bins)
        batch_sampler = GroupedBatchSampler(sampler, groups, batch_size, drop_last=drop_last)
    else:
        batch_sampler = BatchSampler(sampler, batch_size, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        # workers' base seeds: from ``seed`` and the rank, so ranks do not repeat each other's draws
        generator=torch.Generator().manual_seed(seed + 7919 * (1 + getattr(sampler, "rank", 0))),
        persistent_workers=False,
    )


@contextlib.contextmanager
def child_signal_restored():
    """Put back the SIGCHLD handler when the block's DataLoader workers are done.

    PyTorch's DataLoader installs a Python SIGCHLD handler (to notice a worker that dies) the first time a
    process starts workers, and never removes it. With an OpenVINO model in the process, that handler made the
    next child process (any ``subprocess.run``) crash the interpreter with a segfault (reproduced in
    tests/deploy: ``predict`` with workers, then OpenVINO, then a subprocess). After the loader is exhausted its
    workers are gone, so the handler has nothing left to watch: the previous one goes back, and PyTorch's
    flag is cleared so that its next loader installs its own again."""
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread or not hasattr(signal, "SIGCHLD"):
        yield
        return
    previous = signal.getsignal(signal.SIGCHLD)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGCHLD) is not previous and previous is not None:
            signal.signal(signal.SIGCHLD, previous)
            handling = getattr(torch.utils.data, "_utils", None)
            if handling is not None and hasattr(handling.signal_handling, "_SIGCHLD_handler_set"):
                handling.signal_handling._SIGCHLD_handler_set = False


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler which epoch starts (reshuffles a ``DistributedSampler``)."""
    for s in (loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None), loader.sampler):
        if s is not None and hasattr(s, "set_epoch"):
            s.set_epoch(epoch)
            return
