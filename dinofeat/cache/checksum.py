"""crc32c, the checksum zarr v3's `crc32c` codec uses, over numpy arrays and index columns (no zarr import).

Chunks carry their crc32c as a 4-byte little-endian trailer (the codec's format); done markers record each chunk's
crc so that a chunk moved to another place (two shard files swapped) fails too; index columns have one crc each in
the metadata, so a missing chunk (which zarr silently reads as fill values) fails as well."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from dinofeat.keys import PackedKeys, byte_sources, pack


def crc32c(data: np.ndarray | bytes) -> int:
    """crc32c of an array's bytes (C order), without copying a contiguous array."""
    if isinstance(data, bytes):
        return int(google_crc32c.value(data))
    view = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    view.flags.writeable = False  # google_crc32c takes read-only buffers only
    return int(google_crc32c.value(view))


def keys_checksum(keys: Sequence[str] | np.ndarray) -> int:
    """crc32c of the key column: NUL-separated UTF-8 (NUL cannot occur in a file name). Packed keys are already
    that UTF-8: the separators are put between their bytes, no key is decoded."""
    if isinstance(keys, PackedKeys):
        n, data = len(keys), keys.data
        if n == 0:
            return crc32c(b"")
        joined = np.zeros(len(data) + n - 1, np.uint8)  # NULs where no byte of a key goes
        lengths = np.diff(keys.offsets)
        for a in range(0, n, 8192):  # a block of keys at a time: index arrays of one block's bytes
            b = min(a + 8192, n)
            first = keys.offsets[a:b] + np.arange(a, b)  # key i's first byte, after the i NULs before it
            joined[byte_sources(first, lengths[a:b])] = data[keys.offsets[a] : keys.offsets[b]]
        return crc32c(joined)
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "TU" and len(keys):
        return keys_checksum(pack(keys, presorted=True))  # no str object per key
    return crc32c("\0".join(str(k) for k in keys).encode("utf-8", "surrogatepass"))


def column_checksum(name: str, values: np.ndarray) -> int:
    """The checksum recorded for one index column."""
    if name == "key":
        return keys_checksum(values)
    return crc32c(np.asarray(values))


def column_checksums(columns: dict[str, np.ndarray]) -> dict[str, int]:
    return {name: column_checksum(name, v) for name, v in columns.items()}


def mismatched_columns(columns: dict[str, np.ndarray], recorded: dict[str, int]) -> list[str]:
    """Names of recorded columns whose values no longer match their checksum (or are missing)."""
    return [n for n, want in recorded.items() if n not in columns or column_checksum(n, columns[n]) != int(want)]


@dataclass(frozen=True)
class RowCrcs:
    """The crc32c each row's done marker recorded, for one array of one bucket. A reader holds one per array for
    every row it serves, so it is 4 bytes a row (uint32) plus the few rows with none recorded, kept sorted: about
    half of an int64 column with a -1 sentinel (2.4 GB -> 1.2 GB at 100M rows x 3 arrays). A row has none when its
    chunk was empty when written (zarr stores no all-zero chunk) or its shard's marker predates format 3.
    `crcs[row]` is the crc, or -1 where none was recorded."""

    values: np.ndarray  # uint32 [rows]
    missing: np.ndarray  # int64, sorted: rows without a recorded crc

    def __getitem__(self, row: int) -> int:
        """Called for every row read: a plain index when every row has its crc (the usual case)."""
        if self.missing.size:
            i = int(np.searchsorted(self.missing, row))
            if i < self.missing.size and self.missing[i] == row:
                return -1
        return int(self.values[row])

    def to_int64(self) -> np.ndarray:
        """The marker summary's stored form: int64 with -1 where none was recorded (unchanged since 0.5)."""
        out = self.values.astype(np.int64)
        out[self.missing] = -1
        return out

    @classmethod
    def from_int64(cls, column: np.ndarray) -> RowCrcs:
        column = np.asarray(column, np.int64)
        missing = np.flatnonzero(column < 0).astype(np.int64)
        return cls(np.where(column >= 0, column, 0).astype(np.uint32), missing)


def expected_checksums(markers: Mapping[tuple[str, int], Any], plans: Sequence[Any]) -> dict[tuple[str, str], RowCrcs]:
    """Per (bucket, array): the crc32c each row's done marker recorded."""
    columns: dict[tuple[str, str], np.ndarray] = {}
    for bp in plans:
        for u in range(bp.num_shards):
            sums = markers.get((bp.name, u), {}).get("crc32c") or {}
            s0, s1 = bp.shard_range(u)
            for name, crcs in sums.items():
                arr = columns.setdefault((bp.name, name), np.full(bp.rows, -1, np.int64))
                arr[s0:s1] = np.asarray(crcs, np.int64)[: s1 - s0]
    return {k: RowCrcs.from_int64(v) for k, v in columns.items()}


# ---- metadata (issue 22): the cache's own description is checked like its data -----------------------------------
META_CHECKSUMS = "meta_checksums"  # {field: crc32c of its canonical JSON} over every other dinofeat metadata field
# the fields of an array's zarr.json that decide what its bytes mean: a reader relies on every one of them
ARRAY_FIELDS = (
    "zarr_format",
    "node_type",
    "shape",
    "data_type",
    "chunk_grid",
    "chunk_key_encoding",
    "fill_value",
    "codecs",
    "dimension_names",
)


def json_checksum(value: Any) -> int:
    """crc32c of a JSON value's canonical form (sorted keys, no spaces): the same for a value and its round trip."""
    return crc32c(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def meta_checksums(meta: Mapping[str, Any]) -> dict[str, int]:
    """One crc32c per metadata field, so a mismatch names the field that changed."""
    return {k: json_checksum(v) for k, v in sorted(meta.items()) if k != META_CHECKSUMS}


def meta_mismatches(meta: Mapping[str, Any]) -> list[str]:
    """Fields whose value no longer matches its recorded checksum, recorded fields that are gone, and fields that
    were added without one ([] when `meta` carries no checksums: the caller decides whether it must)."""
    recorded = meta.get(META_CHECKSUMS)
    if not isinstance(recorded, dict):
        return [] if recorded is None else [META_CHECKSUMS]
    now = meta_checksums(meta)
    out = [k for k, crc in recorded.items() if k not in now or now[k] != crc]
    return sorted(out + [k for k in now if k not in recorded])


def array_meta_checksum(doc: Mapping[str, Any]) -> int:
    """crc32c of the fields of an array's zarr.json that a reader relies on (shape, dtype, chunk and shard shape,
    codecs, fill value); attributes and other fields are left out."""
    return json_checksum({k: doc[k] for k in ARRAY_FIELDS if k in doc})
