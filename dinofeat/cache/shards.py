"""The feature arrays and their shard objects: created once at their planned size, written one whole shard at a
time (every row stored with its crc32c, dinofeat.cache.shardfile), each array's zarr.json checked against the
checksum the metadata records before it is used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.codecs import Crc32cCodec

from dinofeat.cache import metadata
from dinofeat.cache.arrays import ndim_of
from dinofeat.cache.checksum import array_meta_checksum
from dinofeat.cache.layout import ARRAY_CONFIG, array_shape, bucket_record, np_dtype
from dinofeat.cache.objects import Files
from dinofeat.cache.shardfile import (
    ShardLayout,
    check_array_doc,
    read_layout,
    shard_file_name,
    shard_parts,
    stored_chunk_checksums,
)

if TYPE_CHECKING:
    from dinofeat.cache.store import Store


def create_arrays(root: Any, buckets: Any, hidden: int, registers: int, store_dtype: str, names: list[str]) -> None:
    """Every feature array of `buckets` at its final size: one chunk per row (with a crc32c trailer), one shard per
    work unit."""
    dtype = np_dtype(store_dtype)
    for b in buckets:
        g = root.create_group(f"buckets/{b.name}")
        g.attrs.update(bucket_record(b))
        for name in names:
            shape = array_shape(name, b.rows, b.grid, hidden, registers)
            g.create_array(
                name,
                shape=shape,
                dtype=dtype,
                chunks=(1, *shape[1:]),
                shards=(b.shard_rows, *shape[1:]),
                compressors=[Crc32cCodec()],  # inside the shard: a crc32c trailer per chunk (row)
                fill_value=0,
                config=ARRAY_CONFIG,
            )


def array_checksums(files: Files, buckets: Any, names: list[str]) -> dict[str, int]:
    """{'buckets/<b>/<array>': checksum of its zarr.json's reader-relevant fields} for freshly created arrays."""
    out = {}
    for b in buckets:
        for name in names:
            rel = f"buckets/{b.name}/{name}"
            out[rel] = array_meta_checksum(json.loads(files.read(f"{rel}/zarr.json")))
    return out


class Shards:
    """The feature arrays of an open cache."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._arrays: dict[tuple[str, str], Any] = {}
        self._layouts: dict[tuple[str, str], ShardLayout] = {}

    def forget(self) -> None:
        """Drop what was read of the arrays (after the metadata switched to other arrays)."""
        self._arrays.clear()
        self._layouts.clear()

    def array_checksum(self, bucket: str, name: str) -> int | None:
        """The recorded checksum of a feature array's zarr.json (None for caches made before 0.6)."""
        return metadata.array_checksum(self.store.meta, bucket, name)

    def array(self, bucket: str, name: str) -> Any:
        """A feature array through zarr-python, once its zarr.json has passed its checksum."""
        key = (bucket, name)
        if key not in self._arrays:
            rel = f"buckets/{bucket}/{name}"
            doc = json.loads(self.store.files.read(f"{rel}/zarr.json"))
            check_array_doc(rel, doc, self.array_checksum(bucket, name))
            self._arrays[key] = self.store.root[rel]
        return self._arrays[key]

    def has_array(self, bucket: str, name: str) -> bool:
        return self.store.files.exists(f"buckets/{bucket}/{name}/zarr.json")

    def layout(self, bucket: str, name: str) -> ShardLayout:
        """The shard layout of a feature array, from its zarr.json (read once, checked)."""
        key = (bucket, name)
        if key not in self._layouts:
            rel = f"buckets/{bucket}/{name}"
            self._layouts[key] = read_layout(rel, self.store.files, self.array_checksum(bucket, name))
        return self._layouts[key]

    def names(self, bucket: str) -> list[str]:
        """The feature arrays of a bucket: those the metadata records (all are created with the bucket)."""
        recorded = self.store.meta.get("arrays")
        if recorded:
            return list(recorded["names"])
        return [n for n in ("cls", "patches", "registers") if self.has_array(bucket, n)]

    def write(self, bucket: str, start: int, arrays: dict[str, np.ndarray]) -> int:
        """One whole shard object per array covering exactly the shard's rows, every row stored with its crc32c
        (`shard_parts`; zarr's writer would drop all-zero rows and all-failed shards). One atomic write each: a
        temp file written from the rows in place, fsync and rename locally, one PUT on object storage. Returns bytes
        written."""
        written = 0
        for name, values in arrays.items():
            lay = self.layout(bucket, name)
            rows = lay.shard_shape[0]
            if start % rows or start + len(values) > lay.shape[0]:
                raise ValueError(f"{bucket}/{name}: rows {start}..{start + len(values)} are not one shard")
            self.store.files.write_parts(shard_file_name(lay, start // rows), shard_parts(lay, values))
            written += values.nbytes
        return written

    def sync(self, bucket: str, shard: int) -> None:
        """fsync a written shard's files and their directory entries: called before its done marker is written,
        so after a power cut no marker outlives its data."""
        for f in self.files(bucket, shard):
            self.store.files.sync(f)

    def read_rows(self, bucket: str, name: str, start: int, stop: int) -> np.ndarray:
        return self.array(bucket, name)[start:stop]

    def files(self, bucket: str, shard: int) -> list[str]:
        """The shard objects of one work unit, relative to the root (default chunk-key encoding: c/<shard>/0/...).
        The number of dimensions comes from the array's kind, not its zarr.json: cleanup works on a damaged cache."""
        out = []
        for name in self.names(bucket):
            ndim = ndim_of(name)
            out.append("/".join(["buckets", bucket, name, "c", str(shard), *(["0"] * (ndim - 1))]))
        return out

    def checksums(self, bucket: str, shard: int) -> dict[str, list[int]]:
        """The crc32c of every chunk of a written shard, per array, as stored (-1: chunk not stored). Format 3 only;
        recorded in the done marker, so a reader also catches a chunk that is intact but is not the one written there
        (e.g. two shard files swapped)."""
        if self.store.format_version < 3:
            return {}
        rows = next(b.shard_rows for b in self.store.index.bucket_plans() if b.name == bucket)
        names, files = self.names(bucket), self.files(bucket, shard)
        return {n: stored_chunk_checksums(self.store.files.open(f), rows) for n, f in zip(names, files, strict=True)}

    def remove_written(self, rel: str) -> int:
        """Delete a shard object that may be half-written, and (locally) zarr's temp files for it."""
        removed, files = 0, self.store.files
        if not files.remote:
            f = Path(self.store.path) / rel
            for p in f.parent.glob(f"{f.name}.*.partial"):
                p.unlink(missing_ok=True)
                removed += 1
        if files.exists(rel):
            files.delete(rel)
            removed += 1
        return removed
