"""Repair and prune: what a rerun with --repair or --prune does to a cache before the run loop starts.

Both only unmark or re-record; the run loop then does what it always does (extract the unmarked shards) and the
cache is sealed again into a fresh copy of its index, so readers that are open keep the generation they opened:

- repair: every marked shard is checked as `validate` checks it (each row against the crc32c its marker
  recorded, the shard index, the statistics file); a damaged or missing one is unmarked and its files removed, so
  the run re-extracts exactly those shards and no other shard file is rewritten. A sealed cache that lost a
  marker gets that shard re-extracted too.
- prune: images gone from the source are recorded as pruned (status 3): never served or counted again. Shards that
  held some of them get their statistics recomputed from their stored rows without them, so the cache's channel
  statistics describe exactly the images it serves. Their bytes stay in the shards (--overwrite reclaims them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinofeat.cache.arrays import FLIP_SUFFIX
from dinofeat.cache.checksum import RowCrcs, expected_checksums
from dinofeat.cache.layout import STATUS_DONE, BucketPlan, Plan, bf16_bits_to_float32
from dinofeat.cache.markers import marker_status
from dinofeat.cache.shardfile import HandlePool, ShardReader
from dinofeat.cache.stats import pooled_shard_stats
from dinofeat.cache.store import Store
from dinofeat.errors import CacheFormatError, ConfigError
from dinofeat.progress import bar as progress_bar

Markers = dict[tuple[str, int], dict[str, Any]]


@dataclass(frozen=True)
class Damage:
    """One shard that must be extracted again, and why."""

    bucket: str
    shard: int
    reason: str

    def __str__(self) -> str:
        return f"{self.bucket} shard {self.shard}: {self.reason}"


def shard_damage(
    st: Store, b: BucketPlan, u: int, expected: dict[tuple[str, str], RowCrcs], marker: dict
) -> str | None:
    """Why a marked shard cannot be trusted (None if every row of every array reads back with the crc32c its
    marker recorded, and its statistics file with its own)."""
    s0, s1 = b.shard_range(u)
    for name in st.shards.names(b.name):
        try:
            reader = ShardReader(st.shards.layout(b.name, name), HandlePool(1), expected=expected.get((b.name, name)))
            for r in range(s0, s1):
                reader.read_row(r)
        except (CacheFormatError, OSError, ValueError) as e:
            return f"{name}: {e}"
    crc = marker.get("stats_crc32c")
    if st.stats.read(b.name, u, None if crc is None else int(crc)) is None:
        return "its statistics file is missing or damaged"
    return None


def find_damage(st: Store, plan: Plan, markers: Markers, sealed: bool, progress: bool = True) -> list[Damage]:
    """Every shard that must be extracted again: marked shards that fail a check, and (in a sealed cache, where
    every shard was marked) shards whose marker is gone."""
    expected = expected_checksums(markers, plan.buckets)
    out: list[Damage] = []
    shards = [(b, u) for b in plan.buckets for u in range(b.num_shards)]
    for b, u in progress_bar(shards, desc="repair: check", unit="shard", enabled=progress):
        m = markers.get((b.name, u))
        if m is None:
            if sealed:
                out.append(Damage(b.name, u, "its done marker is gone"))
            continue
        why = shard_damage(st, b, u, expected, m)
        if why is not None:
            out.append(Damage(b.name, u, why))
    return out


def missing_shard_files(st: Store, plan: Plan, markers: Markers) -> list[Damage]:
    """The cheap check every rerun makes (one listing): marked shards whose files are gone, and shards of a sealed
    cache whose marker is gone. Flipped bits need the full check (`validate`, or --repair)."""
    present = set(st.files.list("buckets"))
    out = []
    for b in plan.buckets:
        for u in range(b.num_shards):
            if (b.name, u) not in markers:
                continue
            lost = [f for f in st.shards.files(b.name, u) if f not in present]
            if lost:
                out.append(Damage(b.name, u, f"{len(lost)} shard file(s) missing, e.g. {lost[0]}"))
    return out


def unmark(st: Store, damaged: Iterable[Damage]) -> int:
    """Make damaged shards pending again: their marker, statistics and shard files go (a rerun extracts them).
    Returns how many shards."""
    n = 0
    for d in damaged:
        st.files.delete(st.markers.path(d.bucket, d.shard))
        st.files.delete(st.stats.path(d.bucket, d.shard))
        for f in st.shards.files(d.bucket, d.shard):
            st.files.delete(f)
        n += 1
    return n


def check_description(st: Store, plan: Plan) -> None:
    """CacheFormatError, before anything is changed, unless every feature array's zarr.json is as written: a damaged
    description is not repaired by re-extracting shards (every shard would read as damaged)."""
    for b in plan.buckets:
        for name in st.shards.names(b.name):
            try:
                st.shards.layout(b.name, name)
            except (CacheFormatError, OSError, ValueError) as e:
                raise CacheFormatError(
                    f"{st.path}: cannot repair: buckets/{b.name}/{name}/zarr.json is damaged or missing ({e}); the "
                    "cache's description is not repaired by re-extraction: restore the file from a copy, or rebuild "
                    "with --overwrite"
                ) from None


def repair(
    st: Store, plan: Plan, present: set[str], prune: bool, progress: bool = True, changed: dict[str, str] | None = None
) -> list[Damage]:
    """Check every shard; unmark the damaged ones, and those holding images `changed` in the source since their
    features were made (key -> how), and reopen a sealed cache so the run re-extracts and re-seals them. Returns what
    was found. Refused before any change when the cache's description is damaged, or when a damaged shard holds
    images gone from the source (`present`) and they are not being pruned."""
    check_description(st, plan)
    sealed = st.meta.get("state") == "sealed"
    damaged = find_damage(st, plan, st.markers.read(), sealed, progress)
    damaged += _holding(plan, changed or {}, {(d.bucket, d.shard) for d in damaged})
    gone = [] if prune else _gone_from(plan, damaged, present, st.index.pruned())
    if gone:
        raise ConfigError(
            f"{len(gone)} images of damaged shards are gone from the source (e.g. {gone[0]!r}), so their shards "
            "cannot be extracted again: restore them, or rerun with --repair --prune to drop them"
        )
    if damaged:
        unmark(st, damaged)
        if sealed:
            st.metafile.update(state="planned")
    return damaged


def _holding(plan: Plan, changed: dict[str, str], skip: set[tuple[str, int]]) -> list[Damage]:
    """The shards (other than `skip`) that hold changed images, each with how many and an example."""
    pos = {k: i for i, k in enumerate(plan.keys)}
    by_shard: dict[tuple[str, int], list[str]] = {}
    for key in sorted(changed):
        shard = None if key not in pos else plan.shard_of(pos[key])
        if shard is not None:
            by_shard.setdefault(shard, []).append(key)
    return [
        Damage(name, u, f"{len(keys)} image(s) changed in the source since extraction (e.g. {keys[0]!r}: "
               f"{changed[keys[0]]})")
        for (name, u), keys in sorted(by_shard.items()) if (name, u) not in skip
    ]  # fmt: skip


def _gone_from(plan: Plan, damaged: list[Damage], present: set[str], pruned: set[str]) -> list[str]:
    """Keys of images in `damaged` shards that are neither in the source nor already pruned."""
    shards = {(d.bucket, d.shard) for d in damaged}
    out = []
    for i in np.flatnonzero(plan.bucket >= 0):
        key = plan.keys[i]
        if plan.shard_of(i) in shards and key not in present and key not in pruned:
            out.append(key)
    return out


def prune(st: Store, plan: Plan, present: set[str]) -> list[str]:
    """Record the planned images that are gone from the source as pruned, recompute the statistics of the shards
    that held them, and reopen a sealed cache so the run seals it again. Returns the keys pruned by this run."""
    before = st.index.pruned()
    gone = [k for k in plan.keys if k not in present and k not in before]
    if not gone:
        return []
    markers = st.markers.read()
    status, _ = marker_status(plan, markers)
    unreadable = _restat_shards(st, plan, markers, status, set(gone))
    unmark(st, unreadable)  # damaged shards that held pruned images: extracted again, without them
    st.index.write_pruned(before | set(gone))
    if st.meta.get("state") == "sealed":
        st.metafile.update(state="planned")
    return gone


def _restat_shards(st: Store, plan: Plan, markers: Markers, status: np.ndarray, gone: set[str]) -> list[Damage]:
    """Each marked shard holding a pruned, done image gets its statistics recomputed from its stored rows without
    them (verified as they are read), and its marker records the new file's crc32c. Returns the shards that could
    not be read (damaged): those are extracted again instead."""
    pos = {k: i for i, k in enumerate(plan.keys)}
    by_bucket = plan.rows_to_keys()
    hit: set[tuple[int, int]] = set()
    for k in gone:
        i = pos[k]
        if status[i] == STATUS_DONE and plan.bucket[i] >= 0:
            b = plan.buckets[int(plan.bucket[i])]
            hit.add((int(plan.bucket[i]), int(plan.row[i]) // b.shard_rows))
    expected = expected_checksums(markers, plan.buckets)
    bf16 = st.meta["dtypes"]["store"] == "bf16"
    names = st.arrays.stat_names()
    damaged: list[Damage] = []
    for k, u in sorted(hit):
        b = plan.buckets[k]
        s0, s1 = b.shard_range(u)
        held = by_bucket[b.name][s0:s1]  # -1: a vacant row, never in the statistics
        keep = np.array([p >= 0 and status[p] == STATUS_DONE and plan.keys[p] not in gone for p in held], bool)
        try:
            arrays = _shard_rows(st, b, u, names, expected, bf16)
        except (CacheFormatError, OSError) as e:
            damaged.append(Damage(b.name, u, f"{e}"))
            continue
        stats_crc = st.stats.write(b.name, u, pooled_shard_stats(arrays, keep, names, FLIP_SUFFIX))
        m = markers[(b.name, u)]
        failed = {int(r): why for r, why in m["failed"].items()}
        st.markers.write(b.name, u, m["start"], m["stop"], failed, m.get("crc32c"), stats_crc)
    return damaged


def _shard_rows(
    st: Store, b: BucketPlan, u: int, names: list[str], expected: dict, bf16: bool
) -> dict[str, np.ndarray]:
    """Every row of a shard's statistics arrays, verified as read, as float."""
    s0, s1 = b.shard_range(u)
    arrays = {}
    for name in st.shards.names(b.name):
        if name in names or name.removesuffix(FLIP_SUFFIX) in names:
            reader = ShardReader(st.shards.layout(b.name, name), HandlePool(1), expected=expected.get((b.name, name)))
            rows = np.stack([reader.read_row(r) for r in range(s0, s1)])
            arrays[name] = bf16_bits_to_float32(rows) if bf16 else rows
    return arrays
