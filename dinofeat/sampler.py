"""BucketBatchSampler: one bucket per batch, seeded shuffles, and the same batch count on every DDP rank."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def plan_batches(
    bucket_ids: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """The batches of one rank for one epoch. Pure: the same arguments give the same plan on every machine.

    Every batch holds indices of a single bucket. drop_last=True: incomplete batches and the batches that would
    leave ranks unequal are dropped, so no index repeats. drop_last=False: a bucket's last batch is filled with
    indices from the same bucket and whole batches are repeated to even out the ranks; every index appears.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got {rank}/{world_size}")
    ids = np.asarray(bucket_ids)
    rng = np.random.default_rng([seed, epoch])
    batches: list[list[int]] = []
    for b in np.unique(ids):
        idx = np.flatnonzero(ids == b)
        if shuffle:
            idx = rng.permutation(idx)
        full = len(idx) // batch_size * batch_size
        batches += [idx[i : i + batch_size].tolist() for i in range(0, full, batch_size)]
        rest = idx[full:]
        if len(rest) and not drop_last:
            pad = np.resize(idx, batch_size - len(rest))  # cycles through the bucket: repeats only as padding
            batches.append([*rest.tolist(), *pad.tolist()])
    if shuffle:
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
    if drop_last:
        batches = batches[: len(batches) // world_size * world_size]
    elif batches and len(batches) % world_size:
        extra = world_size - len(batches) % world_size
        batches += [batches[i % len(batches)] for i in range(extra)]
    return batches[rank::world_size]


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; pass as `batch_sampler=` to a DataLoader. Call `set_epoch` every epoch."""

    def __init__(
        self,
        bucket_ids: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.bucket_ids = np.asarray(bucket_ids)
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        plan_batches(self.bucket_ids[:0], batch_size, rank=rank, world_size=world_size)  # validate arguments now

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> list[list[int]]:
        return plan_batches(
            self.bucket_ids,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            drop_last=self.drop_last,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.plan())

    def __len__(self) -> int:
        return len(self.plan())
