"""`info`: what is in a cache, in numbers people can read."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from dinofeat import __version__
from dinofeat.cache.layout import STATUS_DONE, STATUS_FAILED, STATUS_PENDING, STATUS_PRUNED, bf16_bits_to_float32
from dinofeat.cache.markers import marker_status
from dinofeat.cache.objects import on_store_errors
from dinofeat.cache.store import Store


def channel_stats(st: Store, max_images: int = 256, status: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """Per-channel mean/std of patch tokens over a random sample of done images (streamed, bounded memory)."""
    ix = st.index.read()
    done = np.flatnonzero((ix["status"] if status is None else status) == STATUS_DONE)
    rng = np.random.default_rng(seed)
    picks = rng.choice(done, size=min(max_images, len(done)), replace=False) if len(done) else done
    plans = st.index.bucket_plans()
    bf16 = st.meta["dtypes"]["store"] == "bf16"
    d = int(st.meta["hidden_size"])
    s1, s2, n = np.zeros(d), np.zeros(d), 0
    for i in picks:
        b = plans[int(ix["bucket"][i])]
        r = int(ix["row"][i])
        x = st.shards.read_rows(b.name, "patches", r, r + 1)[0]
        x = (bf16_bits_to_float32(x) if bf16 else x).reshape(-1, d).astype(np.float64)
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
        n += len(x)
    if n == 0:
        return {"images": 0}
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0))
    return {"images": len(picks), "tokens": n, "mean": mean.tolist(), "std": std.tolist()}


def status_and_failures(st: Store, ix: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, str]]:
    """Each image's status and the failures' reasons. A cache that is not sealed yet is read from its done markers
    (what a rerun would seal), not from the status column and failure records, which are written at seal."""
    if st.meta.get("state") != "sealed":
        return marker_status(st.index.plan(ix), st.markers.read(), st.index.pruned())
    return ix["status"], st.index.failures() | st.index.probe_failures()


NO_REASON = "no recorded reason"


def failed_list(keys: Sequence[str], status: np.ndarray, failures: dict[str, str]) -> list[tuple[str, str]]:
    """(key, reason) of every image whose status is failed, sorted by key: a reason recorded for an image that is
    no longer failed (pruned since) is not listed, and a failed image without one says so."""
    return sorted(
        (str(k), failures.get(str(k), NO_REASON)) for k, s in zip(keys, status, strict=True) if s == STATUS_FAILED
    )


@on_store_errors  # a store that does not answer: one line, not a client's traceback chain
def failed_images(cache: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(key, reason) of each image that failed (unreadable, too large, changed since planned), sorted by key:
    what `dinofeat info --failures` prints, without the statistics `info` computes."""
    st = Store(cache)
    ix = st.index.read()
    status, failures = status_and_failures(st, ix)
    return failed_list(list(ix["key"]), status, failures)


@on_store_errors  # a store that does not answer: one line, not a client's traceback chain
def info(cache: str | os.PathLike[str], stats_images: int = 256, failures: bool = False) -> dict[str, Any]:
    """Everything `dinofeat info` prints; with `failures`, also each failed image and its reason (`failures`:
    [{key, reason}], sorted by key). A cache that is not sealed yet is counted from its done markers."""
    st = Store(cache)
    meta = st.meta
    ix = st.index.read()
    status, reasons = status_and_failures(st, ix)
    per_bucket = []
    for k, b in enumerate(st.index.bucket_plans()):
        sel = ix["bucket"] == k
        per_bucket.append(
            {
                "bucket": b.name,
                "grid": list(b.grid),
                "tokens": b.grid[0] * b.grid[1],
                "done": int((status[sel] == STATUS_DONE).sum()),
                "failed": int((status[sel] == STATUS_FAILED).sum()),
                "shards": b.num_shards,
            }
            | ({"dit_size": list(b.dit)} if b.dit else {})
        )
    done = int((status == STATUS_DONE).sum())
    failed = failed_list(list(ix["key"]), status, reasons)  # what --failures lists: the counts must agree with it
    return {
        "cache": str(cache),
        "dinofeat": __version__,  # this build; the cache records the one that created it in dinofeat_version
        "state": meta.get("state"),
        "format_version": st.format_version,
        "checksums": st.format_version >= 3,  # chunk and index crc32c (docs/format.md, "Integrity")
        "model": {
            k: meta["model"][k]
            for k in (
                "id",
                "revision",
                "model_type",
                "patch_size",
                "num_register_tokens",
                "hidden_size",
                "random_weights",
            )
        },
        "dtypes": meta["dtypes"],
        "bucket_spec": meta["bucket_spec"],
        "features": st.arrays.to_dict(),  # stored blocks, mirrored-image arrays, final norm
        "images": len(ix["key"]),
        "done": done,
        "failed": int((status == STATUS_FAILED).sum()),
        "pending": int((status == STATUS_PENDING).sum()),
        "pruned": int((status == STATUS_PRUNED).sum()),
        "buckets": per_bucket,
        "failures_by_reason": dict(Counter(r.split(":", 1)[0] for _, r in failed)),
        "disk_bytes": st.files.total_bytes(),
        "created": meta.get("created"),
        "dinofeat_version": meta.get("dinofeat_version"),
        "channel_stats": recorded_stats(meta, done) or channel_stats(st, stats_images, status),
    } | ({"failures": [{"key": k, "reason": r} for k, r in failed]} if failures else {})


def recorded_stats(meta: dict[str, Any], done: int) -> dict[str, Any] | None:
    """The exact patch statistics precompute recorded (over every stored image), in `channel_stats`'s shape, plus
    the CLS ones."""
    rec = meta.get("channel_stats")
    if not rec:
        return None
    p = rec["patches"]
    return {
        "images": done,
        "tokens": p["count"],
        "mean": p["mean"],
        "std": p["std"],
        "exact": True,
        "cls": rec.get("cls"),
    }


def progress(cache: str | os.PathLike[str]) -> tuple[int, int]:
    """(images done or failed, images planned), from the done markers: what an interrupted run got through."""
    st = Store(cache)
    status, _ = marker_status(st.index.plan(), st.markers.read(), st.index.pruned())
    return int((status != STATUS_PENDING).sum()), len(status)
