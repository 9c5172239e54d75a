"""`extract`: the precompute run. It checks everything first (settings, paths, the model's config), lists the source,
asks the cache layer for a cache (rank 0 creates, resumes, extends, repairs or prunes it under the lock; the other
ranks join), extracts this rank's pending shards (dinofeat.extraction.loop) and asks the cache layer to finalize.

    discover -> probe -> bucket -> plan -> decode+resize -> batch -> model -> slice -> write -> seal
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dinofeat import __version__
from dinofeat.cache import housekeeping, lifecycle, maintenance
from dinofeat.cache.layout import STATUS_DONE, STATUS_FAILED, STATUS_PENDING, STATUS_PRUNED, Plan
from dinofeat.cache.lock import cache_lock
from dinofeat.cache.markers import as_read, marker_status
from dinofeat.cache.objects import cache_location
from dinofeat.cache.store import Store
from dinofeat.errors import ConfigError, DinofeatError
from dinofeat.extraction import ranks
from dinofeat.extraction.config import FINGERPRINTED, ExtractConfig
from dinofeat.extraction.locate import moved_members, refuse_missing, source_changes, source_from_plan
from dinofeat.extraction.loop import run_shards
from dinofeat.extraction.plan import projected_bytes
from dinofeat.extraction.prepare import (
    Prepared,
    build_plan,
    prepare,
    refuse_meaningless,
    request_for,
    settings_for,
)
from dinofeat.extraction.stale import changed_images, resized_done_images, resized_reason
from dinofeat.paths import check_cache_dir, is_url, local_path
from dinofeat.sources.archive import is_archive_source
from dinofeat.sources.discover import Source, discover, no_images
from dinofeat.storeerrors import store_errors


@dataclass(frozen=True)
class RankWork:
    """What one process of a run did itself: every rank of a split says it (a manual split's rank printed nothing)."""

    rank: int
    images: int  # extracted by this process, failed ones included
    failed: int  # of those, the images that failed (decode errors and the like)
    shards: int  # written by this process
    seconds: float
    bytes_written: int = 0
    plan_images: int = 0  # images of the plan this process held: all of them on rank 0, its shards' on the others


@dataclass
class Summary:
    """What a run did; the CLI prints it, the Python API returns it."""

    cache: str
    total: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0
    processed: int = 0  # images computed by this run
    seconds: float = 0.0
    bytes_written: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    sealed: bool = False
    new_files: int = 0  # in the folder but not planned (a --limit run leaves them out)
    removed_files: int = 0  # planned but gone from the folder; their features are kept
    appended: int = 0  # images this run added to an existing cache (an incremental run)
    removed_examples: list[str] = field(default_factory=list)
    world_size: int = 1
    rank: int = 0
    cleaned_files: int = 0
    dry_run: bool = False
    histogram: list[tuple[str, int]] = field(default_factory=list)
    projected_bytes: int = 0
    pruned: int = 0  # images dropped with --prune, by this run or an earlier one (not served, not counted as done)
    pruned_now: int = 0  # dropped by this run
    repaired: list[str] = field(default_factory=list)  # shards --repair found damaged and re-extracted
    damaged: list[str] = field(default_factory=list)  # marked shards whose files are gone (rerun with --repair)
    inherited: dict[str, Any] = field(default_factory=dict)  # settings taken from the cache (not given this run)
    timings: dict[str, float] = field(default_factory=dict)  # this process's seconds per stage (loop.LoopResult)
    shards_written: int = 0  # by this process
    version: str = __version__
    manual_split: bool = False  # a --rank/--world-size split: this summary is one rank's, the others run on their own
    ranks: list[RankWork] = field(default_factory=list)  # each process's own work (a manual split: this one's)

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _disk_errors(cache: Path | str) -> Iterator[None]:
    """Disk full, read-only filesystem, permissions: one clear line instead of a traceback (the CLI exits 1)."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        raise DinofeatError(
            f"cannot write the cache {cache}: {e.strerror} ({e.filename or cache}). Finished shards are kept: free "
            "space or fix permissions, then rerun the same command to resume"
        ) from e


def _reason_class(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


@dataclass(frozen=True)
class Actions:
    """What a run does besides extracting what is pending: start over, re-extract damaged shards, drop images
    that are gone from the source, or only plan."""

    overwrite: bool = False
    repair: bool = False
    prune: bool = False
    dry_run: bool = False


def extract(
    source: str | os.PathLike[str],
    cache: str | os.PathLike[str],
    config: ExtractConfig | None = None,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    repair: bool = False,
    prune: bool = False,
    inherit: Collection[str] | None = None,
    **overrides: Any,
) -> Summary:
    """Precompute features for every image under `source` into `cache`; rerun the same call to resume.

    `overrides` are ExtractConfig fields, e.g. `extract("imgs", "feats", model="facebook/dinov3-vitl16-...",
    area=512)`. Raises ConfigError / CacheMismatchError before any work; bad images are recorded, not raised.
    `repair` re-extracts the shards that fail a full check (and only those); `prune` drops the cached images that
    are gone from the source (docs/format.md, "Repair and prune"). On an existing cache, the settings named in
    `inherit` come from the cache's record (default: with no `config`, every stored-number setting not in
    `overrides`, so a rerun needs no options); the summary's `inherited` says which.
    """
    # a source or cache on object storage that fails: one line, naming the remote one (a local cache's store is its
    # source's)
    where = os.fspath(cache) if is_url(os.fspath(cache)) or not is_url(os.fspath(source)) else os.fspath(source)
    with store_errors(where):
        return _extract(source, cache, config, Actions(overwrite, repair, prune, dry_run), inherit, overrides)


def _extract(
    source: str | os.PathLike[str],
    cache: str | os.PathLike[str],
    config: ExtractConfig | None,
    actions: Actions,
    inherit: Collection[str] | None,
    overrides: dict[str, Any],
) -> Summary:
    dry_run, overwrite, repair, prune = actions.dry_run, actions.overwrite, actions.repair, actions.prune
    _check_actions(actions)
    given = os.fspath(cache)  # what messages name
    names = (set(FINGERPRINTED) - set(overrides) if config is None else set()) if inherit is None else set(inherit)
    cache, config = _checked_inputs(source, cache, config, overrides)
    config, taken = settings_for(cache, config, names, overwrite)
    group = ranks.join(config.rank, config.world_size, config.device)
    prep = prepare(config, group)
    refuse_meaningless(cache, config, prep.model, overwrite)
    try:
        if group.is_leader and not dry_run and housekeeping.exists(cache):
            _refuse_if_locked(cache, group)  # in seconds, not after listing 100M files (the real lock is taken below)
        # in a process group only rank 0 lists the source (100M files or tar headers); the others read the plan. The
        # whole listing, even under --limit: what is present decides what is removed, pruned or moved; the plan is
        # capped
        src = discover(source) if group.is_leader or not group.connected or dry_run else None
        if src is not None and not src.keys:
            raise ConfigError(no_images(source))
    except Exception as e:
        if group.is_leader and group.connected and not dry_run:  # the others wait for the plan (_open_on_every_rank)
            group.broadcast(e)  # they stop with this error, not with gloo's when this process ends (issue 32.10)
        raise
    summary = Summary(cache=given, dry_run=dry_run, world_size=group.world_size, rank=group.rank, inherited=taken)
    summary.manual_split = group.world_size > 1 and not group.connected
    if dry_run:
        assert src is not None
        return _dry_run(cache, src, prep, summary, overwrite)
    if (overwrite or prune or repair) and group.world_size > 1 and not group.connected:
        raise ConfigError(
            "--overwrite, --repair and --prune change the whole cache, which a manual --rank/--world-size split "
            "shares: run them once as one process (or a process group) before starting the ranks"
        )
    progress = config.progress and group.is_leader
    with contextlib.ExitStack() as held, _disk_errors(cache):
        st, plan, src = _open_on_every_rank(cache, src, prep, group, actions, summary, held)
        pending = _pending_shards(st, plan, src, group, summary)
        ran = run_shards(st, plan, src, prep, pending, progress, st.index.pruned())
        summary.processed, summary.seconds, summary.bytes_written = ran.images, ran.seconds, ran.bytes_written
        summary.timings, summary.shards_written = ran.timings, ran.shards
        own = RankWork(group.rank, ran.images, ran.failed, ran.shards, ran.seconds, ran.bytes_written, len(plan))
        group.barrier()  # every rank's shards are marked before anyone seals
        _finish(st, plan, group, summary, repaired=repair, own=own)
        if summary.sealed and group.is_leader:
            housekeeping.purge_retired(cache)  # an --overwrite's old generation, kept for its readers until now
    return summary


def _refuse_if_locked(cache: Path | str, group: ranks.Group) -> None:
    """CacheLockedError now if another run holds the cache: taken and let go at once."""
    manual = group.world_size > 1 and not group.connected
    with cache_lock(cache, shared=manual, what="precompute (checking the lock)"):
        pass


def _checked_inputs(
    source: str | os.PathLike[str], cache: str | os.PathLike[str], config: ExtractConfig | None, overrides: Any
) -> tuple[Path | str, ExtractConfig]:
    """The cache's real location and the settings, with every path and option refused before anything exists."""
    if not os.fspath(source).strip() or not os.fspath(cache).strip():
        raise ConfigError("the image source and the cache must be named (an empty argument was given)")
    cache = cache_location(cache)  # symlinks resolved (one cache, one lock); unsupported URLs refused before any work
    if isinstance(cache, Path):
        check_cache_dir(cache)
    if not is_archive_source(os.fspath(source)):
        local_path(source, "image source")  # folders and lists are local; tar shards and parquet files may be URLs
    try:
        return cache, replace(config or ExtractConfig(), **overrides)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def _dry_run(cache: Path | str, src: Source, prep: Prepared, summary: Summary, overwrite: bool) -> Summary:
    """What a run would plan, written nowhere; an existing cache made otherwise is refused, as the run would."""
    if not overwrite and housekeeping.exists(cache):
        lifecycle.check_fingerprint(Store(cache), prep.fingerprint())
    limit = prep.config.limit
    plan = build_plan(src if limit is None else src.subset(src.keys[:limit]), prep, prep.config.progress)
    summary.total = len(plan)
    summary.failed = len(plan.probe_errors)
    summary.pending = summary.total - summary.failed
    summary.histogram = plan.histogram()
    summary.projected_bytes = projected_bytes(
        plan, prep.model.hidden_size, prep.config.store_dtype, prep.registers_stored, prep.arrays.copies
    )
    summary.failures_by_reason = dict(Counter(_reason_class(r) for r in plan.probe_errors.values()))
    return summary


