"""Per-channel feature statistics, exact over every stored image and mergeable: each shard's are computed when it
is written, and the cache's are the merge of its shards' (Chan et al.'s parallel update), so one process, many
processes and incremental runs give the same numbers up to float rounding. No torch, no zarr: the statistics are
numpy, and `ShardStats` reads and writes their files through the cache's files."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinofeat.cache.checksum import crc32c
from dinofeat.cache.layout import bf16_bits_to_float32

BLOCK = 512  # vectors converted to float64 at a time: 4 MiB at 1024 channels, so the block stays in the CPU's cache


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
    def of(cls, x: np.ndarray, bf16: bool = False) -> ChannelStats:
        """Statistics of the vectors in x [..., D] (all leading axes are samples); `bf16`: x holds bfloat16 bit
        patterns (uint16), converted a block at a time."""
        dim = x.shape[-1]
        flat = x.reshape(-1, dim)
        total, sq = np.zeros(dim), np.zeros(dim)
        for a in range(0, len(flat), BLOCK):
            block = flat[a : a + BLOCK]
            block = (bf16_bits_to_float32(block) if bf16 else block).astype(np.float64)
            total += block.sum(0)
            sq += np.einsum("ij,ij->j", block, block)
        return cls.from_moments(len(flat), total, sq)

    @classmethod
    def from_moments(cls, count: int, total: np.ndarray, sq: np.ndarray) -> ChannelStats:
        """From the per-channel sum and sum of squares of `count` vectors (float64)."""
        if count == 0:
            return cls.empty(len(total))
        mean = total / count
        return cls(count, mean, np.maximum(sq - count * mean * mean, 0.0))

    @classmethod
    def merge_rows(cls, rows: np.ndarray, per_row: int) -> ChannelStats:
        """From rows of (mean, M2) ([k, 2, D]: what the extraction loop takes per row on the device), each over
        `per_row` vectors: Chan et al.'s merge of k equal-sized parts, in float64."""
        if len(rows) == 0:
            return cls.empty(rows.shape[-1])
        means, m2 = rows[:, 0], rows[:, 1]
        mean = means.mean(0)
        return cls(len(rows) * per_row, mean, m2.sum(0) + per_row * ((means - mean) ** 2).sum(0))

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


def shard_stats(
    arrays: dict[str, np.ndarray], done: np.ndarray, names: tuple[str, ...], bf16: bool = False
) -> dict[str, ChannelStats]:
    """Statistics of the done rows (`done` is a bool mask over the shard's rows) of each named array (float values,
    or with `bf16` their bit patterns)."""
    every = bool(done.all())  # the usual case: no copy of the shard
    return {n: ChannelStats.of(arrays[n] if every else arrays[n][done], bf16) for n in names if n in arrays}


def pooled_shard_stats(
    arrays: dict[str, np.ndarray], done: np.ndarray, stat_names: list[str], flip_suffix: str, bf16: bool = False
) -> dict[str, ChannelStats]:
    """One shard's statistics as stored: of the done rows of every named array (float values, or with `bf16` their
    bit patterns), a layer's mirrored-image features (`<name><flip_suffix>`) pooled with the original's. What the
    writer records for a new shard, and what --prune records again for a shard some of whose rows it dropped."""
    wanted = (*stat_names, *(n + flip_suffix for n in stat_names))
    stats = shard_stats(arrays, done, tuple(n for n in wanted if n in arrays), bf16)
    return {n: stats[n].merge(stats[n + flip_suffix]) if n + flip_suffix in stats else stats[n] for n in stat_names}


# ---- per-shard statistics files of a cache ---------------------------------------------------------------------
class ShardStats:
    """`_dinofeat/stats/<bucket>/<shard>.npz`: one shard's statistics, written before its done marker (which records
    the file's crc32c), merged at seal."""

    def __init__(self, store: Any) -> None:
        self.store = store

    @staticmethod
    def path(bucket: str, shard: int) -> str:
        return f"_dinofeat/stats/{bucket}/{shard}.npz"

    def write(self, bucket: str, shard: int, stats: dict[str, ChannelStats]) -> int:
        """Write one shard's statistics (atomically, durably); returns the crc32c its marker records."""
        arrays = {}
        for name, st in stats.items():
            arrays |= {f"{name}.count": np.int64(st.count), f"{name}.mean": st.mean, f"{name}.m2": st.m2}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.store.files.write(self.path(bucket, shard), buf.getvalue())
        return crc32c(buf.getvalue())

    def read(self, bucket: str, shard: int, expected: int | None = None) -> dict[str, ChannelStats] | None:
        """One shard's statistics; None if the file is missing, unreadable, or fails the crc32c its marker
        recorded (`expected`)."""
        try:
            data = self.store.files.read(self.path(bucket, shard))
            if expected is not None and crc32c(data) != expected:
                return None
            with np.load(io.BytesIO(data)) as z:
                names = {k.split(".")[0] for k in z.files}
                return {n: ChannelStats(int(z[f"{n}.count"]), z[f"{n}.mean"], z[f"{n}.m2"]) for n in names}
        except (OSError, ValueError, KeyError):
            return None

    def merged(self, buckets: Any, markers: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any] | None:
        """Per-channel mean and std over every stored image: the merge of each shard's statistics, in plan order (so
        any split of the work gives the same numbers). Each shard's file is checked against the crc32c its marker
        recorded. None if a shard has none (written by dinofeat < 0.3) or its file is missing or damaged."""
        dim = int(self.store.meta["hidden_size"])
        merged: dict[str, ChannelStats] = {}
        for b in buckets:
            for u in range(b.num_shards):
                crc = (markers.get((b.name, u)) or {}).get("stats_crc32c")
                part = self.read(b.name, u, None if crc is None else int(crc))
                if part is None:
                    return None
                for name, s in part.items():
                    merged[name] = merged.get(name, ChannelStats.empty(dim)).merge(s)
        return {name: s.to_dict() for name, s in merged.items()}
