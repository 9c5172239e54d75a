"""dinofeat: precompute DINO CLS + patch-grid features into a sharded zarr cache, and read them back for DiT training.

Heavy modules (torch, transformers, zarr) load on first use, so `import dinofeat` and `dinofeat buckets` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.8.0"

_LAZY = {
    "extract": "dinofeat.extraction.run",
    "extract_processes": "dinofeat.extraction.launch",
    "bench": "dinofeat.inspection.bench",
    "ExtractConfig": "dinofeat.extraction.config",
    "Recipe": "dinofeat.images.recipe",
    "FeatureCache": "dinofeat.read.reader",
    "FeatureDataset": "dinofeat.read.dataset",
    "MixedFeatureDataset": "dinofeat.read.mixed",
    "BucketBatchSampler": "dinofeat.read.sampler",
    "collate_features": "dinofeat.read.collate",
    "flip_coin": "dinofeat.read.flip",
    "validate": "dinofeat.inspection.validate",
    "DinofeatError": "dinofeat.errors",
    "ConfigError": "dinofeat.errors",
    "CacheMismatchError": "dinofeat.errors",
    "CacheFormatError": "dinofeat.errors",
    "StoreError": "dinofeat.errors",  # an object store that fails, in one line (no credentials, no bucket, an outage)
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dinofeat' has no attribute {name!r}")