def _pending_shards(st: Store, plan: Plan, src: Source, group: ranks.Group, summary: Summary) -> set[tuple[str, int]]:
    """This rank's unmarked shards, cleaned of what a crash left in them; the source compared with the plan."""
    summary.new_files, summary.removed_files, summary.removed_examples = source_changes(plan, src, st.index.pruned())
    done = set(st.markers.read())
    pending = {(s.bucket, s.shard) for s in plan.shards() if (s.bucket, s.shard) not in done and group.owns(s.ordinal)}
    if not group.is_leader and not group.connected:  # rank 0 checked every shard; a manual split's rank its own
        refuse_missing(plan, src, pending, st.index.pruned())
    summary.cleaned_files += housekeeping.cleanup(st, pending, orphans=False)
    return pending


def _finish(st: Store, plan: Plan, group: ranks.Group, summary: Summary, repaired: bool, own: RankWork) -> None:
    """Every rank's counts summed, the cache sealed once nothing is pending, and the run's outcome counted."""
    summary.ranks = group.gather(own)  # one collective: the run's totals are the ranks' sums
    if group.connected:
        summary.processed = sum(r.images for r in summary.ranks)
        summary.seconds = max(r.seconds for r in summary.ranks)
        summary.bytes_written = sum(r.bytes_written for r in summary.ranks)
    counts = None
    if group.is_leader or not group.connected:  # a rank of a process group holds only its part of the plan
        status, failures, complete = lifecycle.finalize(st, plan, seal_it=True)
        if summary.manual_split and not complete:  # another rank may have marked its last shard since: count again
            status, failures, complete = lifecycle.finalize(st, plan)
        counts = _Counts.of(status, failures, complete)
    if group.connected:
        counts = group.broadcast(counts)  # rank 0's counts of the whole cache, once its seal is on disk
    group.barrier()  # the seal is on disk before any rank returns
    assert counts is not None
    summary.total, summary.done, summary.failed = counts.total, counts.done, counts.failed
    summary.pending, summary.pruned, summary.sealed = counts.pending, counts.pruned, counts.sealed
    summary.failures_by_reason = counts.reasons
    summary.histogram = plan.histogram()
    if group.is_leader and not repaired:  # the cheap check: one listing (bit flips need validate or --repair)
        summary.damaged = [str(d) for d in maintenance.missing_shard_files(st, plan, st.markers.read())]


