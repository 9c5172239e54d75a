"""What a new reader serves, read once at open: the current plan once sealed or, while an incremental run works on
the cache, the last sealed generation; its done images; and, from the marker summary (one read) or the markers,
which shards are marked and each row's recorded crc32c."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dinofeat.cache.arrays import ArraySet
from dinofeat.cache.checksum import RowCrcs, expected_checksums
from dinofeat.cache.layout import STATUS_DONE, BucketPlan
from dinofeat.cache.store import Store
from dinofeat.errors import CacheFormatError
from dinofeat.keys import PackedKeys


@dataclass(frozen=True)
class Generation:
    """One generation of a cache, as served: the done images' keys and where their rows are."""

    meta: dict[str, Any]
    arrays: ArraySet
    serving_last_sealed: bool
    bucket_plans: tuple[BucketPlan, ...]
    keys: PackedKeys
    bucket: np.ndarray  # int32 per position: which bucket's arrays hold the row (one group per part)
    row: np.ndarray  # int64 per position
    expected: dict[tuple[str, str], RowCrcs]
    failures: dict[str, str]


def serving_generation(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What a new reader serves: the current plan once sealed; while a run works on it, the last sealed generation
    (an incremental run never deletes its index or arrays); None if the cache was never sealed."""
    if meta.get("state") == "sealed":
        return {"index_group": meta.get("index_group", "index"), "num_buckets": len(meta["buckets"])}
    return meta.get("last_sealed")


def open_generation(st: Store) -> Generation:
    """The generation a new reader of `st` serves; CacheFormatError if the cache was never sealed, or if a done row
    lies in a shard without a done marker (an unwritten row reads back as zeros)."""
    meta = st.meta
    generation = serving_generation(meta)
    if generation is None:
        raise CacheFormatError(
            f"{st.path} is not sealed (state {meta.get('state')!r}): precompute has not finished; rerun it"
        )
    last_sealed = meta.get("state") != "sealed"
    if last_sealed:  # the buckets an incremental run added are not part of what we serve
        meta = {**meta, "buckets": meta["buckets"][: generation["num_buckets"]], **generation}
    ix = st.index.read(generation if last_sealed else None)
    done = np.flatnonzero(ix["status"] == STATUS_DONE)
    plans = st.index.bucket_plans()[: len(meta["buckets"])]
    summary = st.markers.summary(meta.get("marker_summary"))  # one read; caches sealed before 0.5 have none
    if summary is None:
        markers = st.markers.read()
        summary = set(markers), expected_checksums(markers, plans)
    marked, expected = summary
    _check_markers(st.path, plans, marked, ix["bucket"][done], ix["row"][done])
    return Generation(
        meta=meta,
        arrays=ArraySet.from_meta(meta),
        serving_last_sealed=last_sealed,
        bucket_plans=plans,
        keys=ix["key"].take(done),
        bucket=ix["bucket"][done].astype(np.int32),
        row=ix["row"][done].astype(np.int64),
        expected=expected,
        failures=st.index.failures(),
    )


def _check_markers(
    path: str, plans: tuple[BucketPlan, ...], marked: set[tuple[str, int]], buckets: np.ndarray, rows: np.ndarray
) -> None:
    """Only rows of marked shards may be served: an unwritten row reads back as zeros."""
    for k, bp in enumerate(plans):
        sel = rows[buckets == k]
        shards = set((sel // bp.shard_rows).tolist())
        missing = [u for u in shards if (bp.name, u) not in marked]
        if missing:
            raise CacheFormatError(
                f"{path}: bucket {bp.name} shards {sorted(missing)[:5]} have no done marker; "
                "run `dinofeat validate` and rerun precompute"
            )
