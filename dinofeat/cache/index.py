"""The index: one row per planned image (key, bucket, row, source facts, status) in a group of its own per plan
generation, each column checked against the crc32c the metadata records; and the plan's small records beside it
(probe failures, failures, pruned keys, renamed source files)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.codecs import Crc32cCodec

from dinofeat.cache.checksum import column_checksums, crc32c, mismatched_columns
from dinofeat.cache.layout import INDEX_COLUMNS, SOURCE_COLUMNS, BucketPlan, Plan
from dinofeat.errors import CacheFormatError

if TYPE_CHECKING:
    from dinofeat.cache.store import Store

PROBE_FAILURES = "_dinofeat/probe_failures.json"
FAILURES = "_dinofeat/failures.json"
SOURCE_NAMES = "_dinofeat/source_names.json"
PRUNED = "_dinofeat/pruned.json"


def write_index(root: Any, group: str, plan: Plan, status: np.ndarray | None = None) -> dict[str, int]:
    """Write the index columns as group `group` (each chunk with zarr's crc32c codec; `status` all pending unless
    given); returns each column's crc32c for the metadata."""
    idx = root.create_group(group, overwrite=True)
    n = len(plan)
    cols: dict[str, np.ndarray] = {
        "key": np.array(plan.keys, dtype=str) if n else np.zeros(0, dtype=str),
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
    for name, values in cols.items():
        a = idx.create_array(
            name,
            shape=(n,),
            dtype=values.dtype if name != "key" else str,
            chunks=(max(n, 1),),
            fill_value=0 if name == "status" else None,
            compressors=[Crc32cCodec()],
        )
        if n:
            a[:] = values
    return column_checksums(cols)


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

    @property
    def group(self) -> str:
        return str(self.store.meta.get("index_group", "index"))

    def read(self, generation: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """The index columns of the current plan, or of `generation` (a `last_sealed` record), checked against
        their recorded crc32c (format 3). `status` is checked only once sealed: a run writes it just before the
        metadata that vouches for it. If an incremental run switched the index since this store was opened and
        its group is gone, the metadata is read again and the current index is returned."""
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
                cols = {name: g[name][:] for name in (*INDEX_COLUMNS, "status", *optional)}
            except (KeyError, FileNotFoundError):
                if attempt or generation is not None:
                    raise CacheFormatError(
                        f"{self.store.path}: index group {group!r} or one of its columns is missing; the cache is "
                        "damaged (run `dinofeat validate`; rebuild with --overwrite)"
                    ) from None
                self.store.reload()
                continue
            except Exception as e:  # a damaged chunk or array metadata: zarr's crc32c codec, JSON, UTF-8 errors
                raise CacheFormatError(
                    f"{self.store.path}: index group {group!r} is damaged ({type(e).__name__}: {e}); run `dinofeat "
                    "validate`, rebuild with --overwrite"
                ) from None
            bad = mismatched_columns(cols, sums)
            if bad:
                raise CacheFormatError(
                    f"{self.store.path}: index column(s) {', '.join(f'{group}/{n}' for n in bad)} fail their "
                    "checksum (damaged, or a chunk is missing); the cache cannot be trusted: rebuild it with "
                    "--overwrite"
                )
            return cols
        raise AssertionError("unreachable")

    def bucket_plans(self) -> tuple[BucketPlan, ...]:
        return bucket_plans(self.store.meta)

    def plan(self, ix: dict[str, np.ndarray] | None = None) -> Plan:
        """The plan as the index records it (`ix`: the index, when the caller has just read it)."""
        ix = self.read() if ix is None else ix
        keys = [str(k) for k in ix["key"]]
        pos = {k: i for i, k in enumerate(keys)}
        return Plan(
            keys=keys,
            bucket=ix["bucket"],
            row=ix["row"],
            src_w=ix["src_w"],
            src_h=ix["src_h"],
            distortion=ix["distortion"],
            file_size=ix["file_size"],
            mtime_ns=ix["mtime_ns"],
            probe_errors={pos[k]: r for k, r in self.probe_failures().items() if k in pos},
            buckets=self.bucket_plans(),
            archive=ix.get("archive"),
            offset=ix.get("offset"),
            archives=tuple(self.store.meta.get("source_archives") or ()),
        )

    # ---- the plan's records -----------------------------------------------------------------------------------
    def _read_json(self, rel: str, default: Any) -> Any:
        try:
            return json.loads(self.store.files.read(rel))
        except FileNotFoundError:
            return default
        except ValueError as e:  # a damaged record is refused by name, never read as another one
            raise CacheFormatError(f"{self.store.path}: {rel} is damaged ({e}); restore it from a copy") from e

    def _write_json(self, rel: str, value: Any) -> bytes:
        data = json.dumps(value, sort_keys=True).encode()
        self.store.files.write(rel, data)
        return data

    def source_names(self) -> dict[str, str]:
        return self._read_json(SOURCE_NAMES, {})

    def write_source_names(self, renamed: dict[str, str]) -> None:
        """Keys whose file name is not the key (names that are not UTF-8), for ranks that read the plan instead of
        walking the folder."""
        self._write_json(SOURCE_NAMES, renamed)

    def probe_failures(self) -> dict[str, str]:
        return self._read_json(PROBE_FAILURES, {})

    def write_probe_failures(self, plan: Plan) -> None:
        """Keys of images whose header could not be read (keys not in the current index are ignored)."""
        self._write_json(PROBE_FAILURES, {plan.keys[i]: r for i, r in plan.probe_errors.items()})

    def failures(self) -> dict[str, str]:
        return self._read_json(FAILURES, {})

    def write_failures(self, failures: dict[str, str]) -> None:
        self._write_json(FAILURES, failures)

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

    def write_pruned(self, keys: set[str]) -> None:
        """Record every pruned key (one file, its crc32c and count in the metadata)."""
        data = self._write_json(PRUNED, sorted(keys))
        self.store.metafile.update(pruned={"path": PRUNED, "crc32c": crc32c(data), "count": len(keys)})
