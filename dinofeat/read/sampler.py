"""BucketBatchSampler: one bucket per batch, seeded shuffles, and the same batch count on every DDP rank."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from dinofeat.errors import ConfigError


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


class _EpochRelay:
    """The `sampler` of a BucketBatchSampler: once accelerate has prepared the loader, `DataLoaderShard.set_epoch`
    reaches a batch sampler only through `batch_sampler.batch_sampler.sampler.set_epoch`, so this passes it on."""

    def __init__(self, owner: BucketBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; pass as `batch_sampler=` to a DataLoader. Call `set_epoch` every epoch.

    Plain DDP / torchrun: pass `rank` and `world_size`, do not hand the loader to `accelerator.prepare`. Under
    accelerate: leave world_size=1 and prepare the loader; accelerate deals whole batches to the processes and its
    `loader.set_epoch(epoch)` reaches this sampler through `sampler` (but then not the dataset: call the dataset's
    `set_epoch` yourself). A sampler with world_size > 1 that accelerate splits again raises ConfigError.
    """

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
        self.sampler = _EpochRelay(self)  # what accelerate's DataLoaderShard.set_epoch calls once it wrapped us
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

    def _refuse_second_split(self) -> None:
        """Raise if accelerate's BatchSamplerShard is splitting this already split sampler across processes.

        accelerator.prepare wraps a DataLoader's batch sampler in BatchSamplerShard, which iterates it from its own
        methods (`_iter_with_no_split`, `_iter_with_split`, `__len__`): their frame, a few levels up, has it as
        `self`. Plain DDP iterates us from torch's DataLoader, where no such frame exists. Checked once per
        `__iter__` / `__len__` call, a few frame lookups; accelerate not imported means no BatchSamplerShard exists.
        """
        if self.world_size == 1:
            return
        module = sys.modules.get("accelerate.data_loader")
        shard_type = getattr(module, "BatchSamplerShard", None)
        if shard_type is None:
            return
        frame = sys._getframe(2)  # the caller of __iter__ / __len__
        for _ in range(3):  # the shard itself, or a thin wrapper sampler between it and us
            if frame is None:
                return
            shard = frame.f_locals.get("self")
            if isinstance(shard, shard_type) and getattr(shard, "num_processes", 1) > 1:
                raise ConfigError(
                    f"BucketBatchSampler(rank={self.rank}, world_size={self.world_size}) is split again across "
                    f"{shard.num_processes} processes by accelerate (accelerator.prepare on its DataLoader), so an "
                    f"epoch would serve only about 1/{self.world_size} of the images: under accelerator.prepare "
                    "construct it with world_size=1 (accelerate deals whole batches itself), or keep rank/world_size "
                    "and do not prepare the DataLoader"
                )
            frame = frame.f_back

    def __iter__(self) -> Iterator[list[int]]:
        self._refuse_second_split()
        return iter(self.plan())

    def __len__(self) -> int:
        self._refuse_second_split()
        return len(self.plan())
