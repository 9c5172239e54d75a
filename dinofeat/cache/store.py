"""The cache on disk: the only module that imports zarr. Layout and rules are in docs/format.md.

Concurrency rules (zarr 3.1 loses data otherwise): arrays are created once at their planned size; a shard is
written whole, in one call, by one writer; its done marker is written after it; readers trust only marked shards.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from dinofeat.cache import metadata
from dinofeat.cache.arrays import ArraySet, base_of
from dinofeat.cache.checksum import (
    RowCrcs,
    array_meta_checksum,
    column_checksums,
    crc32c,
    expected_checksums,
    mismatched_columns,
)
from dinofeat.cache.objects import Files, open_files
from dinofeat.cache.shardfile import (
    ShardLayout,
    check_array_doc,
    encode_shard,
    read_layout,
    shard_file_name,
    stored_chunk_checksums,
)
from dinofeat.cache.stats import ChannelStats
from dinofeat.errors import CacheConflictError, CacheFormatError, ConfigError
from dinofeat.extraction.plan import BucketPlan, Plan

# 2: incremental parts (bucket arrays "WxH_k"), index group named in metadata.index_group
# 3: crc32c per stored chunk (shard inner codec) recorded in done markers, crc32c per index column in the metadata,
#    `last_sealed` (the generation new readers get while an incremental run works)
# 4: a version 3 cache whose feature arrays are not only the last block of the image (--layers, --flip,
#    --no-layer-norm): `metadata.arrays` names them, and readers that do not know it (dinofeat <= 0.3) must refuse it
#    rather than serve block 4 as the model's output. Default caches stay version 3.
FORMAT_VERSION = 3
FEATURE_SETS_VERSION = 4
WRITABLE_VERSIONS = (FORMAT_VERSION, FEATURE_SETS_VERSION)
READABLE_VERSIONS = (1, 2, 3, 4)  # a version 1 cache is a version 2 cache with one part and its index in "index"
META_KEY = "dinofeat"
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
STATUS_PRUNED = 3  # done, then gone from the source and dropped with --prune: never served or counted again
# zarr 3.1 has no bfloat16: bf16 features are stored as their uint16 bit patterns (exact; see docs/format.md)
ZARR_DTYPES = {"fp16": "float16", "bf16": "uint16", "fp32": "float32"}
INDEX_COLUMNS = ("key", "bucket", "row", "src_w", "src_h", "distortion", "file_size", "mtime_ns")
SOURCE_COLUMNS = ("archive", "offset")  # tar shard sources only: metadata.source_archives[archive], byte offset
_ARRAY_CONFIG = {"write_empty_chunks": True}  # whole-shard writes, and ~2x faster sharded writes in zarr 3.1


def _np_dtype(store_dtype: str) -> np.dtype:
    return np.dtype(ZARR_DTYPES[store_dtype])


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact: bf16 is the top half of an fp32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _open_group(files: Files, mode: str) -> Any:
    """The zarr group at the cache's root: a local path, or zarr's FsspecStore over the cache's object prefix."""
    if files.remote:
        store = zarr.storage.FsspecStore.from_url(files.zarr_store(), read_only=mode == "r")
        return zarr.open_group(store, mode=mode)
    return zarr.open_group(files.zarr_store(), mode=mode)


