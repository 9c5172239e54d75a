"""Where each rank reads images from: rank 0 lists the source; the others read each image's location from the plan
(tar byte ranges, parquet rows), corrected by what rank 0 found moved in this run."""

from __future__ import annotations

import numpy as np

from dinofeat.cache.layout import Plan
from dinofeat.errors import ConfigError
from dinofeat.keys import packed
from dinofeat.sources.archive import Member
from dinofeat.sources.discover import Facts, Source, source_root
from dinofeat.sources.members import Members


def planned_members(plan: Plan) -> Members | None:
    """Each image's location as the plan recorded it (tar: byte range; parquet: row), as columns; None when the
    plan's images are files. The plan's own arrays, not copies."""
    if plan.archive is None or plan.offset is None:
        return None
    return Members(plan.archives, plan.archive, plan.offset, plan.file_size, plan.mtime_ns)


def planned_facts(plan: Plan, i: int) -> Facts:
    """Image i's facts as the plan recorded them (what a decode worker compares with what it reads)."""
    size, mtime = int(plan.file_size[i]), int(plan.mtime_ns[i])
    if plan.archive is None or plan.offset is None or int(plan.archive[i]) < 0:
        return size, mtime, None, -1
    return size, mtime, plan.archives[int(plan.archive[i])], int(plan.offset[i])


def moved_members(plan: Plan, src: Source) -> dict[str, Member]:
    """Planned archive images that are somewhere else now (a tar shard or parquet file rewritten since it was
    planned): key -> where rank 0's listing found it in this run. The other ranks of a process group locate
    images from the plan, so rank 0 hands them these corrections; images that stayed put are not sent. Compared
    column by column: no object per image."""
    was = planned_members(plan)
    now = src.members
    if now is None or was is None:
        return {}
    at = packed(plan.keys).positions(src.keys)
    listed = np.flatnonzero((at >= 0) & (was.archive[np.maximum(at, 0)] >= 0))
    p = at[listed]
    was_archive = np.array([*was.archives, ""], dtype=object)[was.archive[p]]
    now_archive = np.array([*now.archives, ""], dtype=object)[now.archive[listed]]
    size_was, size_now = was.size[p], now.size[listed]
    resized = (size_was >= 0) & (size_now >= 0) & (size_was != size_now)  # a parquet row's size: -1 until read
    differs = (
        resized
        | (was_archive != now_archive)
        | (was.offset[p] != now.offset[listed])
        | (was.mtime_ns[p] != now.mtime_ns[listed])
    )
    return {src.keys[int(i)]: src.location(int(i)) for i in listed[differs]}


def source_from_plan(plan: Plan, root: str, renamed: dict[str, str], moved: dict[str, Member] | None = None) -> Source:
    """What a rank other than rank 0 reads images from: the plan's keys and, for archives, each image's location as
    recorded in the index, corrected by what rank 0 found `moved` in this run, so only rank 0 ever lists the
    source and every rank reads what rank 0 checked."""
    keys = packed(plan.keys)
    members = planned_members(plan)
    if members is not None and moved:
        at = keys.positions(list(moved))
        members = members.with_changes({int(i): m for i, m in zip(at, moved.values(), strict=True) if i >= 0})
    return Source(source_root(root), keys, dict(renamed), members)


def source_changes(plan: Plan, src: Source, pruned: set[str]) -> tuple[int, int, list[str]]:
    """(images in the source the plan does not hold, planned images gone from the source, the first five of those
    in key order), pruned images counted as not planned. Matched as columns, no set of every key."""
    keys = packed(plan.keys)
    kept = np.ones(len(keys), bool)
    if pruned:
        at = keys.positions(sorted(pruned))
        kept[at[at >= 0]] = False
    held = keys.positions(src.keys)  # each listed image's place in the plan
    new = int(((held < 0) | ~kept[np.maximum(held, 0)]).sum()) if len(keys) else len(src.keys)
    gone = kept & (src.keys.positions(keys) < 0)
    first = keys.order[gone[keys.order]][:5]  # in key order
    return new, int(gone.sum()), [keys[int(i)] for i in first]


def missing_in_pending(plan: Plan, src: Source, pending: set[tuple[str, int]], pruned: set[str]) -> list[str]:
    """Planned images gone from the source whose shard still has to be extracted (they would stop the run), pruned
    ones aside; images gone from finished shards are only reported. Matched as columns; a key is decoded only for
    an image that is missing."""
    keys = packed(plan.keys)
    gone = (plan.bucket >= 0) & (src.keys.positions(keys) < 0)
    out = []
    for i in np.flatnonzero(gone):
        key = keys[int(i)]
        if plan.shard_of(int(i)) in pending and key not in pruned:
            out.append(key)
    return out


def refuse_missing(plan: Plan, src: Source, pending: set[tuple[str, int]], pruned: set[str]) -> None:
    """Rank 0 checks every unfinished shard (before the others start), each rank its own shards again. Pruned
    images are not missing: they are recorded as gone."""
    missing = missing_in_pending(plan, src, pending, pruned)
    if missing:
        raise ConfigError(
            f"{len(missing)} planned images of unfinished shards are gone from {src.root} (e.g. {missing[0]!r}); "
            "restore them, or rerun with --prune to drop them from the cache"
        )
