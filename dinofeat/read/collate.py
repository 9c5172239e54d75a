"""Collate cached features into DiT-ready batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

_META = ("key", "bucket", "grid", "extra")


def _kind(name: str) -> str:
    return name.split("_", 1)[0]


def collate_features(samples: Sequence[dict[str, Any]], *, flatten: bool = True, pad: bool = False) -> dict[str, Any]:
    """Same-bucket samples stack to patches [B, h*w, D] (or [B, h, w, D] with flatten=False) and cls [B, 1, D];
    other stored layers (`patches_l8`, `cls_l8`) the same way, `flipped` to a bool tensor [B].

    Mixed grid shapes (a sampler of your own) need pad=True: patches are flattened and padded to the longest with
    zeros; `mask` [B, T] is True for real tokens (SDPA's boolean attn_mask convention) and `key_padding_mask` is
    its negation, ready for nn.MultiheadAttention(key_padding_mask=...).
    """
    if not samples:
        raise ValueError("empty batch")
    first = samples[0]
    grids = {tuple(s["patches"].shape[:2]) for s in samples}
    out: dict[str, Any] = {"key": [s["key"] for s in samples], "bucket": [s["bucket"] for s in samples]}
    if len(grids) > 1 and not pad:
        raise ValueError(f"batch mixes grid shapes {sorted(grids)}; use BucketBatchSampler or collate with pad=True")
    for name in first:
        if name in _META:
            continue
        if name == "grid_factor":  # one value per cache
            out[name] = first[name]
            continue
        kind = _kind(name)
        if kind == "cls":
            out[name] = torch.stack([s[name] for s in samples])[:, None, :]
        elif kind == "patches":
            out[name], mask = _patches([s[name] for s in samples], flatten, len(grids) > 1)
            if name == "patches":
                out["mask"] = mask
        elif kind == "flipped":
            out[name] = torch.tensor([bool(s[name]) for s in samples])
        elif isinstance(first[name], torch.Tensor):
            out[name] = torch.stack([s[name] for s in samples])
        else:
            out[name] = [s[name] for s in samples]
    if len(grids) == 1:
        out["grid"] = next(iter(grids))
    else:
        out["grid"], out["grids"] = None, [tuple(s["patches"].shape[:2]) for s in samples]
    out["key_padding_mask"] = ~out["mask"]
    if "extra" in first:
        out["extra"] = default_collate([s["extra"] for s in samples])
    return out


def _patches(grids: list[torch.Tensor], flatten: bool, pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[h, w, D] grids -> (stacked [B, h*w, D] or [B, h, w, D], mask [B, T]); padded to the longest when mixed."""
    if not pad:
        p = torch.stack(grids)
        mask = torch.ones(p.shape[0], p.shape[1] * p.shape[2], dtype=torch.bool)
        return (p.flatten(1, 2) if flatten else p), mask
    flat = [g.flatten(0, 1) for g in grids]
    longest = max(f.shape[0] for f in flat)
    p = flat[0].new_zeros(len(flat), longest, flat[0].shape[1])
    mask = torch.zeros(len(flat), longest, dtype=torch.bool)
    for i, f in enumerate(flat):
        p[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return p, mask
