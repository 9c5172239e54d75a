"""Collate cached features into DiT-ready batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate


def collate_features(samples: Sequence[dict[str, Any]], *, flatten: bool = True, pad: bool = False) -> dict[str, Any]:
    """Same-bucket samples stack to patches [B, h*w, D] (or [B, h, w, D] with flatten=False) and cls [B, 1, D].

    Mixed grid shapes (a sampler of your own) need pad=True: patches are flattened and padded to the longest with
    zeros; `mask` [B, T] is True for real tokens (SDPA's boolean attn_mask convention) and `key_padding_mask` is
    its negation, ready for nn.MultiheadAttention(key_padding_mask=...).
    """
    if not samples:
        raise ValueError("empty batch")
    grids = {tuple(s["patches"].shape[:2]) for s in samples}
    out: dict[str, Any] = {
        "key": [s["key"] for s in samples],
        "bucket": [s["bucket"] for s in samples],
        "cls": torch.stack([s["cls"] for s in samples])[:, None, :],
    }
    if len(grids) == 1:
        p = torch.stack([s["patches"] for s in samples])
        out["patches"] = p.flatten(1, 2) if flatten else p
        out["grid"] = next(iter(grids))
        out["mask"] = torch.ones(p.shape[0], p.shape[1] * p.shape[2], dtype=torch.bool)
    elif not pad:
        raise ValueError(f"batch mixes grid shapes {sorted(grids)}; use BucketBatchSampler or collate with pad=True")
    else:
        flat = [s["patches"].flatten(0, 1) for s in samples]
        longest = max(f.shape[0] for f in flat)
        d = flat[0].shape[1]
        p = flat[0].new_zeros(len(flat), longest, d)
        mask = torch.zeros(len(flat), longest, dtype=torch.bool)
        for i, f in enumerate(flat):
            p[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = True
        out["patches"], out["mask"], out["grid"] = p, mask, None
        out["grids"] = [tuple(s["patches"].shape[:2]) for s in samples]
    out["key_padding_mask"] = ~out["mask"]
    if "registers" in samples[0]:
        out["registers"] = torch.stack([s["registers"] for s in samples])
    if "extra" in samples[0]:
        out["extra"] = default_collate([s["extra"] for s in samples])
    return out