@dataclass(frozen=True)
class _Counts:
    """A finished run's counts of the whole cache (rank 0 sends them to the ranks that hold only their part)."""

    total: int
    done: int
    failed: int
    pending: int
    pruned: int
    sealed: bool
    reasons: dict[str, int]

    @staticmethod
    def of(status: np.ndarray, failures: dict[str, str], sealed: bool) -> _Counts:
        n = [int((status == s).sum()) for s in (STATUS_DONE, STATUS_FAILED, STATUS_PENDING, STATUS_PRUNED)]
        return _Counts(len(status), *n, sealed, dict(Counter(_reason_class(r) for r in failures.values())))


def _open_on_every_rank(
    cache: Path | str,
    src: Source | None,
    prep: Prepared,
    group: ranks.Group,
    actions: Actions,
    summary: Summary,
    held: contextlib.ExitStack,
) -> tuple[Store, Plan, Source]:
    """Rank 0 takes the cache's lock, then plans (creates, resumes or extends the cache; repairs and prunes it when
    asked) while the others wait; an error while locking or planning is raised on every rank, so no rank waits
    forever for a plan that will never come. The lock stays in `held` for the whole run. Ranks of a manual split
    each hold it shared. Returns the source every rank reads: rank 0's listing, or the plan's locations corrected
    by what rank 0 found moved."""
    manual = group.world_size > 1 and not group.connected
    if not group.is_leader:
        outcome = group.broadcast(None)
        if isinstance(outcome, BaseException):
            raise outcome
        if manual:
            held.enter_context(cache_lock(cache, shared=True, what=f"precompute rank {group.rank}/{group.world_size}"))
        wait = None if group.connected else _waiter(prep.config.wait_s, group.rank)
        request = request_for(src, prep, False) if src is not None else _join_request(prep)
        # a rank of a process group holds only its shards' images (issue 29.3): rank 0 counts and seals the whole
        st, plan = lifecycle.join(cache, request, wait, (group.rank, group.world_size) if group.connected else None)
        if src is None:
            src = source_from_plan(plan, str(st.meta["source_root"]), st.index.source_names(), outcome or {})
        return st, plan, src
    assert src is not None  # rank 0 always lists the source
    try:
        held.enter_context(cache_lock(cache, shared=manual, what="precompute" + (" rank 0" if manual else "")))
        request = request_for(src, prep, prep.config.progress)
        st, plan, summary.appended = lifecycle.open_or_create(cache, request, actions.overwrite)
        summary.cleaned_files += housekeeping.cleanup(st, set(), orphans=True, exclusive=not manual)
        plan = _maintain(st, plan, src, request, prep.config, actions, summary)
        unmarked = {(s.bucket, s.shard) for s in plan.shards()} - set(st.markers.read())
        refuse_missing(plan, src, unmarked, st.index.pruned())
        moved = moved_members(plan, src) if group.connected else {}
    except Exception as e:
        group.broadcast(e)
        raise
    group.broadcast(moved)  # where rank 0 found images that are no longer where the plan says
    return st, plan, src


