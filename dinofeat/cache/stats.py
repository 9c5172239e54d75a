"""Per-channel feature statistics, exact over every stored image and mergeable: each shard's are computed when it
is written, and the cache's are the merge of its shards' (Chan et al.'s parallel update), so one process, many
processes and incremental runs give the same numbers up to float rounding. Pure numpy; no torch, no zarr."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

BLOCK = 65536  # vectors converted to float64 at a time: bounded memory for 128 MiB shards


@dataclass(frozen=True)
class ChannelStats:
    """Count, mean and sum of squared deviations (M2) per channel, in float64."""

    count: int
    mean: np.ndarray  # [D]
    m2: np.ndarray  # [D]

    @classmethod
    def empty(cls, dim: int) -> ChannelStats:
        return cls(0, np.zeros(dim), np.zeros(dim))

    @classmethod
    def of(cls, x: np.ndarray) -> ChannelStats:
        """Statistics of the vectors in x [..., D] (all leading axes are samples)."""
        dim = x.shape[-1]
        flat = x.reshape(-1, dim)
        total, sq = np.zeros(dim), np.zeros(dim)
        for a in range(0, len(flat), BLOCK):
            block = flat[a : a + BLOCK].astype(np.float64)
            total += block.sum(0)
            sq += np.einsum("ij,ij->j", block, block)
        n = len(flat)
        if n == 0:
            return cls.empty(dim)
        mean = total / n
        return cls(n, mean, np.maximum(sq - n * mean * mean, 0.0))

    def merge(self, other: ChannelStats) -> ChannelStats:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return ChannelStats(n, mean, m2)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per channel."""
        return np.sqrt(self.m2 / max(self.count, 1))

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "std": self.std.tolist()}


def merge_all(parts: Iterable[ChannelStats], dim: int) -> ChannelStats:
    out = ChannelStats.empty(dim)
    for p in parts:
        out = out.merge(p)
    return out


def shard_stats(arrays: dict[str, np.ndarray], done: np.ndarray, names: tuple[str, ...]) -> dict[str, ChannelStats]:
    """Statistics of the done rows (`done` is a bool mask over the shard's rows) of each named array (float
    values; bf16 bit patterns must be converted first)."""
    every = bool(done.all())  # the usual case: no copy of the shard
    return {n: ChannelStats.of(arrays[n] if every else arrays[n][done]) for n in names if n in arrays}


def pooled_shard_stats(
    arrays: dict[str, np.ndarray], done: np.ndarray, stat_names: list[str], flip_suffix: str
) -> dict[str, ChannelStats]:
    """One shard's statistics as stored: of the done rows of every named array (float values), a layer's
    mirrored-image features (`<name><flip_suffix>`) pooled with the original's. What the writer records for a new
    shard, and what --prune records again for a shard some of whose rows it dropped."""
    wanted = (*stat_names, *(n + flip_suffix for n in stat_names))
    stats = shard_stats(arrays, done, tuple(n for n in wanted if n in arrays))
    return {n: stats[n].merge(stats[n + flip_suffix]) if n + flip_suffix in stats else stats[n] for n in stat_names}
