"""Done markers: the one proof that a shard is written. A shard's marker is written after its data and statistics
are durable and records the crc32c of each of its chunks and of its statistics file; sealing folds every marker of
the plan into one summary object, so a reader opens a sealed cache with one read."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from dinofeat.cache.checksum import RowCrcs, crc32c, expected_checksums
from dinofeat.cache.layout import STATUS_DONE, STATUS_FAILED, STATUS_PENDING, STATUS_PRUNED, Plan
from dinofeat.storeerrors import is_store_failure

if TYPE_CHECKING:
    from dinofeat.cache.store import Store

MarkerMap = dict[tuple[str, int], dict[str, Any]]


def marker_status(
    plan: Plan, markers: MarkerMap, pruned: set[str] | frozenset[str] = frozenset()
) -> tuple[np.ndarray, dict[str, str]]:
    """Every planned image's status as the done markers say (pending / done / failed; `pruned` keys are pruned) and
    the failures' reasons: what sealing writes, and what `info` and `validate` count on a cache that is not sealed
    yet."""
    status = np.full(len(plan), STATUS_PENDING, np.int8)
    failures: dict[str, str] = {}
    for i, why in plan.probe_errors.items():
        status[i] = STATUS_FAILED
        failures[plan.keys[i]] = why
    by_bucket = plan.rows_to_keys()
    for b in plan.buckets:
        positions = by_bucket[b.name]
        for u in range(b.num_shards):
            m = markers.get((b.name, u))
            if m is None:
                continue
            start, stop = b.shard_range(u)
            held = positions[start:stop]
            status[held[held >= 0]] = STATUS_DONE
            for r, why in m["failed"].items():
                i = _holder(positions, r)
                if i >= 0:  # a vacant row's failure is no image's
                    status[i] = STATUS_FAILED
                    failures[plan.keys[i]] = why
    if pruned:
        gone = np.array([k in pruned for k in plan.keys], bool)
        status[gone] = STATUS_PRUNED
        failures = {k: why for k, why in failures.items() if k not in pruned}
    return status, failures


def as_read(plan: Plan, markers: MarkerMap) -> Plan:
    """`plan` with each image's source facts (size, mtime, archive, offset) as the marker of its shard says they were
    when it was read, where the source changed between planning and extraction: what the index must record so that
    staleness checks compare the source with the bytes the features came from. Returns `plan` itself when nothing
    changed."""
    changes = [(bucket, m["sources"]) for (bucket, _), m in markers.items() if m.get("sources")]
    if not changes:
        return plan
    by_bucket = plan.rows_to_keys()
    size, mtime = plan.file_size.copy(), plan.mtime_ns.copy()
    archives = list(plan.archives)
    archive = None if plan.archive is None else plan.archive.copy()
    offset = None if plan.offset is None else plan.offset.copy()
    for bucket, rows in changes:
        positions = by_bucket.get(bucket, ())
        for r, (s, t, a, o) in rows.items():
            i = _holder(positions, r)
            if i < 0:
                continue  # a vacant row (its image was planned again), or a marker of another plan: validate names it
            size[i], mtime[i] = s, t
            if archive is not None and offset is not None and a is not None:
                if a not in archives:
                    archives.append(a)
                archive[i], offset[i] = archives.index(a), o
    return replace(plan, file_size=size, mtime_ns=mtime, archive=archive, offset=offset, archives=tuple(archives))


def read_changed(plan: Plan, markers: MarkerMap) -> set[str]:
    """Keys of the images whose source was not as planned when their shard read them (the markers' `sources`).
    dinofeat 0.6.1 stored such an image even when its dimensions had changed, in the bucket planned for the old
    one: --repair and validate --images read these headers again."""
    by_bucket = plan.rows_to_keys()
    out = set()
    for (bucket, _), m in markers.items():
        positions = by_bucket.get(bucket, ())
        out |= {plan.keys[i] for i in (_holder(positions, r) for r in m.get("sources") or {}) if i >= 0}
    return out


def _holder(positions: np.ndarray, row: str | int) -> int:
    """The position of the image holding `row` of a bucket (`Plan.rows_to_keys`), -1 for a vacant or unknown row."""
    r = int(row)
    return int(positions[r]) if 0 <= r < len(positions) else -1


def sources_differ(a: Plan, b: Plan) -> bool:
    """Whether two plans of the same images record different source facts."""
    if a is b:
        return False
    pairs = [(a.file_size, b.file_size), (a.mtime_ns, b.mtime_ns)]
    if a.archive is not None and b.archive is not None and a.offset is not None and b.offset is not None:
        pairs += [(a.archive, b.archive), (a.offset, b.offset)]
    return a.archives != b.archives or not all(np.array_equal(x, y) for x, y in pairs)


class Markers:
    """The done markers of an open cache, and their summary."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def path(bucket: str, shard: int) -> str:
        return f"_dinofeat/done/{bucket}/{shard}.json"

    def write(
        self,
        bucket: str,
        shard: int,
        start: int,
        stop: int,
        failed: dict[int, str],
        checksums: dict[str, list[int]] | None = None,
        stats_crc: int | None = None,
        sources: Mapping[int, Sequence[Any]] | None = None,
    ) -> None:
        """`sources`: row -> (size, mtime_ns, archive or None, offset or -1) of the bytes read, for the rows whose
        source changed since planning; sealing writes them into the index."""
        body: dict[str, Any] = {
            "bucket": bucket,
            "shard": shard,
            "start": start,
            "stop": stop,
            "failed": {str(r): why for r, why in sorted(failed.items())},
            "time": time.time(),
        }
        if checksums:
            body["crc32c"] = checksums
        if stats_crc is not None:
            body["stats_crc32c"] = stats_crc
        if sources:
            body["sources"] = {str(r): list(f) for r, f in sorted(sources.items())}
        self.store.files.write(self.path(bucket, shard), json.dumps(body).encode())

    def read(self) -> MarkerMap:
        """Every readable done marker. Remote markers are fetched 32 at a time (one GET each)."""
        files = self.store.files
        wanted = []
        for rel in files.list("_dinofeat/done"):
            parts = rel.split("/")  # _dinofeat/done/<bucket>/<shard>.json
            if len(parts) == 4 and parts[3].endswith(".json") and parts[3][:-5].isdigit():
                wanted.append((parts[2], int(parts[3][:-5]), rel))

        def load(rel: str) -> dict[str, Any] | None:
            try:
                return json.loads(files.read(rel))
            except (OSError, ValueError) as e:
                if is_store_failure(e):  # an outage is no proof a shard is not done: the caller ends in one line
                    raise
                return None  # unreadable marker = shard not done; it will be redone

        rels = [w[2] for w in wanted]
        if files.remote and len(rels) > 1:
            with ThreadPoolExecutor(32) as ex:
                bodies = list(ex.map(load, rels))
        else:
            bodies = [load(r) for r in rels]
        return {(b, u): m for (b, u, _), m in zip(wanted, bodies, strict=True) if m is not None}

    def write_summary(self, group: str, markers: MarkerMap | None = None) -> dict[str, Any]:
        """At seal: every done marker of the plan folded into one object (which shards are marked, and each row's
        recorded crc32c), so that a reader opens the cache with one read instead of one per shard (on object
        storage: one GET instead of a million). Returns its record for the metadata (path and crc32c)."""
        markers, plans = self.read() if markers is None else markers, self.store.index.bucket_plans()
        arrays = {f"{b.name}::marked": np.array([(b.name, u) in markers for u in range(b.num_shards)]) for b in plans}
        arrays |= {f"{b}::{name}": crcs.to_int64() for (b, name), crcs in expected_checksums(markers, plans).items()}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        rel = f"_dinofeat/sealed/{group}.npz"
        self.store.files.write(rel, buf.getvalue())
        return {"path": rel, "crc32c": crc32c(buf.getvalue())}

    def summary(
        self, record: dict[str, Any] | None
    ) -> tuple[set[tuple[str, int]], dict[tuple[str, str], RowCrcs]] | None:
        """(marked shards, expected row crcs) from the summary `record` names, checked against its crc32c; None if
        there is none (caches sealed before 0.5) or it is missing or damaged: the caller then reads every marker."""
        if not record:
            return None
        try:
            data = self.store.files.read(str(record["path"]))
        except (FileNotFoundError, KeyError):
            return None
        if crc32c(data) != int(record.get("crc32c", -1)):
            return None
        marked: set[tuple[str, int]] = set()
        expected: dict[tuple[str, str], RowCrcs] = {}
        with np.load(io.BytesIO(data)) as z:
            for k in z.files:
                bucket, name = k.split("::", 1)
                if name == "marked":
                    marked |= {(bucket, int(u)) for u in np.flatnonzero(z[k])}
                else:
                    expected[(bucket, name)] = RowCrcs.from_int64(z[k])
        return marked, expected
