"""Images inside parquet files (img2dataset's `--output_format parquet`, Hugging Face datasets' Image columns).

The only module that imports pyarrow (`pip install dinofeat[parquet]`), and only when a parquet source is used.

Layouts found by `image_column` from the schema alone:
- a binary column of encoded images: img2dataset names it after the format (`jpg`, `png`, `webp`);
- a struct with a binary `bytes` field: Hugging Face's `Image` feature (`image: {bytes, path}`);
- a string column of file paths (`path`, `file_name`, ...): the parquet is then a list file, read like one.
`?column=NAME` after the file or pattern picks a column when the schema holds several candidates.

Keys are `<file stem>/<key column>` when the file has a unique string `key` column (img2dataset), else
`<file stem>/<row number, 6+ digits>`: stable, since parquet files are written once.

Random access. A parquet value can only be read by decoding its row group's column chunk (pages are compressed and
values are length-prefixed; there is no offset per value). `read_row` therefore reads the image column of the row
group that holds a row and keeps the last few in a per-process LRU, so the images of one batch that share a row
group cost one read. Batches group images by bucket, not by row group, so a row group is read once per bucket that
has images in it: the read amplification is the number of distinct buckets per row group (measured in
docs/benchmarks.md). Both writers above write 100-row groups, which keeps that small.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinofeat.errors import ConfigError, ImageError, SourceChangedError
from dinofeat.filesystems import filesystem
from dinofeat.paths import is_url

BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
PATH_COLUMNS = ("path", "image_path", "file_path", "filepath", "file_name", "filename", "file")
KEY_COLUMN = "key"
CACHE_BYTES = 256 * 2**20  # per process: row groups of the image column kept for the next rows of a batch
OPEN_FILES = 64


@dataclass(frozen=True)
class ImageColumn:
    """Where a file's images are: `kind` is "bytes" (binary column), "struct" (HF Image: its `bytes` field) or
    "path" (file paths)."""

    name: str
    kind: str


def _pa() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # registers pyarrow.parquet
    except ImportError as e:
        raise ConfigError("parquet sources need pyarrow: pip install 'dinofeat[parquet]'") from e
    return pyarrow


def split_column(location: str) -> tuple[str, str | None]:
    """`data/x.parquet?column=jpg` -> (`data/x.parquet`, `jpg`); no suffix -> (location, None)."""
    path, sep, query = location.rpartition("?column=")
    if not sep:
        return location, None
    if not query or "/" in query:
        raise ConfigError(f"bad column selector in {location!r}: use FILE.parquet?column=NAME")
    return path, query


def with_column(path: str, column: str | None) -> str:
    return path if column is None else f"{path}?column={column}"


def image_column(fields: list[tuple[str, Any]], wanted: str | None = None) -> ImageColumn:
    """The column holding the images, from (name, pyarrow type) pairs. Known names first (in BYTES_COLUMNS order),
    then the only binary or Image-struct column; a path column only when there are no image bytes at all."""
    pa = _pa()

    def kind(t: Any) -> str | None:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return "bytes"
        if pa.types.is_struct(t):
            names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
            b = names.get("bytes")
            if b is not None and (pa.types.is_binary(b) or pa.types.is_large_binary(b)):
                return "struct"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "path"
        return None

    kinds = {name: kind(t) for name, t in fields}
    names = ", ".join(f"{n} ({t})" for n, t in fields)
    if wanted is not None:
        if kinds.get(wanted) is None:
            raise ConfigError(f"column {wanted!r} is not an image-bytes, Image or path column; columns: {names}")
        return ImageColumn(wanted, kinds[wanted])  # type: ignore[arg-type]
    images = [n for n, k in kinds.items() if k in ("bytes", "struct")]
    for n in BYTES_COLUMNS:
        if n in images:
            return ImageColumn(n, kinds[n])  # type: ignore[arg-type]
    if len(images) == 1:
        return ImageColumn(images[0], kinds[images[0]])  # type: ignore[arg-type]
    if len(images) > 1:
        raise ConfigError(f"several image columns ({', '.join(images)}); pick one with FILE.parquet?column=NAME")
    for n in PATH_COLUMNS:
        if kinds.get(n) == "path":
            return ImageColumn(n, "path")
    raise ConfigError(f"no column of image bytes or file paths; columns: {names}")


def row_keys(key_values: list[Any] | None, n: int) -> list[str]:
    """A file's sample keys: its `key` column when every value is a distinct non-empty string, else row numbers."""
    if (
        key_values is not None
        and len(key_values) == n
        and all(isinstance(k, str) and k and "/" not in k for k in key_values)
        and len(set(key_values)) == n
    ):
        return list(key_values)
    return [f"{i:06d}" for i in range(n)]


def schema_fields(path: str) -> list[tuple[str, Any]]:
    """(name, type) of a file's top-level columns, from its footer."""
    schema = _open(path).schema_arrow
    return [(f.name, f.type) for f in schema]


@dataclass(frozen=True)
class Listing:
    """One file's rows: keys in row order, the image column, and (path kind) the path of each row."""

    keys: list[str]
    column: ImageColumn
    paths: list[str | None] | None
    mtime_ns: int


def list_rows(location: str) -> Listing:
    """Keys of one parquet file (footer, plus the small `key` or path column; image bytes are not read)."""
    path, wanted = split_column(location)
    try:
        pf = _open(path)
        col = image_column([(f.name, f.type) for f in pf.schema_arrow], wanted)
        n = pf.metadata.num_rows
        names = pf.schema_arrow.names
        keys = row_keys(pf.read(columns=[KEY_COLUMN]).column(0).to_pylist() if KEY_COLUMN in names else None, n)
        paths = pf.read(columns=[col.name]).column(0).to_pylist() if col.kind == "path" else None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for files that are not parquet
        raise ConfigError(f"cannot read the parquet file {path}: {e}") from e
    return Listing(keys, col, paths, _mtime_ns(path))


