"""A torch map-style Dataset over several caches at once, each with a weight: one training set, read by the same
BucketBatchSampler as one cache."""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dinofeat.errors import ConfigError
from dinofeat.read.compatible import check_compatible
from dinofeat.read.dataset import Extra, FeatureDataset, Norm, norm_tensors, normalize_sample
from dinofeat.read.mixing import apportion, extra_draw, fill, least_weight, parse_weights, pooled_stats
from dinofeat.read.reader import FeatureCache


class MixedFeatureDataset(Dataset):
    """Samples of several caches, as FeatureDataset serves one's, plus `cache`: the index of the cache in `caches`
    the sample came from (keys are unique only within a cache: `(sample["cache"], sample["key"])` names an image).

    Caches are refused (CacheMismatchError naming the field and both values) unless they share the model, the
    preprocessing and the feature layout (dinofeat.read.compatible; `allow` names fields you vouch for, such as
    `model.id` for the same weights at two local paths); their bucket specs may differ. `weights` (one
    per cache, > 0, default 1): an epoch holds round(w * n) samples of a cache of n images (half up), apportioned
    to its buckets by largest remainder; within a bucket of n images and s samples every image appears s // n
    times and s % n distinct images, a seeded choice per (seed, epoch, cache, bucket), once more. An integer w is
    a repeat count: each image exactly w times. These counts are fixed, so `bucket_ids` (one per sample index,
    grouped by exact DINO size and, for tied caches, DiT size) go to BucketBatchSampler unchanged.

    Call `set_epoch` every epoch, as for FeatureDataset: it picks the epoch's extra images of fractional weights
    and the flip coin, in DataLoader workers too. `extra` is one per cache (or None). `normalize=True` uses the
    statistics of the mix: every cache's recorded ones pooled, each counted by its weight.
    """

    def __init__(
        self,
        caches: Sequence[str | os.PathLike[str] | FeatureCache],
        weights: Sequence[float | int | Fraction] | None = None,
        extra: Sequence[Extra | None] | None = None,
        *,
        missing: str = "drop",
        registers: bool = False,
        normalize: bool = False,
        flip: bool | Literal["random"] = False,
        seed: int = 0,
        layers: Sequence[int] | None = None,
        fetch_threads: int | None = None,
        allow: Sequence[str] = (),
    ) -> None:
        if isinstance(caches, (str, os.PathLike, FeatureCache)) or not caches:
            raise ConfigError("MixedFeatureDataset needs a list of caches (FeatureDataset reads one)")
        self.weights = parse_weights(weights, len(caches))  # a bad weight is refused before any cache is opened
        self.caches = [c if isinstance(c, FeatureCache) else FeatureCache(c) for c in caches]
        names = [f"cache {i} ({c.path})" for i, c in enumerate(self.caches)]
        check_compatible([c.meta for c in self.caches], names, allow)
        if extra is not None and len(extra) != len(self.caches):
            raise ConfigError(f"extra has {len(extra)} entries for {len(self.caches)} caches: give one (or None) each")
        self.parts = [
            FeatureDataset(
                c,
                None if extra is None else extra[i],
                missing=missing,
                registers=registers,
                flip=flip,
                seed=seed,
                layers=layers,
                fetch_threads=fetch_threads,
            )
            for i, c in enumerate(self.caches)
        ]
        self.seed, self.grid_factor = seed, self.parts[0].grid_factor
        self.norm: Norm | None = None
        if normalize:
            stats = [c.meta.get("channel_stats") for c in self.caches]
            if not all(stats):
                old = next(c.path for c, s in zip(self.caches, stats, strict=True) if not s)
                raise ConfigError(f"{old} records no channel statistics (written by dinofeat < 0.3); rebuild it")
            self.norm = norm_tensors(pooled_stats(stats, self.weights))
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._lay_out()
        self._draws: dict[tuple[int, int], np.ndarray] = {}
        for c, n in enumerate(self.samples_per_cache):  # a cache silently left out of every epoch is a mistake
            if n == 0:
                images = len(self.parts[c])
                raise ConfigError(
                    f"cache {c} ({self.caches[c].path}) would give no sample: weight {float(self.weights[c]):g} x "
                    f"{images} images rounds to 0; give it a weight of at least {least_weight(images)}"
                )

    def _lay_out(self) -> None:
        """Sample indices, cache by cache and bucket by bucket: each (cache, bucket) group holds its fixed count."""
        sizes: dict[tuple[Any, ...], int] = {}  # (DINO size, DiT size or None) -> bucket id of the mix
        part, bucket, members, slots = [], [], [], []
        for c, ds in enumerate(self.parts):
            ids = ds.bucket_ids
            present = np.unique(ids)
            groups = [np.flatnonzero(ids == b) for b in present]
            for b, m, s in zip(present, groups, apportion(self.weights[c], [len(m) for m in groups]), strict=True):
                size = (ds.cache.buckets[int(b)], ds.cache.dit_size(int(ds.positions[m[0]])))
                part.append(c)
                bucket.append(sizes.setdefault(size, len(sizes)))
                members.append(m)
                slots.append(s)
        self.buckets: list[tuple[Any, ...]] = list(sizes)
        self._part, self._members, self._slots = np.array(part, int), members, np.array(slots, np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._slots)]).astype(np.int64)
        self._bucket_ids = np.repeat(np.array(bucket, np.int32), self._slots)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_draws": {}}

    @property
    def bucket_ids(self) -> np.ndarray:
        """The mix's bucket id (an index into `buckets`) of every sample index: what BucketBatchSampler groups by."""
        return self._bucket_ids

    @property
    def samples_per_cache(self) -> list[int]:
        """How many samples of each cache one epoch holds (the same every epoch)."""
        return [int(self._slots[self._part == c].sum()) for c in range(len(self.parts))]

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the extra images and of the flip coin; reaches DataLoader workers through shared memory."""
        self._epoch.fill_(int(epoch))
        for ds in self.parts:
            ds.set_epoch(epoch)

    def locate(self, i: int) -> tuple[int, int]:
        """(cache, index into that cache's FeatureDataset `parts[cache]`) of sample index i in the current epoch."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        g = int(np.searchsorted(self._starts, i, side="right")) - 1
        n, s = len(self._members[g]), int(self._slots[g])
        draw = self._draw(g, n, s) if s % n else self._members[g][:0]
        return int(self._part[g]), int(self._members[g][fill(n, s, i - int(self._starts[g]), draw)])

    def _draw(self, g: int, n: int, s: int) -> np.ndarray:
        epoch = self.epoch
        got = self._draws.get((g, epoch))
        if got is None:
            self._draws = {k: v for k, v in self._draws.items() if k[1] == epoch}  # only this epoch's are kept
            got = self._draws[(g, epoch)] = extra_draw(n, s, self.seed, epoch, int(self._part[g]), g)
        return got

    def key(self, i: int) -> tuple[int, str]:
        """(cache, key) of sample index i in the current epoch."""
        c, j = self.locate(i)
        return c, self.parts[c].cache.key(int(self.parts[c].positions[j]))

    def _finish(self, sample: dict[str, Any], c: int) -> dict[str, Any]:
        sample["cache"] = c
        if self.norm is not None:
            normalize_sample(sample, self.norm)
        return sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        c, j = self.locate(i)
        return self._finish(self.parts[c][j], c)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """One batch, in order: each cache's samples fetched together (FeatureDataset's batched remote reads)."""
        where = [self.locate(int(i)) for i in indices]
        out: list[dict[str, Any]] = [{}] * len(where)
        for c in dict.fromkeys(c for c, _ in where):
            at = [k for k, (cc, _) in enumerate(where) if cc == c]
            for k, sample in zip(at, self.parts[c].__getitems__([where[k][1] for k in at]), strict=True):
                out[k] = self._finish(sample, c)
        return out
