"""A torch map-style Dataset over a cache, optionally joined by key with the user's own per-image items."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dinofeat.cache import FeatureCache
from dinofeat.errors import ConfigError

Extra = Mapping[str, Any] | Callable[[str], Any]


class FeatureDataset(Dataset):
    """Samples are dicts: key, cls [D], patches [h, w, D], bucket (W, H), grid (h, w), and `extra` when given.

    `extra` is a mapping key -> item or a function key -> item (their VAE latents, captions, ...). With a mapping,
    images it lacks are left out (`missing="drop"`) or raise (`missing="error"`). Each DataLoader worker reopens
    the cache's file handles; only paths and the index cross the process boundary.

    `normalize=True` returns float32 `(x - mean) / std` per channel for cls and patches, with the statistics
    precompute accumulated over every stored image (`FeatureCache.channel_stats`).
    """

    def __init__(
        self,
        cache: str | os.PathLike[str] | FeatureCache,
        extra: Extra | None = None,
        *,
        missing: str = "drop",
        registers: bool = False,
        normalize: bool = False,
    ) -> None:
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        self.norm: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        if normalize:
            stats = self.cache.channel_stats
            if stats is None:
                raise ConfigError(
                    f"{self.cache.path} records no channel statistics (written by dinofeat < 0.3); rebuild it with "
                    "--overwrite to use normalize=True"
                )
            self.norm = {n: (torch.from_numpy(m), torch.from_numpy(np.maximum(s, 1e-6))) for n, (m, s) in stats.items()}
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

    @property
    def bucket_ids(self) -> np.ndarray:
        return self.cache.bucket_ids[self.positions]

    def __getitem__(self, i: int) -> dict[str, Any]:
        pos = int(self.positions[i])
        f = self.cache[pos]
        patch = self.cache.patch_size
        sample: dict[str, Any] = {
            "key": f.key,
            "cls": torch.from_numpy(f.cls),  # the reader returns fresh writable arrays: no copy needed
            "patches": torch.from_numpy(f.patches),
            "bucket": f.bucket,
            "grid": (f.bucket[1] // patch, f.bucket[0] // patch),
        }
        if self.norm is not None:
            for name in ("cls", "patches"):
                mean, std = self.norm[name]
                sample[name] = (sample[name].float() - mean) / std
        if self.registers:
            sample["registers"] = torch.from_numpy(self.cache.read(pos, "registers"))
        if self.extra is not None:
            sample["extra"] = self.extra[f.key] if isinstance(self.extra, Mapping) else self.extra(f.key)
        return sample
