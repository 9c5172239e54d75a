"""Direct reads of zarr v3 `sharding_indexed` shards: one positioned read per chunk.

zarr-python 3.1 re-reads a shard's index on every `arr[i]` (3-4x slower than the disk allows). The format is
simple and standard: a shard object is its chunks' bytes followed by an index of (offset, nbytes) uint64 little-
endian pairs, one per inner chunk in C order, then a crc32c of the index. We cache each shard's index and read a
chunk with one `os.preadv`. Only the layouts dinofeat writes are accepted (uncompressed little-endian chunks, with
(format 3) or without (format 2) zarr's 4-byte crc32c trailer per chunk, index at the end); anything else raises,
and the caller falls back to zarr. No zarr import here. Files are read through dinofeat.cache.objects, so the same code
reads a local cache (one `preadv` per row) and a remote one (one ranged GET per row).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from dinofeat.cache.checksum import RowCrcs, array_meta_checksum, crc32c
from dinofeat.cache.objects import Blob, Files, LocalBlob, LocalFiles
from dinofeat.errors import CacheFormatError, ChecksumError

_EMPTY = 2**64 - 1
_DTYPES = {"float16": "<f2", "float32": "<f4", "uint16": "<u2", "bfloat16": "<u2"}


class UnsupportedLayout(CacheFormatError):
    """The array is valid zarr but not the layout the fast path reads."""


@dataclass(frozen=True)
class ShardLayout:
    """What the fast path needs from an array's zarr.json."""

    path: str  # the array's folder, relative to `files`
    shape: tuple[int, ...]
    shard_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    separator: str
    checksum: bool  # the shard index ends with its crc32c
    files: Files | None = None  # where the cache's files are (a directory, maybe pinned to one generation; a prefix)

    @cached_property  # read on every row: computed once
    def chunks_per_shard(self) -> int:
        return int(np.prod([s // c for s, c in zip(self.shard_shape, self.chunk_shape, strict=True)]))

    @cached_property
    def index_bytes(self) -> int:
        return self.chunks_per_shard * 16 + (4 if self.checksum else 0)

    chunk_crc: bool = False  # each chunk is followed by its crc32c (zarr's crc32c codec inside the shard)

    @cached_property
    def chunk_nbytes(self) -> int:
        """Bytes of one decoded row."""
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    @cached_property
    def stored_nbytes(self) -> int:
        """Bytes of one stored chunk: the row, plus its crc32c trailer in format 3."""
        return self.chunk_nbytes + (4 if self.chunk_crc else 0)


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def check_array_doc(where: str, doc: dict, expected: int | None) -> None:
    """ChecksumError unless the reader-relevant fields of an array's zarr.json match the checksum the cache's
    metadata recorded for it (`expected`; None: a cache made before 0.6, nothing to check)."""
    if expected is not None and array_meta_checksum(doc) != expected:
        raise ChecksumError(
            f"{where}/zarr.json fails its checksum: its shape, data type, chunk or shard shape, codecs or fill value "
            "are not those written (edited or damaged); restore the file from a copy, or rebuild with --overwrite"
        )


def _doc_checksum(raw: bytes) -> int | None:
    """The checksum of a zarr.json's reader-relevant fields; None when it is not JSON (damaged)."""
    try:
        return array_meta_checksum(json.loads(raw))
    except (ValueError, TypeError, AttributeError):
        return None


def read_layout(
    array_dir: str | os.PathLike[str], files: Files | None = None, expected: int | None = None
) -> ShardLayout:
    """Parse and check an array's zarr.json for the fast path (row-chunked: chunk = (1, *rest)). With `files`,
    `array_dir` is relative to its root, and so are the shard files read later; without, it is a local folder.
    `expected`: the checksum the cache's metadata recorded for this zarr.json (ChecksumError on a mismatch)."""
    if files is None:
        files, array_dir = LocalFiles(Path(array_dir)), ""
    array_dir = Path(array_dir).as_posix() if str(array_dir) else ""
    rel = _join(array_dir, "zarr.json")
    try:
        raw = files.read(rel) if expected is None else files.read_kept(rel, lambda b: _doc_checksum(b) == expected)
        meta = json.loads(raw)
    except ValueError:
        raise CacheFormatError(f"{array_dir}/zarr.json is not valid JSON (damaged)") from None
    check_array_doc(array_dir, meta, expected)
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        raise UnsupportedLayout(f"{array_dir}: not a sharded array")
    cfg = codecs[0]["configuration"]
    inner = cfg.get("codecs", [])
    inner_names = [c.get("name") for c in inner]
    if (
        inner_names not in (["bytes"], ["bytes", "crc32c"])
        or inner[0].get("configuration", {}).get("endian", "little") != "little"
    ):
        raise UnsupportedLayout(f"{array_dir}: chunks are compressed or not little-endian")
    index_codecs = [c.get("name") for c in cfg.get("index_codecs", [])]
    if index_codecs not in (["bytes"], ["bytes", "crc32c"]) or cfg.get("index_location", "end") != "end":
        raise UnsupportedLayout(f"{array_dir}: unexpected shard index encoding {index_codecs}")
    enc = meta.get("chunk_key_encoding", {})
    if enc.get("name") != "default":
        raise UnsupportedLayout(f"{array_dir}: chunk key encoding {enc.get('name')!r}")
    dtype = meta["data_type"]
    if dtype not in _DTYPES:
        raise UnsupportedLayout(f"{array_dir}: data type {dtype}")
    shape = tuple(meta["shape"])
    shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    chunk_shape = tuple(cfg["chunk_shape"])
    if chunk_shape[0] != 1 or chunk_shape[1:] != shape[1:] or shard_shape[1:] != shape[1:]:
        raise UnsupportedLayout(f"{array_dir}: chunks are not whole rows")
    return ShardLayout(
        array_dir,
        shape,
        shard_shape,
        chunk_shape,
        np.dtype(_DTYPES[dtype]),
        enc.get("configuration", {}).get("separator", "/"),
        index_codecs[-1] == "crc32c",
        files,
        inner_names[-1] == "crc32c",
    )


class _OpenShard:
    """An open shard (a Blob) and its parsed index. A local blob's fd closes when the last reference goes (CPython
    refcounting), so a thread still reading from a shard the pool just evicted never sees its fd closed or reused."""

    __slots__ = ("blob", "index")

    def __init__(self, blob: Blob, index: np.ndarray) -> None:
        self.blob, self.index = blob, index


class HandlePool:
    """An LRU of open shard files shared by every array of a cache: one fd budget for all buckets, so a cache of
    33 buckets x thousands of shards never runs into the process's open-file limit. Thread-safe."""

    def __init__(self, max_open: int = 128) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = max_open
        self._open: OrderedDict[Hashable, _OpenShard] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def __getstate__(self) -> dict[str, int]:
        """Open files and the lock stay in this process; a worker that unpickles the pool opens its own."""
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["max_open"])

    def get(self, key: Hashable, opener: Callable[[], _OpenShard]) -> _OpenShard:
        with self._lock:
            hit = self._open.get(key)
            if hit is not None:
                self._open.move_to_end(key)
                return hit
        shard = opener()
        with self._lock:
            hit = self._open.get(key)
            if hit is not None:  # another thread won the race; ours closes when it goes out of scope
                return hit
            self._open[key] = shard
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return shard

    def clear(self) -> None:
        with self._lock:
            self._open.clear()


READAHEAD_ROW_BYTES = 64 * 1024  # rows below this keep the kernel's readahead (see _open_shard)


def _open_shard(files: Files, path: str, index_bytes: int, chunks: int, verify: bool, row_bytes: int) -> _OpenShard:
    """Open a shard and read its index (one read at its end: a ranged GET on object stores)."""
    where = f"{files.location}/{path}" if files.remote else path
    try:
        blob = files.open(path)
    except FileNotFoundError as e:
        raise CacheFormatError(f"shard file missing: {where}") from e
    if row_bytes >= READAHEAD_ROW_BYTES and isinstance(blob, LocalBlob):
        # big rows (patch grids): one read fetches the row, readahead would only pull in rows nobody asked for.
        # Small rows (cls, registers) keep readahead: one disk read then serves their neighbours from page cache.
        blob.advise_random()
    if blob.size < index_bytes:
        raise CacheFormatError(f"shard file truncated: {where} ({blob.size} bytes)")
    raw = blob.read_at(blob.size - index_bytes, index_bytes)
    if verify and struct.unpack("<I", raw[-4:])[0] != crc32c(raw[:-4]):
        raise ChecksumError(f"shard index checksum mismatch: {where}")
    return _OpenShard(blob, np.frombuffer(raw[: chunks * 16], "<u8").reshape(-1, 2))


def shard_parts(layout: ShardLayout, values: np.ndarray) -> list[memoryview | bytes]:
    """One whole shard object in zarr v3's `sharding_indexed` format, as zarr reads it, in parts that point into
    `values` (no copy of a row): every row's bytes, each followed by its crc32c trailer when the layout has one, then
    the index of (offset, nbytes) pairs and its crc32c.

    Every row is stored, all-zero ones included: zarr's own writer drops a chunk that equals the fill value, and
    a shard whose rows are all fill values (every image of a rare bucket failed) not at all, which a reader cannot
    tell from a lost file. Here a row is either stored with its checksum or the shard is damaged. Rows past the
    array's end (the last shard of a bucket) are empty index entries, as zarr writes them."""
    n = len(values)
    rows = layout.shard_shape[0]
    if n > rows or tuple(values.shape[1:]) != tuple(layout.chunk_shape[1:]):
        raise ValueError(f"{layout.path}: {values.shape} does not fit a shard of {layout.shard_shape}")
    data = np.ascontiguousarray(values, dtype=layout.dtype).reshape(n, -1).view(np.uint8)  # a view when it can
    parts: list[memoryview | bytes] = []
    for row in data:
        parts.append(memoryview(row))
        if layout.chunk_crc:
            parts.append(struct.pack("<I", crc32c(row)))
    index = np.full((rows, 2), _EMPTY, "<u8")
    index[:n, 0] = np.arange(n, dtype=np.uint64) * np.uint64(layout.stored_nbytes)
    index[:n, 1] = layout.stored_nbytes
    tail = index.tobytes()
    if layout.checksum:
        tail += struct.pack("<I", crc32c(tail))
    return [*parts, tail]


def shard_file_name(layout: ShardLayout, shard: int) -> str:
    """The shard object of `shard`, relative to the cache root (default chunk-key encoding: c/<shard>/0/...)."""
    ndim = len(layout.shape)
    return _join(layout.path, layout.separator.join(["c", str(shard), *(["0"] * (ndim - 1))]))


def stored_chunk_checksums(blob: Blob, chunks: int) -> list[int]:
    """The crc32c trailers of a written format-3 shard's chunks, read back from the shard (-1: chunk not stored).
    The writer records them in the shard's done marker."""
    index = np.frombuffer(blob.read_at(blob.size - chunks * 16 - 4, chunks * 16), "<u8").reshape(-1, 2)
    stored = [(offset + nbytes - 4) for offset, nbytes in index.tolist() if offset != _EMPTY]
    trailers = iter(blob.read_ranges(stored, [4] * len(stored)))
    return [-1 if offset == _EMPTY else struct.unpack("<I", next(trailers))[0] for offset, _ in index.tolist()]


class ShardReader:
    """Row reads from one array. Thread-safe. File handles and parsed indexes live in a `HandlePool`, which a
    FeatureCache shares across all its arrays.

    With `verify` (format 3), every row read is checked: the crc32c of its bytes must equal the chunk's stored
    trailer and, when `expected` (per-row crcs from the done markers; -1 unknown) is given, the recorded crc; a
    mismatch raises ChecksumError. Shard indexes are checked when opened."""

    def __init__(
        self,
        layout: ShardLayout,
        pool: HandlePool | None = None,
        verify: bool = True,
        expected: RowCrcs | None = None,
    ) -> None:
        self.layout = layout
        self.verify = verify and layout.checksum
        self.verify_rows = verify and layout.chunk_crc
        self.expected = expected
        self.pool = pool if pool is not None else HandlePool(64)

    def shard_file(self, shard: int) -> str:
        return shard_file_name(self.layout, shard)

    def _handle(self, shard: int) -> _OpenShard:
        lay = self.layout
        assert lay.files is not None
        return self.pool.get(
            (id(lay.files), lay.path, shard),
            lambda: _open_shard(
                lay.files, self.shard_file(shard), lay.index_bytes, lay.chunks_per_shard, self.verify, lay.chunk_nbytes
            ),
        )

    def read_row(self, row: int) -> np.ndarray:
        """One row (one inner chunk) as a new, writable array of shape chunk_shape[1:], checked when `verify`."""
        if not 0 <= row < self.layout.shape[0]:
            raise IndexError(row)
        s = self.layout.shard_shape[0]
        shard = self._handle(row // s)
        offset, nbytes = (int(v) for v in shard.index[row % s])
        if offset == _EMPTY and nbytes == _EMPTY:
            if self.verify_rows and self.expected is not None and self.expected[row] >= 0:
                raise ChecksumError(f"{self.shard_file(row // s)}: chunk {row % s} was written but is not stored")
            return np.zeros(self.layout.chunk_shape[1:], self.layout.dtype)  # zarr's fill value
        if nbytes != self.layout.stored_nbytes:
            raise CacheFormatError(f"{self.shard_file(row // s)}: chunk {row % s} has {nbytes} bytes")
        out = np.empty(self.layout.chunk_shape[1:], self.layout.dtype)  # writable: torch.from_numpy needs no copy
        buffers = [memoryview(out).cast("B")]
        if self.layout.chunk_crc:
            trailer = bytearray(4)
            buffers.append(trailer)
        if shard.blob.readinto_at(buffers, offset) != nbytes:
            raise CacheFormatError(f"{self.shard_file(row // s)}: short read (truncated shard)")
        if self.verify_rows:
            self._check(row, out, int.from_bytes(trailer, "little"))
        return out

    def _check(self, row: int, out: np.ndarray, stored: int) -> None:
        """Raise ChecksumError unless crc32c(out) equals the chunk's stored trailer and the recorded crc."""
        got = crc32c(out)
        want = int(self.expected[row]) if self.expected is not None else -1
        if got != stored or (want >= 0 and stored != want):
            s = self.layout.shard_shape[0]
            what = "its bytes are damaged" if got != stored else "it is not the chunk written there (moved or stale)"
            raise ChecksumError(f"{self.shard_file(row // s)}: chunk {row % s} fails its crc32c: {what}")

    def close(self) -> None:
        self.pool.clear()
