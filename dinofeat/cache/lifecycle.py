"""A cache's life, as the state machine docs/format.md describes:

    (none) --create--> planning --arrays and index written--> planned --every shard marked: seal--> sealed
    sealed --new images: extend (a new part, a new index group)--> planned --seal--> sealed
    sealed --repair / prune (dinofeat.cache.maintenance)--> planned --seal (into a copy of the index)--> sealed
    any --images that changed dimensions: moved by extend (a new part; their old rows vacant)--> planned
    any --overwrite: retire (moved aside; purged once the new cache seals)--> (none)

The run loop asks for a cache with `open_or_create` (rank 0) or `join` (the other ranks), extracts what is
pending, and asks for `finalize`. What this layer needs from the planner it gets as a `Request`, so the cache
format never imports extraction. Housekeeping (cleanup, orphans, retire) is dinofeat.cache.housekeeping.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinofeat.cache import housekeeping, metadata
from dinofeat.cache.arrays import ArraySet
from dinofeat.cache.checksum import column_checksums
from dinofeat.cache.index import FAILURES, PROBE_FAILURES, SOURCE_NAMES, write_index
from dinofeat.cache.layout import (
    FEATURE_SETS_VERSION,
    FORMAT_VERSION,
    META_KEY,
    STATUS_PENDING,
    VACANT_ROWS_VERSION,
    WRITABLE_VERSIONS,
    Plan,
    bucket_record,
    extend_plan,
)
from dinofeat.cache.markers import MarkerMap, as_read, marker_status, sources_differ
from dinofeat.cache.objects import open_files
from dinofeat.cache.shards import array_checksums, create_arrays
from dinofeat.cache.store import Store, open_group
from dinofeat.errors import (
    CHANGED_SINCE_PLANNED,
    CacheConflictError,
    CacheFormatError,
    CacheMismatchError,
    ConfigError,
)
from dinofeat.keys import joined, packed
from dinofeat.paths import model_ref


@dataclass(frozen=True)
class Request:
    """What a run asks of the cache, in the cache's terms: its settings' fingerprint, the source's keys and how to
    plan some of them (`plan(keys, part)`, which probes the images), the metadata of a new cache for a plan
    (`describe`), and the shape of the stored features. `keys` is the whole listing (what is present); `limit`
    caps how many images the plan holds (--limit); `source_root` is where this run reads them."""

    fingerprint: dict[str, Any]
    keys: tuple[str, ...]
    renamed: dict[str, str]
    plan: Callable[[tuple[str, ...], int], Plan]
    describe: Callable[[Plan], dict[str, Any]]
    hidden: int
    registers: int
    store_dtype: str
    limit: int | None = None
    source_root: str = ""
    # whether a key's bytes in the source now differ from the (size, mtime) given: a failed image replaced since
    changed: Callable[[str, int, int], bool] | None = None

    def capped(self, keys: tuple[str, ...], planned: int) -> tuple[str, ...]:
        """`keys` cut to what the limit leaves room for beside `planned` images."""
        return keys if self.limit is None else keys[: max(0, self.limit - planned)]


# ---- refusing a cache made otherwise ---------------------------------------------------------------------------
def fingerprint_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """One line per differing leaf, named by its dotted path (`recipe.jpeg_draft`), so a refusal says exactly
    which setting changed."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: cache has {_shown(a)}, this run wants {_shown(b)}")
    return out


def _shown(value: Any) -> str:
    """A setting's value as a refusal prints it: `none` rather than Python's None."""
    return "none" if value is None else repr(value)


def with_features(fingerprint: dict[str, Any], arrays: ArraySet) -> dict[str, Any]:
    """`fingerprint` with its feature set spelled out. A fingerprint leaves out the default one (the last block,
    final norm, no flip: all dinofeat <= 0.3 stored), so a cache made without --flip compared with a run with it
    would read `features: cache has None, this run wants {...}`; filled in, the diff names the one leaf that
    differs (`features.flip: cache has False, this run wants True`)."""
    if "features" in fingerprint:
        return fingerprint
    return fingerprint | {
        "features": {"layers": list(arrays.layers), "layer_norm": arrays.layer_norm, "flip": arrays.flip}
    }


