"""A torch map-style Dataset over a cache, optionally joined by key with the user's own per-image items."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dinofeat.errors import ConfigError
from dinofeat.read.flip import flip_coin
from dinofeat.read.reader import FeatureCache

Extra = Mapping[str, Any] | Callable[[str], Any]
Norm = dict[str, tuple[torch.Tensor, torch.Tensor]]


def norm_tensors(stats: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Norm:
    """{name: (mean, std)} as tensors, std floored at 1e-6 so that a constant channel does not divide by zero."""
    return {n: (torch.from_numpy(m), torch.from_numpy(np.maximum(s, 1e-6))) for n, (m, s) in stats.items()}


def normalize_sample(sample: dict[str, Any], norm: Norm) -> None:
    """(x - mean) / std in float32, in place, for every array of `sample` that `norm` has statistics of."""
    for name, (mean, std) in norm.items():
        if name in sample:
            sample[name] = (sample[name].float() - mean) / std


class FeatureDataset(Dataset):
    """Samples are dicts: key, cls [D], patches [h, w, D], bucket (W, H), grid (h, w), and `extra` when given.

    `extra` is a mapping key -> item or a function key -> item (their VAE latents, captions, ...). With a mapping,
    images it lacks are left out (`missing="drop"`) or raise (`missing="error"`). Each DataLoader worker reopens
    the cache's file handles; only paths and the index cross the process boundary.

    `normalize=True` returns float32 `(x - mean) / std` per channel for cls and patches (of every layer), with the
    statistics precompute accumulated over every stored image (`FeatureCache.channel_stats`).

    `flip` (caches made with --flip): False serves the original images, True the mirrored ones, "random" tosses
    `flip_coin(seed, epoch, key)` per sample; `sample["flipped"]` says which. Call `set_epoch` each epoch (it
    reaches DataLoader workers, persistent ones too, through shared memory) and mirror the latent of the same key
    when the coin says so. `layers` picks the other stored layers to return as `cls_l8`, `patches_l8`, ...
    (None: all of them).

    Batched loading (a `batch_size` or `batch_sampler` on the DataLoader) goes through `__getitems__`: on a remote
    cache a worker fetches a batch's rows `fetch_threads` at a time (one ranged GET each), so it waits about one
    round trip per batch instead of one per sample. Local caches read in order (0 threads).
    """

    def __init__(
        self,
        cache: str | os.PathLike[str] | FeatureCache,
        extra: Extra | None = None,
        *,
        missing: str = "drop",
        registers: bool = False,
        normalize: bool = False,
        flip: bool | Literal["random"] = False,
        seed: int = 0,
        layers: Sequence[int] | None = None,
        fetch_threads: int | None = None,
    ) -> None:
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        self.fetch_threads = (16 if self.cache.remote else 0) if fetch_threads is None else fetch_threads
        self._pool: ThreadPoolExecutor | None = None
        if flip not in (False, True, "random"):
            raise ConfigError(f"flip must be False, True or 'random', got {flip!r}")
        if flip and not self.cache.arrays.flip:
            raise ConfigError(f"{self.cache.path} stores no mirrored-image features; precompute it with --flip")
        self.flip, self.seed = flip, seed
        self.layers = None if layers is None else tuple(layers)
        for k in self.layers or ():
            if k not in self.cache.arrays.layers:
                raise ConfigError(
                    f"layer {k} is not stored; {self.cache.path} has layers {list(self.cache.arrays.layers)}"
                )
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.grid_factor = self.cache.grid_factor
        self.norm: Norm | None = None
        if normalize:
            stats = self.cache.channel_stats
            if stats is None:
                raise ConfigError(
                    f"{self.cache.path} records no channel statistics (written by dinofeat < 0.3); rebuild it with "
                    "--overwrite to use normalize=True"
                )
            self.norm = norm_tensors(stats)
        self.extra = extra
        self.registers = registers
        positions = np.arange(len(self.cache))
        if isinstance(extra, Mapping):
            have = np.array([self.cache.key(i) in extra for i in positions], bool)
            if missing == "error" and not have.all():
                absent = self.cache.key(int(np.flatnonzero(~have)[0]))
                raise KeyError(f"{(~have).sum()} cached images have no extra item (e.g. {absent!r})")
            positions = positions[have]
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}  # threads stay in their process; a worker starts its own

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The samples of one batch, in order (DataLoader calls this when it batches)."""
        if self.fetch_threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="dinofeat-fetch")
        return list(self._pool.map(self.__getitem__, indices))

    @property
    def bucket_ids(self) -> np.ndarray:
        return self.cache.bucket_ids[self.positions]

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the flip coin uses. Shared memory: workers already started see it at their next sample."""
        self._epoch.fill_(int(epoch))

    def flipped(self, key: str) -> bool:
        """Whether `key` is served mirrored in the current epoch."""
        if self.flip == "random":
            return flip_coin(self.seed, self.epoch, key)
        return bool(self.flip)

    def __getitem__(self, i: int) -> dict[str, Any]:
        pos = int(self.positions[i])
        key = self.cache.key(pos)
        flipped = self.flipped(key)
        f = self.cache.get(pos, flip=flipped, layers=self.layers, registers=self.registers)
        patch = self.cache.patch_size
        sample: dict[str, Any] = {
            "key": f.key,
            "cls": torch.from_numpy(f.cls),  # the reader returns fresh writable arrays: no copy needed
            "patches": torch.from_numpy(f.patches),
            "bucket": f.bucket,
            "grid": (f.bucket[1] // patch, f.bucket[0] // patch),
            "flipped": flipped,
        }
        dit = self.cache.dit_size(pos)
        if dit is not None:  # a tied cache: the DiT bucket of this image, and k = DiT tokens per DINO patch side
            sample["dit_bucket"], sample["grid_factor"] = dit, self.grid_factor
        sample |= {name: torch.from_numpy(x) for name, x in f.layers.items()}
        if self.norm is not None:
            normalize_sample(sample, self.norm)
        if self.registers:
            if f.registers is None:
                raise ConfigError(f"{self.cache.path} stores no registers (precompute with --keep-registers)")
            sample["registers"] = torch.from_numpy(f.registers)
        if self.extra is not None:
            sample["extra"] = self.extra[f.key] if isinstance(self.extra, Mapping) else self.extra(f.key)
        return sample
