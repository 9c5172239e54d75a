"""Where each rank reads images from: rank 0 lists the source; the others read each image's location from the plan
(tar byte ranges, parquet rows), corrected by what rank 0 found moved in this run."""

from __future__ import annotations

import numpy as np

from dinofeat.cache.layout import Plan
from dinofeat.errors import ConfigError
from dinofeat.sources.archive import Member
from dinofeat.sources.discover import Facts, Source, source_root


def planned_members(plan: Plan) -> dict[str, Member]:
    """Each archive image's location as the plan recorded it (tar: byte range; parquet: row)."""
    members: dict[str, Member] = {}
    if plan.archive is not None and plan.offset is not None:
        for i in np.flatnonzero(plan.archive >= 0):
            key = plan.keys[i]
            archive = plan.archives[int(plan.archive[i])]
            sample = key.split("/", 1)[1]  # keys are <file stem>/<sample key or row>
            members[key] = Member(archive, sample, int(plan.offset[i]), int(plan.file_size[i]), int(plan.mtime_ns[i]))
    return members


def planned_facts(plan: Plan, i: int) -> Facts:
    """Image i's facts as the plan recorded them (what a decode worker compares with what it reads)."""
    size, mtime = int(plan.file_size[i]), int(plan.mtime_ns[i])
    if plan.archive is None or plan.offset is None or int(plan.archive[i]) < 0:
        return size, mtime, None, -1
    return size, mtime, plan.archives[int(plan.archive[i])], int(plan.offset[i])


def moved_members(plan: Plan, src: Source) -> dict[str, Member]:
    """Planned archive images that are somewhere else now (a tar shard or parquet file rewritten since it was
    planned): key -> where rank 0's listing found it in this run. The other ranks of a process group locate
    images from the plan, so rank 0 hands them these corrections; images that stayed put are not sent."""
    if not src.members:
        return {}
    planned = planned_members(plan)
    out = {}
    for key, now in src.members.items():
        was = planned.get(key)
        if was is None:
            continue
        resized = was.size >= 0 and now.size >= 0 and was.size != now.size  # a parquet row's size: -1 until read
        if resized or (was.archive, was.offset, was.mtime_ns) != (now.archive, now.offset, now.mtime_ns):
            out[key] = now
    return out


def source_from_plan(plan: Plan, root: str, renamed: dict[str, str], moved: dict[str, Member] | None = None) -> Source:
    """What a rank other than rank 0 reads images from: the plan's keys and, for archives, each image's location as
    recorded in the index, corrected by what rank 0 found `moved` in this run, so only rank 0 ever lists the
    source and every rank reads what rank 0 checked."""
    members = planned_members(plan) | dict(moved or {})
    return Source(source_root(root), tuple(plan.keys), dict(renamed), members)


def missing_in_pending(plan: Plan, found: set[str], pending: set[tuple[str, int]]) -> list[str]:
    """Planned images gone from the folder whose shard still has to be extracted (they would stop the run);
    images gone from finished shards are only reported."""
    out = []
    for i in np.flatnonzero(plan.bucket >= 0):
        key = plan.keys[i]
        if key not in found and plan.shard_of(i) in pending:
            out.append(key)
    return out


def refuse_missing(plan: Plan, src: Source, pending: set[tuple[str, int]], pruned: set[str]) -> None:
    """Rank 0 checks every unfinished shard (before the others start), each rank its own shards again. Pruned
    images are not missing: they are recorded as gone."""
    missing = [k for k in missing_in_pending(plan, set(src.keys), pending) if k not in pruned]
    if missing:
        raise ConfigError(
            f"{len(missing)} planned images of unfinished shards are gone from {src.root} (e.g. {missing[0]!r}); "
            "restore them, or rerun with --prune to drop them from the cache"
        )