def _check_actions(actions: Actions) -> None:
    """Flags that contradict each other are refused before anything is read."""
    fixes = [flag for flag, on in (("--repair", actions.repair), ("--prune", actions.prune)) if on]
    if fixes and actions.overwrite:
        raise ConfigError(f"{' and '.join(fixes)} keep the cache and fix it; --overwrite starts over: give one")
    if fixes and actions.dry_run:
        raise ConfigError(f"--dry-run only plans; {' and '.join(fixes)} check the whole cache: run validate to see "
                          "what they would find")  # fmt: skip


def _maintain(
    st: Store,
    plan: Plan,
    src: Source,
    request: lifecycle.Request,
    config: ExtractConfig,
    actions: Actions,
    summary: Summary,
) -> Plan:
    """--repair's check first (it refuses, before any change, damaged shards whose images are gone unless they are
    pruned), then --prune (a damaged shard that held pruned images is extracted again without them). Returns the
    plan the run extracts: a changed image whose dimensions changed too is planned again (lifecycle.extend) into
    the bucket its new size belongs to, after its old shard was unmarked (its old row is extracted again, vacant)."""
    present = set(src.keys)
    if actions.repair:
        markers = st.markers.read()
        status, _ = marker_status(plan, markers, st.index.pruned())
        changed = changed_images(as_read(plan, markers), status, src)
        resized = resized_done_images(plan, markers, status, src, changed, config.recipe.max_pixels)
        changed |= {k: resized_reason(*sizes) for k, sizes in resized.items() if k not in changed}
        damage = maintenance.repair(st, plan, present, actions.prune, config.progress, changed)
        summary.repaired = [str(d) for d in damage]
        plan, _ = lifecycle.extend(st, plan, request, resized)
    if actions.prune:
        summary.pruned_now = len(maintenance.prune(st, plan, present))
    return plan


def _waiter(timeout_s: float, rank: int) -> Any:
    """How a rank of a manual split waits for rank 0 (no process group: it polls the cache), saying so on stderr."""

    def say(line: str) -> None:
        print(f"rank {rank}: {line}", file=sys.stderr, flush=True)

    return lambda ready, what: ranks.wait_until(ready, what, timeout_s, say=say)


def _join_request(prep: Prepared) -> lifecycle.Request:
    """What a rank that does not list the source asks of the cache: the settings must match; no images of its own."""

    def no_planning(keys: tuple[str, ...], part: int) -> Plan:
        raise AssertionError("only rank 0 plans")

    return lifecycle.Request(
        fingerprint=prep.fingerprint(),
        keys=(),
        renamed={},
        plan=no_planning,
        describe=lambda plan: {},
        hidden=prep.model.hidden_size,
        registers=prep.registers_stored,
        store_dtype=prep.config.store_dtype,
    )