def _diff_hint(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What to do about the one change users hit by upgrading: dinofeat 0.1's default drafted JPEGs."""
    if old.get("recipe", {}).get("jpeg_draft") is True and new.get("recipe", {}).get("jpeg_draft") != 1:
        return (
            "\nThis cache was made by dinofeat 0.1, whose default decoded JPEGs in the DCT domain (draft), which "
            "distorts hard edges. JPEGs are now decoded in full by default. Rebuild the cache with --overwrite "
            "(recommended), or finish it with the old recipe: --jpeg-draft --draft-gap 1."
        )
    return ""


def check_fingerprint(st: Store, fingerprint: dict[str, Any]) -> None:
    """CacheMismatchError unless this build may add to the cache and it was made with these very settings."""
    if st.format_version not in WRITABLE_VERSIONS:
        raise CacheMismatchError(
            f"{st.path} is a format {st.format_version} cache (dinofeat 0.2 or older); this version reads it but "
            f"adds only to format {FORMAT_VERSION} caches, whose chunks carry checksums. Rebuild it with "
            "--overwrite, or finish it with the dinofeat that started it"
        )
    old = dict(st.meta.get("fingerprint", {}))
    if isinstance(old.get("model_id"), str):  # caches before 0.6.1 recorded a model folder as typed
        old["model_id"] = model_ref(old["model_id"])
    if ("features" in old) != ("features" in fingerprint):  # one side has the default feature set: spell it out
        default = ArraySet((ArraySet.last_layer(st.meta),), False, False, True)
        old, fingerprint = with_features(old, default), with_features(fingerprint, default)
    diff = fingerprint_diff(old, fingerprint)
    if diff:
        raise CacheMismatchError(
            f"{st.path} was made with different settings; refusing to reuse it (pass --overwrite to start over):\n  "
            + "\n  ".join(diff)
            + _diff_hint(old, fingerprint)
        )


# ---- rank 0: create, resume or extend --------------------------------------------------------------------------
def open_or_create(cache: Path | str, request: Request, overwrite: bool) -> tuple[Store, Plan, int]:
    """Reuse a matching cache (resume), extend it with images new to the source (incremental), refuse a mismatched
    one, or plan and create a new one. Returns the store, the plan and how many images were appended. With
    `overwrite` the old cache is retired only once the new plan is made (a refused plan leaves it as it was)."""
    if overwrite:
        housekeeping.check_removable(cache)
        plan = request.plan(request.capped(request.keys, 0), 0)
        housekeeping.retire(cache)  # moved aside, not deleted: open readers keep theirs until the new one seals
        return _created(cache, request, plan), plan, 0
    if housekeeping.exists(cache):
        st = Store(cache, mode="r+")
        check_fingerprint(st, request.fingerprint)
        if st.meta.get("state") != "planning":
            plan = st.index.plan()
            st.index.source_names()  # an edited map stops every run on this cache, not only those that follow it
            check_source(st, plan, request)
            return (st, *extend(st, plan, request))
        if st.markers.read():
            raise CacheMismatchError(f"{cache} is damaged: its plan is incomplete but some shards are written")
        housekeeping.remove(cache)  # crashed while planning: nothing was extracted, plan again
    elif housekeeping.occupied(cache):
        raise ConfigError(f"{cache} exists, is not empty and is not a dinofeat cache")
    plan = request.plan(request.capped(request.keys, 0), 0)
    return _created(cache, request, plan), plan, 0


# a source named otherwise than the cache records is the same source moved when it holds this share of the images
MOVED_SOURCE_SHARE = 0.9


def check_source(st: Store, plan: Plan, request: Request) -> None:
    """A source named otherwise than the one the cache was made from: the same images moved (most planned keys
    found there; the cache records the new place) or another source, refused before anything is changed."""
    old = st.meta.get("source_root")
    if not request.source_root or old is None or str(old) == request.source_root:
        return
    pruned = st.index.pruned()
    keys = packed(plan.keys)
    kept = np.ones(len(keys), bool)
    if pruned:
        at = keys.positions(sorted(pruned))
        kept[at[at >= 0]] = False
    expected = int(kept.sum())
    found = int((kept & (packed(request.keys).positions(keys) >= 0)).sum())
    if found < MOVED_SOURCE_SHARE * expected:
        raise CacheMismatchError(
            f"{st.path} was made from {str(old)!r}, and {request.source_root!r} holds only {found} of its "
            f"{expected} images: name the cache's own source, or start over with --overwrite"
        )
    st.metafile.update(source_root=request.source_root)


def _created(cache: Path | str, request: Request, plan: Plan) -> Store:
    return create(
        cache, request.describe(plan), plan, request.hidden, request.registers, request.store_dtype, request.renamed
    )


def extend(st: Store, plan: Plan, request: Request, resized: Collection[str] = ()) -> tuple[Plan, int]:
    """Images in the source but not in the cache (`plan`) get a plan of their own (a new part: new bucket arrays,
    rows from 0), appended after the existing plan, as many as the limit leaves room for. Finished shards are never
    rewritten; removed images are kept.

    Planned again in the same part (moved): images that failed as changed since planned (a decode worker found
    other dimensions than the plan's) and are in the source, failed images whose file changed since they failed (a
    corrupt or truncated image replaced: a rerun extracts it), and the `resized` ones (done images whose source now
    has other dimensions: --repair). Each keeps its key's place in the index; its old row becomes vacant."""
    keys = packed(request.keys)
    # in source order (parquet rows stay in group order); matched as columns, no set of every key
    added = request.capped(keys.take(np.flatnonzero(packed(plan.keys).positions(keys) < 0)), len(plan))
    moved = set(resized) | changed_since_planned(st, plan, request)
    at = keys.positions(sorted(moved)) if moved else np.zeros(0, np.int64)
    again = keys.take(np.sort(at[at >= 0]))  # those still in the source, in its order
    if not len(added) and not len(again):
        return plan, 0
    part = 1 + max((b.part for b in plan.buckets), default=0)
    plan = extend_plan(plan, request.plan(joined([again, added]), part), again)
    renamed = {**st.index.source_names(), **request.renamed}
    add_part(st, plan, request.hidden, request.registers, request.store_dtype, renamed)
    return plan, len(added)


def changed_since_planned(st: Store, plan: Plan, request: Request | None = None) -> set[str]:
    """Failed images to plan again (not pruned): those whose latest decode failed because the image no longer had
    its planned dimensions, and (with `request.changed`) those whose file changed since the bytes that failed were
    read. A sealed cache's failures are one file each (decode, probe); the done markers (one read each) only while
    it is not sealed. Only failed images are looked at: a stat each, or nothing for tar members."""
    pruned = st.index.pruned()
    if st.meta.get("state") == "sealed":
        failures, read = {**st.index.failures(), **st.index.probe_failures()}, plan
    else:
        markers = st.markers.read()
        _, failures = marker_status(plan, markers, pruned)
        read = as_read(plan, markers)  # the facts of the bytes that failed, where not the planned ones
    again = {k for k, why in failures.items() if why.startswith(CHANGED_SINCE_PLANNED)}
    failed = {k for k in failures if k not in pruned and k not in again}
    if request is None or request.changed is None or not failed:
        return again
    names = sorted(failed)
    listed, at = packed(request.keys).positions(names), packed(read.keys).positions(names)
    for k, there, i in zip(names, listed.tolist(), at.tolist(), strict=True):
        if there >= 0 and i >= 0 and request.changed(k, int(read.file_size[i]), int(read.mtime_ns[i])):
            again.add(k)
    return again


def create(path: str | os.PathLike[str], meta: dict[str, Any], plan: Plan, hidden: int, registers: int,
           store_dtype: str, renamed: dict[str, str] | None = None) -> Store:  # fmt: skip
    """Arrays at their final size, the index and its records (`renamed`: the source's files whose name is not their
    key), then state 'planned' last (a crash before that is detectable). An error before the metadata exists (a
    full disk, a key zarr refuses) removes what was written into the empty place: otherwise a zarr group without
    our metadata would be left there, which every later run refuses as not a dinofeat cache."""
    files = open_files(path)
    fresh = not housekeeping.occupied(path)
    try:
        root = open_group(files, "w")
        index_checksums = write_index(root, "index", plan)
    except BaseException:
        if fresh:
            _remove_written(files, path)
        raise
    root.attrs[META_KEY] = metadata.stamp(
        {
            **meta,
            "format_version": FORMAT_VERSION if _default_arrays(meta) else FEATURE_SETS_VERSION,
            "cache_id": uuid.uuid4().hex,  # readers tell a rebuilt cache from the one they opened
            "generation": 0,
            "state": "planning",
            "index_group": "index",
            "index_checksums": index_checksums,
            "buckets": [bucket_record(b) for b in plan.buckets],
            "source_archives": list(plan.archives),
        }
    )
    names = ArraySet.from_meta(meta).names()
    create_arrays(root, plan.buckets, hidden, registers, store_dtype, names)
    st = Store(files, mode="r+")
    records = {PROBE_FAILURES: st.index.probe_record(plan), SOURCE_NAMES: dict(renamed or {})}
    st.index.write_records(records, state="planned", array_checksums=array_checksums(files, plan.buckets, names))
    return st


def _remove_written(files: Any, path: str | os.PathLike[str]) -> None:
    """Delete what a failed create wrote into a place that was empty (best effort: the error that stopped it is
    what the caller sees)."""
    try:
        if files.remote:
            files.delete_tree("")
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def _default_arrays(meta: dict[str, Any]) -> bool:
    """The last block of the image, final norm applied (registers or not): what every version 3 reader expects."""
    a = ArraySet.from_meta(meta)
    return a.is_default(int(meta.get("model", {}).get("config", {}).get("num_hidden_layers", a.primary)))


def add_part(st: Store, plan: Plan, hidden: int, registers: int, store_dtype: str, renamed: dict[str, str]) -> None:
    """Add an incremental run's images. `plan` is the whole new plan: its new buckets get arrays of their own and a
    new index group is written beside the old one; then one atomic metadata write switches to them (and vouches
    for the plan's records: probe failures, `renamed` files). A crash before that switch leaves the cache exactly
    as it was (the leftovers are orphans, removed by `cleanup`); finished shards are never opened."""
    meta = st.meta
    known = {b["name"] for b in meta["buckets"]}
    new = [b for b in plan.buckets if b.name not in known]
    if [b.name for b in plan.buckets[: len(known)]] != [b["name"] for b in meta["buckets"]]:
        raise ValueError("an extension must keep the existing buckets first and unchanged")
    group = f"index_{max(b.part for b in plan.buckets)}"
    if group == (meta.get("last_sealed") or {}).get("index_group"):
        raise CacheConflictError(f"{st.path}: part {group} is the last sealed generation; it is never rewritten")
    # a crashed earlier attempt at this part: its index, bucket groups AND their done markers go together
    leftovers = [f"buckets/{b.name}" for b in new] + [f"_dinofeat/{k}/{b.name}" for b in new for k in ("done", "stats")]
    for stale in (group, *leftovers):
        st.files.delete_tree(stale)
    sums = write_index(st.root, group, plan)
    names = st.arrays.names()
    create_arrays(st.root, new, hidden, registers, store_dtype, names)
    records = {PROBE_FAILURES: st.index.probe_record(plan), SOURCE_NAMES: renamed}
    vacant = {"format_version": VACANT_ROWS_VERSION} if plan.vacant_rows() else {}  # older writers must refuse it
    st.index.write_records(  # probe failures of keys not in the current index are ignored until the switch
        records,
        **vacant,
        array_checksums={**(meta.get("array_checksums") or {}), **array_checksums(st.files, new, names)},
        state="planned",
        index_group=group,
        index_checksums=sums,
        previous_index_group=st.index.group,
        num_images=len(plan),
        source_archives=list(plan.archives),
        buckets=[*meta["buckets"], *(bucket_record(b) for b in new)],
        parts=[*meta.get("parts", [{"part": 0}]), {"part": max(b.part for b in plan.buckets), "time": time.time()}],
    )
    st.shards.forget()
    housekeeping.drop_stale_index_groups(st)


# ---- the other ranks -------------------------------------------------------------------------------------------
def join(
    cache: Path | str,
    request: Request,
    wait: Callable[[Callable[[], bool], str], None] | None,
    share: tuple[int, int] | None = None,
) -> tuple[Store, Plan]:
    """A non-leader rank opens the cache rank 0 planned: after the barrier (`wait` None), or in a manual split by
    waiting (`wait(ready, what)`) until it is planned and, when its source holds images the plan lacks, until
    rank 0 has extended it. `share` (rank, world size): the plan holds only that rank's images (Index.plan)."""

    def meta() -> dict[str, Any]:
        try:
            return Store(cache).meta if housekeeping.exists(cache) else {}
        except CacheFormatError:
            return {}

    def ready(after: str | None = None) -> bool:
        m = meta()
        return m.get("state") in ("planned", "sealed") and (after is None or m.get("index_group") != after)

    if wait is not None:
        wait(ready, f"rank 0 to plan {cache}")
    st = Store(cache, mode="r+")
    check_fingerprint(st, request.fingerprint)
    plan = st.index.plan(share=share)
    st.index.source_names()  # as in `open_or_create`: every rank stops on an edited map
    if wait is not None and (packed(plan.keys).positions(packed(request.keys)) < 0).any():  # rank 0 adds images
        old = st.index.group
        wait(lambda: ready(after=old), f"rank 0 to add new images to {cache}")
        st = Store(cache, mode="r+")
        plan = st.index.plan(share=share)
    return st, plan


# ---- the end of a run ------------------------------------------------------------------------------------------
def finalize(st: Store, plan: Plan, seal_it: bool = True) -> tuple[np.ndarray, dict[str, str], bool]:
    """Status of every image from the plan and the done markers; seal the cache (when `seal_it`) once nothing is
    pending."""
    markers = st.markers.read()
    status, failures = marker_status(plan, markers, st.index.pruned())
    complete = bool((status != STATUS_PENDING).all())
    if seal_it and complete and st.metafile.disk_state() != "sealed":
        seal(st, status, failures, st.stats.merged(plan.buckets, markers), markers, plan)
    return status, failures, complete


def seal(st: Store, status: np.ndarray, failures: dict[str, str], channel_stats: dict[str, Any] | None,
         markers: MarkerMap, plan: Plan) -> None:  # fmt: skip
    """Write `status` and the failures, the marker summary, then the metadata that says sealed.

    Sealing a plan that was sealed before (after --repair or --prune) never rewrites the index readers hold:
    the status goes into a copy of the index (`plan`'s columns) that the same metadata write switches to."""
    disk = st.metafile.disk()
    if disk.get("state") == "sealed" and disk.get("index_group") == st.index.group:
        return  # another rank of a manual split sealed this very plan first
    st.metafile.check_generation()  # another run's index switch is never overwritten with this run's status
    group, changes = st.index.group, {}
    before = (disk.get("last_sealed") or {}).get("index_group")
    sums = dict(disk.get("index_checksums") or {})
    read = as_read(plan, markers)
    if before == group or sources_differ(read, plan):  # readers may be reading this group, or the source changed
        group = f"index_r{st.metafile.generation + 1}"  # between planning and extraction: seal a corrected copy
        st.files.delete_tree(group)
        sums = write_index(st.root, group, read)
        changes = {"index_group": group, "previous_index_group": st.index.group}
        if read.archives != plan.archives:
            changes["source_archives"] = list(read.archives)
    st.root[group]["status"][:] = status
    now = time.time()
    sums |= column_checksums({"status": status})
    summary = st.markers.write_summary(group, markers)
    last = {"index_group": group, "num_buckets": len(disk["buckets"]), "index_checksums": sums, "sealed_at": now}
    last["marker_summary"] = summary
    st.index.write_records(
        {FAILURES: failures},
        **changes,
        state="sealed",
        sealed_at=now,
        index_checksums=sums,
        last_sealed=last,
        previous_sealed_group=before,
        channel_stats=channel_stats,
        marker_summary=summary,
    )
    housekeeping.drop_stale_index_groups(st)
