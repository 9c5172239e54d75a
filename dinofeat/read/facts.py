"""What a cache is, read from its metadata: the model, the sizes, the bucket spec and its tie to a DiT, the recorded
channel statistics. A mixin of FeatureCache (which reads the rows), over its `meta`."""

from __future__ import annotations

from typing import Any

import numpy as np

from dinofeat.buckets import AnySpec, TiedSpec, load_spec


class CacheFacts:
    """Facts of an open cache's metadata (`self.meta`, the generation a reader serves)."""

    meta: dict[str, Any]

    @property
    def model_id(self) -> str:
        return self.meta["model"]["id"]

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def patch_size(self) -> int:
        return int(self.meta["patch_size"])

    @property
    def num_register_tokens(self) -> int:
        return int(self.meta["num_register_tokens"])

    @property
    def bucket_spec(self) -> AnySpec:
        """The spec the buckets came from: a BucketSpec, or a TiedSpec when the buckets are tied to a DiT's."""
        return load_spec(self.meta["bucket_spec"])

    @property
    def grid_factor(self) -> int | None:
        """Tied caches: k, the DiT tokens per DINO patch along each side (DiT token (i, j) lies in DINO patch
        (i // k, j // k)); None otherwise."""
        spec = self.bucket_spec
        return spec.grid_factor(self.patch_size) if isinstance(spec, TiedSpec) else None

    @property
    def channel_stats(self) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """{'cls' | 'patches': (mean [D], std [D])} over every stored image, accumulated during precompute; None for
        caches written before they were recorded."""
        recorded = self.meta.get("channel_stats")
        if not recorded:
            return None
        return {n: (np.asarray(v["mean"], np.float32), np.asarray(v["std"], np.float32)) for n, v in recorded.items()}