class Store:
    """An open cache (a directory, or a prefix in an object store). Writers and readers both go through here for
    anything zarr-shaped; every other file goes through `files` (dinofeat.cache.objects)."""

    def __init__(self, path: str | os.PathLike[str] | Files, mode: str = "r") -> None:
        self.files = path if isinstance(path, Files) else open_files(path)
        self.path = self.files.location  # what messages name
        try:
            meta = json.loads(self.files.read("zarr.json")).get("attributes", {}).get(META_KEY)
        except FileNotFoundError:
            if not self.files.remote and not Path(self.files.root).is_dir():
                raise CacheFormatError(f"no dinofeat cache at {self.path} (no such folder)") from None
            raise CacheFormatError(f"{self.path} is not a dinofeat cache (no zarr.json)") from None
        except ValueError:
            raise CacheFormatError(f"{self.path}: zarr.json is not valid JSON (damaged)") from None
        self._mode = "r" if mode == "r" else "r+"
        self.root = _open_group(self.files, self._mode)
        if not isinstance(meta, dict):
            raise CacheFormatError(f"{self.path} is a zarr group without dinofeat metadata")
        version = meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CacheFormatError(
                f"{self.path} has cache format version {version}; this build reads versions "
                + ", ".join(map(str, READABLE_VERSIONS))
            )
        _refuse_damaged(self.path, meta)
        self._arrays: dict[tuple[str, str], Any] = {}
        self._layouts: dict[tuple[str, str], ShardLayout] = {}
        self._meta = meta
        self._generation = int(meta.get("generation", 0))
        self.format_version = int(version)

    # ---- creation -------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        meta: dict[str, Any],
        plan: Plan,
        hidden: int,
        registers: int,
        store_dtype: str,
    ) -> Store:
        """Arrays at their final size, the index, then state 'planned' last (a crash before that is detectable)."""
        files = open_files(path)
        root = _open_group(files, "w")
        root.attrs[META_KEY] = metadata.stamp(
            {
                **meta,
                "format_version": FORMAT_VERSION if _default_arrays(meta) else FEATURE_SETS_VERSION,
                "cache_id": uuid.uuid4().hex,  # readers tell a rebuilt cache from the one they opened
                "generation": 0,
                "state": "planning",
                "index_group": "index",
                "index_checksums": _write_index(root, "index", plan),
                "buckets": [bucket_record(b) for b in plan.buckets],
                "source_archives": list(plan.archives),
            }
        )
        names = ArraySet.from_meta(meta).names()
        _create_bucket_arrays(root, plan.buckets, hidden, registers, store_dtype, names)
        _write_probe_failures(files, plan)
        store = cls(files, mode="r+")
        store.update_meta(state="planned", array_checksums=_array_checksums(files, plan.buckets, names))
        return store

    def extend(self, plan: Plan, hidden: int, registers: int, store_dtype: str) -> None:
        """Add an incremental run's images. `plan` is the whole new plan (`extend_plan(old, part)`): its new
        buckets get arrays of their own and a new index group is written beside the old one; then one atomic
        metadata write switches to them. A crash before that switch leaves the cache exactly as it was (the
        leftovers are removed by `cleanup`); finished shards are never opened."""
        meta = self.meta
        known = {b["name"] for b in meta["buckets"]}
        new = [b for b in plan.buckets if b.name not in known]
        if [b.name for b in plan.buckets[: len(known)]] != [b["name"] for b in meta["buckets"]]:
            raise ValueError("an extension must keep the existing buckets first and unchanged")
        old_group = self._index_group
        group = f"index_{max(b.part for b in plan.buckets)}"
        sealed_group = (meta.get("last_sealed") or {}).get("index_group")
        if group == sealed_group:
            raise CacheConflictError(f"{self.path}: part {group} is the last sealed generation; it is never rewritten")
        # a crashed earlier attempt at this part: its index, bucket groups AND their done markers go together
        leftovers = [f"buckets/{b.name}" for b in new]
        leftovers += [f"_dinofeat/{kind}/{b.name}" for b in new for kind in ("done", "stats")]
        for stale in (group, *leftovers):
            self.files.delete_tree(stale)
        sums = _write_index(self.root, group, plan)
        names = self.arrays.names()
        _create_bucket_arrays(self.root, new, hidden, registers, store_dtype, names)
        _write_probe_failures(self.files, plan)  # keys not in the current index are ignored until the switch
        array_sums = meta.get("array_checksums")  # a cache made before 0.6 gets them for its new arrays only
        self.update_meta(
            array_checksums={**(array_sums or {}), **_array_checksums(self.files, new, names)},
            state="planned",
            index_group=group,
            index_checksums=sums,
            previous_index_group=old_group,
            num_images=len(plan),
            source_archives=list(plan.archives),
            buckets=[*meta["buckets"], *(bucket_record(b) for b in new)],
            parts=[*meta.get("parts", [{"part": 0}]), {"part": max(b.part for b in plan.buckets), "time": time.time()}],
        )
        self._arrays.clear()
        self._layouts.clear()
        self._drop_stale_index_groups()

    # ---- metadata -------------------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._meta)

    def _disk_meta(self) -> dict[str, Any]:
        return dict(json.loads(self.files.read("zarr.json"))["attributes"][META_KEY])

    def check_generation(self, disk: dict[str, Any] | None = None) -> dict[str, Any]:
        """The metadata on disk, if no other writer changed it since this store last read or wrote it."""
        disk = self._disk_meta() if disk is None else disk
        if int(disk.get("generation", 0)) != self._generation:
            raise CacheConflictError(
                f"{self.path} was changed by another run while this one worked (metadata generation "
                f"{disk.get('generation', 0)}, this run expected {self._generation}); this run's metadata update was "
                "not written, so the other run's work is kept. Rerun when no other run uses the cache"
            )
        return disk

    def update_meta(self, **changes: Any) -> None:
        """Compare-and-swap: apply `changes` to the metadata on disk (never to a stale copy in memory), only if
        it is still the generation this store knows, and count the generation up. The write itself is conditional
        on the version read (an object store's If-Match; locally the flock guards it), so two runs that both
        passed the generation check cannot both write."""
        raw, version = self.files.read_versioned("zarr.json")
        doc = json.loads(raw)
        disk = self.check_generation(dict(doc["attributes"][META_KEY]))
        _refuse_damaged(self.path, disk)  # never launder damaged metadata under fresh checksums
        new = metadata.stamp({**disk, **changes, "generation": self._generation + 1})
        doc["attributes"][META_KEY] = new
        if self.files.replace("zarr.json", json.dumps(doc, indent=2).encode(), version) is None:
            self.check_generation()  # names the other run's generation
            raise CacheConflictError(f"{self.path}: the metadata changed while this run wrote it; nothing was written")
        self._meta = new
        self._generation += 1

    # ---- plan and index -------------------------------------------------------------------------------------
    @property
    def _index_group(self) -> str:
        return str(self.meta.get("index_group", "index"))

    def index(self, generation: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """The index columns of the current plan, or of `generation` (a `last_sealed` record), checked against
        their recorded crc32c (format 3). `status` is checked only once sealed: a run writes it just before the
        metadata that vouches for it. If an incremental run switched the index since this store was opened and
        its group is gone, the metadata is read again and the current index is returned."""
        for attempt in (0, 1):
            meta = self.meta
            if generation is not None:
                group, sums = str(generation["index_group"]), dict(generation.get("index_checksums") or {})
            else:
                group, sums = str(meta.get("index_group", "index")), dict(meta.get("index_checksums") or {})
                if meta.get("state") != "sealed":
                    sums.pop("status", None)
            try:
                g = self.root[group]
                optional = [n for n in SOURCE_COLUMNS if n in sums or n in g]
                cols = {name: g[name][:] for name in (*INDEX_COLUMNS, "status", *optional)}
            except (KeyError, FileNotFoundError):
                if attempt or generation is not None:
                    raise CacheFormatError(
                        f"{self.path}: index group {group!r} or one of its columns is missing; the cache is damaged "
                        "(run `dinofeat validate`; rebuild with --overwrite)"
                    ) from None
                self.root = _open_group(self.files, self._mode)
                self._meta = self._disk_meta()
                self._generation = int(self._meta.get("generation", 0))
                self._arrays.clear()
                self._layouts.clear()
                continue
            except Exception as e:  # a damaged chunk or array metadata: zarr's crc32c codec, JSON, UTF-8 errors
                raise CacheFormatError(
                    f"{self.path}: index group {group!r} is damaged ({type(e).__name__}: {e}); run `dinofeat "
                    "validate`, rebuild with --overwrite"
                ) from None
            bad = mismatched_columns(cols, sums)
            if bad:
                raise CacheFormatError(
                    f"{self.path}: index column(s) {', '.join(f'{group}/{n}' for n in bad)} fail their checksum "
                    "(damaged, or a chunk is missing); the cache cannot be trusted: rebuild it with --overwrite"
                )
            return cols
        raise AssertionError("unreachable")

    def bucket_plans(self) -> tuple[BucketPlan, ...]:
        patch = int(self.meta["model"]["patch_size"])
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
            for b in self.meta["buckets"]
        )

    def write_source_names(self, renamed: dict[str, str]) -> None:
        """Keys whose file name is not the key (names that are not UTF-8), for ranks that read the plan instead of
        walking the folder."""
        self.files.write("_dinofeat/source_names.json", json.dumps(renamed, sort_keys=True).encode())

    def _read_json(self, rel: str, default: Any) -> Any:
        try:
            return json.loads(self.files.read(rel))
        except FileNotFoundError:
            return default

    def source_names(self) -> dict[str, str]:
        return self._read_json("_dinofeat/source_names.json", {})

    def probe_failures(self) -> dict[str, str]:
        return self._read_json("_dinofeat/probe_failures.json", {})

    def read_plan(self, ix: dict[str, np.ndarray] | None = None) -> Plan:
        """The plan as the index records it (`ix`: the index, when the caller has just read it)."""
        ix = self.index() if ix is None else ix
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
            archives=tuple(self.meta.get("source_archives") or ()),
        )

    # ---- features -------------------------------------------------------------------------------------------
    def array_checksum(self, bucket: str, name: str) -> int | None:
        """The recorded checksum of a feature array's zarr.json (None for caches made before 0.6)."""
        return metadata.array_checksum(self.meta, bucket, name)

    def array(self, bucket: str, name: str) -> Any:
        """A feature array through zarr-python, once its zarr.json has passed its checksum."""
        key = (bucket, name)
        if key not in self._arrays:
            rel = f"buckets/{bucket}/{name}"
            check_array_doc(rel, json.loads(self.files.read(f"{rel}/zarr.json")), self.array_checksum(bucket, name))
            self._arrays[key] = self.root[rel]
        return self._arrays[key]

    def has_array(self, bucket: str, name: str) -> bool:
        return self.files.exists(f"buckets/{bucket}/{name}/zarr.json")

    def layout(self, bucket: str, name: str) -> ShardLayout:
        """The shard layout of a feature array, from its zarr.json (read once)."""
        key = (bucket, name)
        if key not in self._layouts:
            self._layouts[key] = read_layout(f"buckets/{bucket}/{name}", self.files, self.array_checksum(bucket, name))
        return self._layouts[key]

    def write_shard(self, bucket: str, start: int, arrays: dict[str, np.ndarray]) -> int:
        """One whole shard object per array covering exactly the shard's rows, every row stored with its crc32c
        (`encode_shard`; zarr's writer would drop all-zero rows and all-failed shards). One atomic write each: a
        temp file, fsync and rename locally, one PUT on object storage. Returns bytes written."""
        written = 0
        for name, values in arrays.items():
            lay = self.layout(bucket, name)
            rows = lay.shard_shape[0]
            if start % rows or start + len(values) > lay.shape[0]:
                raise ValueError(f"{bucket}/{name}: rows {start}..{start + len(values)} are not one shard")
            self.files.write(shard_file_name(lay, start // rows), encode_shard(lay, values))
            written += values.nbytes
        return written

    def sync_shard(self, bucket: str, shard: int) -> None:
        """fsync a written shard's files and their directory entries: called before its done marker is written,
        so after a power cut no marker outlives its data."""
        for f in self.shard_files(bucket, shard):
            self.files.sync(f)

    def read_rows(self, bucket: str, name: str, start: int, stop: int) -> np.ndarray:
        return self.array(bucket, name)[start:stop]

    @property
    def arrays(self) -> ArraySet:
        return ArraySet.from_meta(self.meta)

    def array_names(self, bucket: str) -> list[str]:
        """The feature arrays of a bucket: those the metadata records (all are created with the bucket)."""
        recorded = self.meta.get("arrays")
        if recorded:
            return list(recorded["names"])
        return [n for n in ("cls", "patches", "registers") if self.has_array(bucket, n)]

    def shard_files(self, bucket: str, shard: int) -> list[str]:
        """The shard objects of one work unit, relative to the root (default chunk-key encoding: c/<shard>/0/...)."""
        out = []
        for name in self.array_names(bucket):
            ndim = len(self.array(bucket, name).shape)
            out.append("/".join(["buckets", bucket, name, "c", str(shard), *(["0"] * (ndim - 1))]))
        return out

    # ---- per-shard channel statistics (issue 14) ----------------------------------------------------------
    def stats_path(self, bucket: str, shard: int) -> str:
        return f"_dinofeat/stats/{bucket}/{shard}.npz"

    def write_stats(self, bucket: str, shard: int, stats: dict[str, ChannelStats]) -> int:
        """One shard's statistics, written (atomically, durably) before its done marker, which records the crc32c
        returned here."""
        arrays = {}
        for name, st in stats.items():
            arrays |= {f"{name}.count": np.int64(st.count), f"{name}.mean": st.mean, f"{name}.m2": st.m2}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.files.write(self.stats_path(bucket, shard), buf.getvalue())
        return crc32c(buf.getvalue())

    def read_stats(self, bucket: str, shard: int, expected: int | None = None) -> dict[str, ChannelStats] | None:
        """One shard's statistics; None if the file is missing, unreadable, or fails the crc32c its marker
        recorded (`expected`)."""
        try:
            data = self.files.read(self.stats_path(bucket, shard))
            if expected is not None and crc32c(data) != expected:
                return None
            with np.load(io.BytesIO(data)) as z:
                names = {k.split(".")[0] for k in z.files}
                return {n: ChannelStats(int(z[f"{n}.count"]), z[f"{n}.mean"], z[f"{n}.m2"]) for n in names}
        except (OSError, ValueError, KeyError):
            return None

    # ---- done markers ---------------------------------------------------------------------------------------
    def marker_path(self, bucket: str, shard: int) -> str:
        return f"_dinofeat/done/{bucket}/{shard}.json"

    def shard_checksums(self, bucket: str, shard: int) -> dict[str, list[int]]:
        """The crc32c of every chunk of a written shard, per array, as zarr stored them (-1: chunk not stored).
        Format 3 only; recorded in the done marker, so a reader also catches a chunk that is intact but is not the
        one written there (e.g. two shard files swapped)."""
        if self.format_version < 3:
            return {}
        rows = next(b.shard_rows for b in self.bucket_plans() if b.name == bucket)
        names = self.array_names(bucket)
        files = self.shard_files(bucket, shard)
        return {n: stored_chunk_checksums(self.files.open(f), rows) for n, f in zip(names, files, strict=True)}

    def write_marker(
        self,
        bucket: str,
        shard: int,
        start: int,
        stop: int,
        failed: dict[int, str],
        checksums: dict[str, list[int]] | None = None,
        stats_crc: int | None = None,
    ) -> None:
        body = {
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
        self.files.write(self.marker_path(bucket, shard), json.dumps(body).encode())

    def markers(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Every readable done marker. Remote markers are fetched 32 at a time (one GET each)."""
        wanted = []
        for rel in self.files.list("_dinofeat/done"):
            parts = rel.split("/")  # _dinofeat/done/<bucket>/<shard>.json
            if len(parts) == 4 and parts[3].endswith(".json") and parts[3][:-5].isdigit():
                wanted.append((parts[2], int(parts[3][:-5]), rel))

        def load(rel: str) -> dict[str, Any] | None:
            try:
                return json.loads(self.files.read(rel))
            except (OSError, ValueError):
                return None  # unreadable marker = shard not done; it will be redone

        rels = [w[2] for w in wanted]
        if self.files.remote and len(rels) > 1:
            with ThreadPoolExecutor(32) as ex:
                bodies = list(ex.map(load, rels))
        else:
            bodies = [load(r) for r in rels]
        return {(b, u): m for (b, u, _), m in zip(wanted, bodies, strict=True) if m is not None}

    def cleanup(self, shards: set[tuple[str, int]], orphans: bool = True) -> int:
        """Remove what a crash left in `shards` (pending shards this process owns): zarr's *.partial temp files,
        marker temp files and shard objects (they may be half-written). Other processes' shards are never touched.
        With `orphans`, also groups no metadata points to. Returns the number of files removed."""
        removed = 0
        names = {b.name for b in self.bucket_plans()}
        for bucket, u in sorted(shards):
            if bucket not in names:
                continue
            for f in self.shard_files(bucket, u):
                removed += self._remove_written(f)
            if not self.files.remote:  # an object store has no temp files: a PUT is whole or absent
                root = Path(self.path)
                for p in (root / self.marker_path(bucket, u)).parent.glob(f".{u}.json.*.tmp"):
                    p.unlink(missing_ok=True)
                    removed += 1
        if orphans:
            for d in self.orphan_groups():
                removed += self.files.delete_tree(d)
            if not self.files.remote:
                # temp files of metadata writes (zarr.json, index, failures) that a crash cut short
                root = Path(self.path)
                for pattern in ("*.partial", f"{self._index_group}/**/*.partial", "_dinofeat/.*.tmp"):
                    for p in root.glob(pattern):
                        p.unlink(missing_ok=True)
                        removed += 1
        return removed

    def _remove_written(self, rel: str) -> int:
        """Delete a shard object that may be half-written, and (locally) zarr's temp files for it."""
        removed = 0
        if not self.files.remote:
            f = Path(self.path) / rel
            for p in f.parent.glob(f"{f.name}.*.partial"):
                p.unlink(missing_ok=True)
                removed += 1
        if self.files.exists(rel):
            self.files.delete(rel)
            removed += 1
        return removed

    def _kept_index_groups(self) -> set[str]:
        """Index groups a reader may still load: the current one, the one it replaced (a reader that read the
        metadata just before a switch), the last sealed one (what new readers get while a run works) and the one
        that was last sealed before it (a reader that read the metadata just before this seal)."""
        meta = self.meta
        keep = {meta.get("index_group", "index"), meta.get("previous_index_group"), meta.get("previous_sealed_group")}
        keep.add((meta.get("last_sealed") or {}).get("index_group"))
        return {g for g in keep if g}

    def _drop_stale_index_groups(self) -> None:
        """Readers load an index once, at open: older groups than those kept are deleted (at most four stay)."""
        keep = self._kept_index_groups()
        for d in self.files.children(""):
            if d.startswith("index") and d not in keep:
                self.files.delete_tree(d)

    def orphan_groups(self) -> list[str]:
        """Bucket and index groups no metadata points to (paths relative to the root): what an incremental run
        that crashed before its metadata switch leaves behind."""
        planned = {b.name for b in self.bucket_plans()}
        out = [f"buckets/{d}" for d in self.files.children("buckets") if d not in planned]
        keep = self._kept_index_groups()
        out += [d for d in self.files.children("") if d.startswith("index") and d not in keep]
        return out

    def disk_state(self) -> str | None:
        return self._disk_meta().get("state")

    def seal(
        self,
        status: np.ndarray,
        failures: dict[str, str],
        channel_stats: dict[str, Any] | None = None,
        markers: dict[tuple[str, int], dict[str, Any]] | None = None,
        plan: Plan | None = None,
    ) -> None:
        """Write `status` and the failures, the marker summary (from `markers` when the caller has just read them),
        then the metadata that says sealed.

        Sealing a plan that was sealed before (after --repair or --prune) never rewrites the index readers hold:
        the status goes into a copy of the index (`plan`'s columns) that the same metadata write switches to."""
        disk = self._disk_meta()
        if disk.get("state") == "sealed" and disk.get("index_group") == self._index_group:
            return  # another rank of a manual split sealed this very plan first
        self.check_generation()  # another run's index switch is never overwritten with this run's status
        group, changes = self._index_group, {}
        before = (disk.get("last_sealed") or {}).get("index_group")
        sums = dict(disk.get("index_checksums") or {})
        if before == group:  # readers may be reading this group: seal a copy
            if plan is None:
                raise ValueError("resealing a sealed index needs the plan")
            group = f"index_r{self._generation + 1}"
            self.files.delete_tree(group)
            sums = _write_index(self.root, group, plan)
            changes = {"index_group": group, "previous_index_group": self._index_group}
        self.root[group]["status"][:] = status
        self.files.write("_dinofeat/failures.json", json.dumps(failures, sort_keys=True).encode())
        now = time.time()
        sums |= column_checksums({"status": status})
        summary = self.write_marker_summary(group, markers)
        last = {"index_group": group, "num_buckets": len(disk["buckets"]), "index_checksums": sums, "sealed_at": now}
        last["marker_summary"] = summary
        self.update_meta(
            **changes,
            state="sealed",
            sealed_at=now,
            index_checksums=sums,
            last_sealed=last,
            previous_sealed_group=before,
            channel_stats=channel_stats,
            marker_summary=summary,
        )
        self._drop_stale_index_groups()

    def write_marker_summary(
        self, group: str, markers: dict[tuple[str, int], dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """At seal: every done marker of the plan folded into one object (which shards are marked, and each row's
        recorded crc32c), so that a reader opens the cache with one read instead of one per shard (on object
        storage: one GET instead of a million). Returns its record for the metadata (path and crc32c)."""
        markers, plans = self.markers() if markers is None else markers, self.bucket_plans()
        arrays = {f"{b.name}::marked": np.array([(b.name, u) in markers for u in range(b.num_shards)]) for b in plans}
        arrays |= {f"{b}::{name}": crcs.to_int64() for (b, name), crcs in expected_checksums(markers, plans).items()}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        rel = f"_dinofeat/sealed/{group}.npz"
        self.files.write(rel, buf.getvalue())
        return {"path": rel, "crc32c": crc32c(buf.getvalue())}

    def marker_summary(
        self, record: dict[str, Any] | None
    ) -> tuple[set[tuple[str, int]], dict[tuple[str, str], RowCrcs]] | None:
        """(marked shards, expected row crcs) from the summary `record` names, checked against its crc32c; None if
        there is none (caches sealed before 0.5) or it is missing or damaged: the caller then reads every marker."""
        if not record:
            return None
        try:
            data = self.files.read(str(record["path"]))
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

    def pruned(self) -> set[str]:
        """Keys dropped with --prune (gone from the source): checked against the crc32c the metadata records."""
        record = self.meta.get("pruned")
        if not record:
            return set()
        try:
            data = self.files.read(str(record["path"]))
        except FileNotFoundError:
            raise CacheFormatError(f"{self.path}: {record['path']} is missing (damaged)") from None
        if crc32c(data) != int(record.get("crc32c", -1)):
            raise CacheFormatError(f"{self.path}: {record['path']} fails its checksum (damaged)")
        return set(json.loads(data))

    def write_pruned(self, keys: set[str]) -> None:
        """Record every pruned key (one file, its crc32c and count in the metadata)."""
        data = json.dumps(sorted(keys)).encode()
        rel = "_dinofeat/pruned.json"
        self.files.write(rel, data)
        self.update_meta(pruned={"path": rel, "crc32c": crc32c(data), "count": len(keys)})

    def failures(self) -> dict[str, str]:
        return self._read_json("_dinofeat/failures.json", {})

    def disk_bytes(self) -> int:
        return self.files.total_bytes()

    def iter_shards(self) -> Iterator[tuple[BucketPlan, int]]:
        for b in self.bucket_plans():
            for u in range(b.num_shards):
                yield b, u


def marker_status(
    plan: Plan, markers: dict[tuple[str, int], dict[str, Any]], pruned: set[str] | frozenset[str] = frozenset()
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
            status[positions[start:stop]] = STATUS_DONE
            for r, why in m["failed"].items():
                status[positions[int(r)]] = STATUS_FAILED
                failures[plan.keys[positions[int(r)]]] = why
    if pruned:
        gone = np.array([k in pruned for k in plan.keys], bool)
        status[gone] = STATUS_PRUNED
        failures = {k: why for k, why in failures.items() if k not in pruned}
    return status, failures


def merged_channel_stats(
    st: Store, plan: Plan, markers: dict[tuple[str, int], dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """Per-channel mean and std over every stored image: the merge of each shard's statistics, in plan order (so
    any split of the work gives the same numbers). Each shard's file is checked against the crc32c its marker
    recorded. None if a shard has none (written by dinofeat < 0.3) or its file is missing or damaged."""
    markers = st.markers() if markers is None else markers
    dim = int(st.meta["hidden_size"])
    merged: dict[str, ChannelStats] = {}
    for b in plan.buckets:
        for u in range(b.num_shards):
            crc = (markers.get((b.name, u)) or {}).get("stats_crc32c")
            part = st.read_stats(b.name, u, None if crc is None else int(crc))
            if part is None:
                return None
            for name, s in part.items():
                merged[name] = merged.get(name, ChannelStats.empty(dim)).merge(s)
    return {name: s.to_dict() for name, s in merged.items()}


def _refuse_damaged(path: str, meta: dict[str, Any]) -> None:
    """CacheFormatError naming every metadata field that fails its checksum or cannot be right."""
    bad = metadata.damage(meta)
    if bad:
        raise CacheFormatError(
            f"{path}: metadata field(s) {', '.join(bad)} fail their checksum (edited or damaged since written); the "
            "cache is refused rather than read wrongly. Restore zarr.json from a copy, or rebuild with --overwrite"
        )
    wrong = metadata.problems(meta)
    if wrong:
        raise CacheFormatError(
            f"{path}: damaged metadata: " + "; ".join(f"{f}: {why}" for f, why in wrong) + ". Restore zarr.json "
            "from a copy, or rebuild with --overwrite"
        )


def _array_checksums(files: Files, buckets: Any, names: list[str]) -> dict[str, int]:
    """{'buckets/<b>/<array>': checksum of its zarr.json's reader-relevant fields} for freshly created arrays."""
    out = {}
    for b in buckets:
        for name in names:
            rel = f"buckets/{b.name}/{name}"
            out[rel] = array_meta_checksum(json.loads(files.read(f"{rel}/zarr.json")))
    return out


def _default_arrays(meta: dict[str, Any]) -> bool:
    """The last block of the image, final norm applied (registers or not): what every version 3 reader expects."""
    a = ArraySet.from_meta(meta)
    return a.is_default(int(meta.get("model", {}).get("config", {}).get("num_hidden_layers", a.primary)))


def bucket_record(b: BucketPlan) -> dict[str, Any]:
    """A bucket's entry in metadata.buckets."""
    return {
        "name": b.name,
        "width": b.width,
        "height": b.height,
        "grid": list(b.grid),
        "rows": b.rows,
        "shard_rows": b.shard_rows,
        "part": b.part,
    } | ({"dit_size": list(b.dit)} if b.dit else {})


def _write_index(root: Any, group: str, plan: Plan) -> dict[str, int]:
    """Write the index columns (each chunk with zarr's crc32c codec); returns each column's crc32c for the
    metadata."""
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
    cols["status"] = np.zeros(n, np.int8)
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


def array_shape(name: str, rows: int, grid: tuple[int, int], hidden: int, registers: int) -> tuple[int, ...]:
    """Shape of a feature array by its token kind (see dinofeat.cache.arrays)."""
    h, w = grid
    return {"cls": (rows, hidden), "patches": (rows, h, w, hidden), "registers": (rows, registers, hidden)}[
        base_of(name)
    ]


def _create_bucket_arrays(
    root: Any, buckets: Any, hidden: int, registers: int, store_dtype: str, names: list[str]
) -> None:
    dtype = _np_dtype(store_dtype)
    for b in buckets:
        g = root.create_group(f"buckets/{b.name}")
        g.attrs.update(bucket_record(b))
        s = b.shard_rows
        for name in names:
            shape = array_shape(name, b.rows, b.grid, hidden, registers)
            g.create_array(
                name,
                shape=shape,
                dtype=dtype,
                chunks=(1, *shape[1:]),
                shards=(s, *shape[1:]),
                compressors=[Crc32cCodec()],  # inside the shard: a crc32c trailer per chunk (row)
                fill_value=0,
                config=_ARRAY_CONFIG,
            )


def _write_probe_failures(files: Files, plan: Plan) -> None:
    failures = {plan.keys[i]: r for i, r in plan.probe_errors.items()}
    files.write("_dinofeat/probe_failures.json", json.dumps(failures, sort_keys=True).encode())


def exists(path: str | os.PathLike[str]) -> bool:
    return open_files(path).exists("zarr.json")


def is_dinofeat_cache(files: Files) -> bool:
    try:
        attrs = json.loads(files.read("zarr.json")).get("attributes", {})
    except (OSError, ValueError):
        return False
    return isinstance(attrs.get(META_KEY), dict)


def occupied(path: str | os.PathLike[str]) -> bool:
    """Something (a cache or anything else) is at `path`."""
    files = open_files(path)
    if files.remote:
        return bool(files.children("")) or bool(files.list(""))
    p = Path(path)
    return p.exists() and any(p.iterdir())


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a cache (only if it is one, or is empty)."""
    files = open_files(path)
    if files.remote:
        if occupied(path) and not is_dinofeat_cache(files):
            raise ConfigError(f"refusing to delete {files.location}: it is not empty and not a dinofeat cache")
        files.delete_tree("")
        return
    p = Path(path)
    if not p.exists():
        return
    if not is_dinofeat_cache(files) and any(p.iterdir()):
        raise ConfigError(f"refusing to delete {p}: it is not empty and not a dinofeat cache")
    shutil.rmtree(p)


def retire(path: str | os.PathLike[str]) -> Path | None:
    """--overwrite: move a dinofeat cache aside (one rename) so that readers still holding it keep a consistent
    old generation; `purge_retired` deletes it once the new cache is sealed. Refuses anything that is not a
    dinofeat cache (a zarr store of someone else's, a folder of files) unless it is empty. An object store has no
    rename: a remote cache is deleted, and readers still holding it fail loudly (missing objects, or rows that fail
    the checksums their markers recorded) instead of keeping their generation (docs/format.md)."""
    files = open_files(path)
    if files.remote:
        remove(path)
        return None
    p = Path(path)
    if not p.exists():
        return None
    if not is_dinofeat_cache(files):
        remove(p)  # empty: fine; anything else: refused
        return None
    aside = p.with_name(f".{p.name}.retired-{os.getpid()}-{time.time_ns()}")
    os.rename(p, aside)
    return aside


def purge_retired(path: str | os.PathLike[str]) -> int:
    """Delete the generations `retire` moved aside. Returns how many."""
    if open_files(path).remote:
        return 0
    p = Path(path)
    old = list(p.parent.glob(f".{p.name}.retired-*"))
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return len(old)
