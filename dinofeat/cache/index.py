"""The index: one row per planned image (key, bucket, row, source facts, status) in a group of its own per plan
generation, each column checked against the crc32c the metadata records; and the plan's small records beside it
(probe failures, failures, pruned keys, renamed source files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.codecs import Crc32cCodec

from dinofeat.cache.checksum import column_checksums, crc32c, mismatched_columns
from dinofeat.cache.layout import INDEX_COLUMNS, SOURCE_COLUMNS, BucketPlan, Plan
from dinofeat.errors import CacheFormatError
from dinofeat.keys import PackedKeys, joined, pack, packed
from dinofeat.paths import key_for

if TYPE_CHECKING:
    from dinofeat.cache.store import Store

Selector = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (bucket, row) columns -> the positions to keep

PROBE_FAILURES = "_dinofeat/probe_failures.json"
FAILURES = "_dinofeat/failures.json"
SOURCE_NAMES = "_dinofeat/source_names.json"
PRUNED = "_dinofeat/pruned.json"
RECORD_CHECKSUMS = "record_checksums"  # metadata: {record path: [crc32c the file may have]} (issue 32)


KEY_CHUNK = 1 << 16  # keys per chunk of the key column: what one read decodes at a time (zarr decodes a chunk whole)


def write_index(root: Any, group: str, plan: Plan, status: np.ndarray | None = None) -> dict[str, int]:
    """Write the index columns as group `group` (each chunk with zarr's crc32c codec; `status` all pending unless
    given); returns each column's crc32c for the metadata. The key column is written a chunk at a time from the
    packed keys (chunks of KEY_CHUNK keys: any zarr reader reads them, and ours decodes one chunk at a time)."""
    idx = root.create_group(group, overwrite=True)
    n = len(plan)
    keys = packed(plan.keys)
    cols: dict[str, np.ndarray] = {
        "bucket": plan.bucket,
        "row": plan.row,
        "src_w": plan.src_w,
        "src_h": plan.src_h,
        "distortion": plan.distortion,
        "file_size": plan.file_size,
        "mtime_ns": plan.mtime_ns,
    }
    if plan.archive is not None:
        cols |= {"archive": plan.archive, "offset": plan.offset}
    cols["status"] = np.zeros(n, np.int8) if status is None else status
    a = idx.create_array("key", shape=(n,), dtype=str, chunks=(max(1, min(n, KEY_CHUNK)),), compressors=[Crc32cCodec()])
    for start in range(0, n, KEY_CHUNK):
        a[start : start + KEY_CHUNK] = keys[start : start + KEY_CHUNK].column()  # variable width: nothing padded
    for name, values in cols.items():
        a = idx.create_array(
            name,
            shape=(n,),
            dtype=values.dtype,
            chunks=(max(n, 1),),
            fill_value=0 if name == "status" else None,
            compressors=[Crc32cCodec()],
        )
        if n:
            a[:] = values
    return column_checksums({"key": keys, **cols})


def read_keys(array: Any) -> PackedKeys:
    """The key column, packed, decoded a stored chunk at a time (a cache written before 0.8 has one chunk: read
    whole, as before)."""
    n = array.shape[0]
    step = max(1, array.chunks[0])
    return joined([pack(array[start : start + step]) for start in range(0, n, step)])


def bucket_plans(meta: dict[str, Any]) -> tuple[BucketPlan, ...]:
    """The buckets the metadata records, in index order (the index's `bucket` column points into them)."""
    patch = int(meta["model"]["patch_size"])
    return tuple(
        BucketPlan(
            int(b["width"]),
            int(b["height"]),
            patch,
            int(b["rows"]),
            int(b["shard_rows"]),
            int(b.get("part", 0)),
            tuple(b["dit_size"]) if b.get("dit_size") else None,
        )
        for b in meta["buckets"]
    )


class Index:
    """A cache's index and the plan's records, read through the store that opened the cache."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _check(self, group: str, cols: dict[str, np.ndarray], sums: dict[str, Any]) -> None:
        """CacheFormatError when a recorded column read here (or not found) fails its checksum."""
        bad = mismatched_columns(cols, {n: v for n, v in sums.items() if n in cols or not cols})
        if bad:
            raise CacheFormatError(
                f"{self.store.path}: index column(s) {', '.join(f'{group}/{n}' for n in bad)} fail their "
                "checksum (damaged, or a chunk is missing); the cache cannot be trusted: rebuild it with "
                "--overwrite"
            )

    @property
    def group(self) -> str:
        return str(self.store.meta.get("index_group", "index"))

    def read(self, generation: dict[str, Any] | None = None, select: Selector | None = None) -> dict[str, np.ndarray]:
        """The index columns of the current plan, or of `generation` (a `last_sealed` record), checked against
        their recorded crc32c (format 3). `status` is checked only once sealed: a run writes it just before the
        metadata that vouches for it. If an incremental run switched the index since this store was opened and
        its group is gone, the metadata is read again and the current index is returned.

        `select(bucket, row)` -> positions: only those rows are kept, each column read,
        checked and cut before the next is read, so a rank that works on part of the plan never holds the whole
        of it (at most one column at a time)."""
        for attempt in (0, 1):
            meta = self.store.meta
            if generation is not None:
                group, sums = str(generation["index_group"]), dict(generation.get("index_checksums") or {})
            else:
                group, sums = self.group, dict(meta.get("index_checksums") or {})
                if meta.get("state") != "sealed":
                    sums.pop("status", None)
            try:
                g = self.store.root[group]
                optional = [n for n in SOURCE_COLUMNS if n in sums or n in g]
                names = ("bucket", "row", *(n for n in INDEX_COLUMNS if n not in ("bucket", "row")), "status")
                cols: dict[str, np.ndarray] = {}
                pos = None
                for name in (*names, *optional):
                    values = read_keys(g[name]) if name == "key" else g[name][:]
                    self._check(group, {name: values}, sums)
                    cols[name] = values
                    if select is not None and name == "row":
                        pos = np.asarray(select(cols["bucket"], cols["row"]), np.int64)
                        cols = {"bucket": cols["bucket"][pos], "row": cols["row"][pos]}
                    elif pos is not None:
                        cols[name] = values.take(pos) if isinstance(values, PackedKeys) else values[pos]
            except (KeyError, FileNotFoundError):
                if attempt or generation is not None:
                    raise CacheFormatError(
                        f"{self.store.path}: index group {group!r} or one of its columns is missing; the cache is "
                        "damaged (run `dinofeat validate`; rebuild with --overwrite)"
                    ) from None
                self.store.reload()
                continue
            except CacheFormatError:
                raise
            except Exception as e:  # a damaged chunk or array metadata: zarr's crc32c codec, JSON, UTF-8 errors
                raise CacheFormatError(
                    f"{self.store.path}: index group {group!r} is damaged ({type(e).__name__}: {e}); run `dinofeat "
                    "validate`, rebuild with --overwrite"
                ) from None
            missing = [n for n in sums if n not in cols]
            if missing:
                self._check(group, {}, {n: sums[n] for n in missing})
            return cols
        raise AssertionError("unreachable")

    def bucket_plans(self) -> tuple[BucketPlan, ...]:
        return bucket_plans(self.store.meta)

    def plan(self, ix: dict[str, np.ndarray] | None = None, share: tuple[int, int] | None = None) -> Plan:
        """The plan as the index records it (`ix`: the index, when the caller has just read it). `share` (rank,
        world size): only the images of the shards that rank extracts (shard ordinal % world size == rank), each
        column cut as it is read, renumbered from 0; the buckets are the whole plan's."""
        if ix is None:
            ix = self.read(select=None if share is None else self._shard_selector(*share))
        keys = packed(ix["key"])
        failed = self.probe_failures() if share is None else {}  # images no shard holds: rank 0's to record
        pos = dict(zip(failed, keys.positions(list(failed)).tolist(), strict=True))
        return Plan(
            keys=keys,
            bucket=ix["bucket"],
            row=ix["row"],
            src_w=ix["src_w"],
            src_h=ix["src_h"],
            distortion=ix["distortion"],
            file_size=ix["file_size"],
            mtime_ns=ix["mtime_ns"],
            probe_errors=dict(sorted((pos[k], r) for k, r in failed.items() if pos[k] >= 0)),
            buckets=self.bucket_plans(),
            archive=ix.get("archive"),
            offset=ix.get("offset"),
            archives=tuple(self.store.meta.get("source_archives") or ()),
        )

    def _shard_selector(self, rank: int, world: int) -> Selector:
        buckets = self.bucket_plans()
        base = np.concatenate([[0], np.cumsum([b.num_shards for b in buckets])]).astype(np.int64)
        per = np.array([b.shard_rows for b in buckets] + [1], np.int64)

        def select(bucket: np.ndarray, row: np.ndarray) -> np.ndarray:
            held = bucket >= 0
            ordinal = base[np.where(held, bucket, 0)] + row // per[np.where(held, bucket, len(buckets))]
            return np.flatnonzero(held & (ordinal % world == rank))

        return select

    # ---- the plan's records -----------------------------------------------------------------------------------
    def _checked_bytes(self, rel: str) -> bytes | None:
        """A record's bytes (None if absent), checked against the crc32c values the metadata accepts for it (rule
        18). A record the metadata does not list (a cache written by dinofeat <= 0.6.1) is read as it is."""
        accepted = recorded_crcs(self.store.meta, rel)
        try:
            data = self.store.files.read(rel)
        except FileNotFoundError:
            if accepted is not None:
                raise CacheFormatError(
                    f"{self.store.path}: {rel} is missing (damaged); restore it from a copy"
                ) from None
            return None
        if accepted is not None and crc32c(data) not in accepted:
            raise CacheFormatError(
                f"{self.store.path}: {rel} fails its checksum (edited or damaged since written); restore it from a "
                "copy, or rebuild with --overwrite"
            )
        return data

    def _read_json(self, rel: str, default: Any) -> Any:
        data = self._checked_bytes(rel)
        if data is None:
            return default
        try:
            return json.loads(data)
        except ValueError as e:  # a damaged record is refused by name, never read as another one
            raise CacheFormatError(f"{self.store.path}: {rel} is damaged ({e}); restore it from a copy") from e

    def write_records(self, records: dict[str, Any], **changes: Any) -> None:
        """Write record files and the metadata that vouches for them (with `changes`), so that a crash at any point
        leaves every record matching a crc32c the metadata accepts: a record listed already is first accepted with
        its old bytes or its new ones (one metadata write), then written, then one metadata write (with `changes`)
        accepts only the new bytes."""
        datas = {rel: json.dumps(value, sort_keys=True).encode() for rel, value in records.items()}
        crcs = {rel: crc32c(data) for rel, data in datas.items()}
        listed = dict(self.store.meta.get(RECORD_CHECKSUMS) or {})
        either = {rel: sorted({*listed[rel], c}) for rel, c in crcs.items() if c not in listed.get(rel, [c])}
        if either:
            self.store.metafile.update(**{RECORD_CHECKSUMS: {**listed, **either}})
        for rel, data in datas.items():
            self.store.files.write(rel, data)
        self.store.metafile.update(**changes, **{RECORD_CHECKSUMS: {**listed, **{r: [c] for r, c in crcs.items()}}})

    def damaged_records(self) -> dict[str, str]:
        """Every record that is missing, fails its checksum or is not JSON, with why (what `validate` names)."""
        readers = {
            PROBE_FAILURES: self.probe_failures,
            FAILURES: self.failures,
            SOURCE_NAMES: self.source_names,
            self.pruned_path(): self.pruned,
        }
        out = {}
        for rel, read in readers.items():
            try:
                read()
            except CacheFormatError as e:
                out[rel] = str(e)
        return out

    def source_names(self) -> dict[str, str]:
        """{key: file name relative to the source root} for files whose name is not their key. Each name must be the
        one its key spells (`paths.key_for`) and lie under the root: an edited map never sends a run or `validate
        --recompute` to another file."""
        names = self._read_json(SOURCE_NAMES, {})
        if not isinstance(names, dict):
            raise CacheFormatError(f"{self.store.path}: {SOURCE_NAMES} is not a map of keys to names (damaged)")
        for key, name in names.items():
            if not _is_name_of(key, name):
                raise CacheFormatError(
                    f"{self.store.path}: {SOURCE_NAMES} maps {key!r} to {name!r}, which is not that key's file under "
                    "the source root (edited or damaged); restore it from a copy"
                )
        return names

    def probe_failures(self) -> dict[str, str]:
        return self._read_json(PROBE_FAILURES, {})

    @staticmethod
    def probe_record(plan: Plan) -> dict[str, str]:
        """Keys of images whose header could not be read (keys not in the current index are ignored)."""
        return {plan.keys[i]: r for i, r in plan.probe_errors.items()}

    def failures(self) -> dict[str, str]:
        return self._read_json(FAILURES, {})

    def pruned(self) -> set[str]:
        """Keys dropped with --prune (gone from the source): checked against the crc32c the metadata records."""
        record = self.store.meta.get("pruned")
        if not record:
            return set()
        try:
            data = self.store.files.read(str(record["path"]))
        except FileNotFoundError:
            raise CacheFormatError(f"{self.store.path}: {record['path']} is missing (damaged)") from None
        if crc32c(data) != int(record.get("crc32c", -1)):
            raise CacheFormatError(f"{self.store.path}: {record['path']} fails its checksum (damaged)")
        return set(json.loads(data))

    def pruned_path(self) -> str:
        return str((self.store.meta.get("pruned") or {}).get("path") or PRUNED)

    def write_pruned(self, keys: set[str]) -> None:
        """Record every pruned key: one file, named by the metadata write that records its crc32c and count. A new
        record never overwrites the one in force (it takes the other of two names), so a crash before the metadata
        write leaves the previous prune exactly as it was, and the next run prunes again."""
        old = (self.store.meta.get("pruned") or {}).get("path")
        rel = f"{PRUNED[: -len('.json')]}-{self.store.metafile.generation + 1}.json" if old == PRUNED else PRUNED
        data = json.dumps(sorted(keys), sort_keys=True).encode()
        self.store.files.write(rel, data)
        self.store.metafile.update(pruned={"path": rel, "crc32c": crc32c(data), "count": len(keys)})
        if old and old != rel:
            self.store.files.delete(old)


def recorded_crcs(meta: dict[str, Any], rel: str) -> list[int] | None:
    """The crc32c values the metadata accepts for a record file; None when it lists none for it (dinofeat <= 0.6.1)."""
    listed = meta.get(RECORD_CHECKSUMS)
    if not isinstance(listed, dict) or rel not in listed:
        return None
    return [int(c) for c in listed[rel]]


def _is_name_of(key: str, name: object) -> bool:
    """`name` is a relative path under the source root, without `..`, whose key is `key`."""
    if not isinstance(key, str) or not isinstance(name, str) or not name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and "\0" not in name and key_for(name) == key