def _mtime_ns(path: str) -> int:
    if not is_url(path):
        return os.stat(path).st_mtime_ns
    info = filesystem(path).info(path)
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if value is None:
        return 0
    return int(value.timestamp() * 1e9) if hasattr(value, "timestamp") else int(float(value) * 1e9)


# ---- reading rows ---------------------------------------------------------------------------------------------
class _Reader:
    """Per process: open files (footer parsed once) and an LRU of row groups' image columns. Threads share it (the
    prober runs 16); a row group being read by one thread is waited for, not read again, by the others."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: OrderedDict[str, tuple[Any, list[int], ImageColumn, int]] = OrderedDict()
        self.groups: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.group_bytes: dict[tuple[str, int], int] = {}
        self.loading: dict[tuple[str, int], threading.Event] = {}
        self.reads = 0  # row-group reads, for the amplification benchmark
        self.bytes_read = 0
        self.file_locks: dict[str, threading.Lock] = {}

    def file(self, location: str, mtime_ns: int | None = None) -> tuple[Any, list[int], ImageColumn]:
        """The open file, its row groups' first rows and its image column. `mtime_ns`: the file's modification time
        when it was listed; what this process holds of a file modified since (rewritten between two runs in one
        process) is dropped, and a file that differs from its listing raises SourceChangedError."""
        with self.lock:
            entry = self.files.get(location)
            if entry is not None and (mtime_ns is None or entry[3] == mtime_ns):
                self.files.move_to_end(location)
                return entry[:3]
            if entry is not None:
                self._forget(location)
        path, wanted = split_column(location)
        now = _mtime_ns(path)
        if mtime_ns is not None and now not in (0, mtime_ns):
            raise SourceChangedError(
                f"{path} changed since it was listed; rerun the same command (the source is listed again)"
            )
        pf = _open(path)
        col = image_column([(f.name, f.type) for f in pf.schema_arrow], wanted)
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        with self.lock:
            self.files[location] = (pf, starts, col, now)
            while len(self.files) > OPEN_FILES:
                self._forget(next(iter(self.files)))
        return pf, starts, col

    def _forget(self, location: str) -> None:
        """Drop a file and its cached row groups (the lock is held)."""
        self.files.pop(location, None)
        for key in [k for k in self.groups if k[0] == location]:
            del self.groups[key]
            del self.group_bytes[key]

    def _file_lock(self, location: str) -> Any:
        """One ParquetFile is not safe to read from two threads at once: local or remote, two row groups read
        together sometimes fail inside pyarrow ("ReadRangeCache did not find matching cache entry", seen under load
        with the prober's 16 threads, a good image then recorded as failed), and a remote file is one fsspec file
        object whose position two readers race on. So the reads of one file take turns; other files go on."""
        with self.lock:
            return self.file_locks.setdefault(location, threading.Lock())

    def group(self, location: str, g: int) -> Any:
        key = (location, g)
        while True:
            with self.lock:
                if key in self.groups:
                    self.groups.move_to_end(key)
                    return self.groups[key]
                event = self.loading.get(key)
                if event is None:
                    self.loading[key] = threading.Event()
                    break
            event.wait()
        try:
            pf, _, col = self.file(location)
            with self._file_lock(location):
                values = pf.read_row_group(g, columns=[col.name], use_threads=False).column(0)  # not combined: no copy
            if col.kind == "struct":  # flatten: a null Image row reads as null bytes whatever its child holds
                values = values.flatten()[values.type.get_field_index("bytes")]
            with self.lock:
                self.groups[key] = values
                self.group_bytes[key] = values.nbytes
                self.reads += 1
                self.bytes_read += values.nbytes
                while len(self.groups) > 2 and sum(self.group_bytes.values()) > CACHE_BYTES:
                    old, _ = self.groups.popitem(last=False)
                    del self.group_bytes[old]
            return values
        finally:
            with self.lock:
                self.loading.pop(key).set()


_reader = _Reader()


def _reset_after_fork() -> None:
    """A forked decode worker starts with no open files and no locks another thread of the parent might hold."""
    global _reader
    _reader = _Reader()


os.register_at_fork(after_in_child=_reset_after_fork)


def read_row(location: str, row: int, mtime_ns: int | None = None) -> bytes:
    """The image bytes of one row (`location` is the file, with its `?column=` if any; `mtime_ns` its modification
    time when listed, so that nothing read from an older version of the file is served)."""
    try:
        _, starts, col = _reader.file(location, mtime_ns)
        if not 0 <= row < starts[-1]:
            raise OSError(f"row {row} is past the end ({starts[-1]} rows): the file changed since planning")
        g = bisect.bisect_right(starts, row) - 1
        value = _reader.group(location, g)[row - starts[g]].as_py()
    except ConfigError as e:
        raise OSError(str(e)) from e
    if value is None:
        raise ImageError(f"no image bytes in column {col.name!r} (null)")
    if not value:
        raise ImageError("empty file")
    return value


def reader_stats() -> tuple[int, int]:
    """(row-group reads, bytes read) by this process: what the amplification benchmark divides by."""
    return _reader.reads, _reader.bytes_read


def _open(path: str) -> Any:
    pa = _pa()
    if is_url(path):
        return pa.parquet.ParquetFile(filesystem(path).open(path, "rb", cache_type="none"))
    return pa.parquet.ParquetFile(path)


def listing_root(files: list[str]) -> Path:
    """Path-column parquet: keys are paths relative to the first file's folder, as a list file's are to its own."""
    return Path(split_column(files[0])[0]).resolve().parent
