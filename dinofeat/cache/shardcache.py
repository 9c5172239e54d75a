"""A local folder of whole shards fetched from object storage, shared by every process that reads the same cache,
optionally capped in size.

Why a cap: a 200 TB cache read from S3 through a 7 TB NVMe must not fill the disk days into training. With
`max_bytes`, every fetch first opens its own copy, then removes the least recently used shards (oldest mtime;
a hit sets the mtime) until the folder fits. Removing a shard another process has open is safe (POSIX keeps the
bytes until its descriptor closes); that process fetches it again only if it reopens it. The shard just fetched
is never removed, so a cap below one shard still works, one shard at a time.

The folder is scanned at every fetch (one `scandir` per directory), not tracked, so that several processes and
several caches sharing the folder all count. A fetch is a whole shard (~128 MiB), so the scan is small beside it.

Later epochs need no store at all once every shard is here: the small files a reader needs besides shards (each
feature array's zarr.json) are kept in `<root>/.meta/<cache_id>/` once fetched, and served from there while they
pass the checksum the cache's metadata records for them (never evicted, not counted: a few KB per array); the
metadata a reader opened last from a location is kept in `<root>/.meta/locations/` (checked against its own field
checksums), so that DataLoader workers check the cache was not rebuilt without asking the store.

Why `fetch` writes into a path rather than returning bytes: a shard held in memory whole costs its size two or
three times over at the fetch's peak (s3fs `cat_file`: +384 MiB RSS for 128 MiB), in every DataLoader worker and
fetch thread at once; streamed into the temp file it costs a few network buffers (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dinofeat.cache import metadata
from dinofeat.cache.checksum import META_CHECKSUMS

_LOCKS = tuple(threading.Lock() for _ in range(64))  # striped: bounded memory for millions of shards
STALE_TMP_S = 3600  # a temp file this old was left by a process that died mid-fetch (a live one writes to it)
META = ".meta"  # under the root: kept metadata, beside the caches' shard folders (named by cache_id)

Fetch = Callable[[Path], None]
"""Writes one whole shard into the given path (a new temp file, created by the fetch); raises if it cannot."""


class ShardCache:
    """`open(rel, fetch)` -> a read-only fd of `subdir/rel` under `root`, fetched with `fetch(temp path)` when
    absent."""

    def __init__(self, root: Path, subdir: str, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.dir = self.root / subdir
        self.meta_dir = self.root / META / subdir
        self.max_bytes = max_bytes
        self._clock = 0
        self.fetches = 0
        self.evicted = 0

    def open(self, rel: str, fetch: Fetch) -> int:
        """One fetch per shard per process (threads wanting the same shard wait for it); processes racing each
        rename a complete copy of the same bytes. A fetch that raises leaves no temp file behind.

        The descriptor returned is opened before the shard can be evicted: a hit opens the file first (a removal
        after that leaves the bytes to the descriptor; a removal before it is a miss), and a fetch opens its temp
        file before renaming it into place, because another process's (or thread's) eviction may remove the new
        name the moment it exists."""
        path = self.dir / rel
        with _LOCKS[hash(str(path)) % len(_LOCKS)]:
            fd = _open_if_present(path)
            if fd >= 0:
                if self.max_bytes is not None:
                    self._touch(path)
                return fd
            fd = self._fetch(path, fetch)
        if self.max_bytes is not None:
            self.evict(keep=path)
        return fd

    def _fetch(self, path: Path, fetch: Fetch) -> int:
        """Fetch into a temp file, open it, then rename it into place; returns the open descriptor."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = -1
        try:
            fetch(tmp)
            self._touch(tmp)
            fd = os.open(tmp, os.O_RDONLY)  # ours whatever happens to the name from here on
            os.replace(tmp, path)  # readers see no shard or a whole one
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _unlink(tmp)  # a partial download, never renamed into place
            raise
        self.fetches += 1
        return fd

    def kept(self, rel: str, fetch: Callable[[], bytes], valid: Callable[[bytes], bool]) -> bytes:
        """A small file of the cache (an array's zarr.json): the local copy while it passes `valid` (the checksum the
        cache's metadata records for it), else `fetch()`ed from the store and kept when it is valid. What is
        returned is checked by the caller as ever: a damaged file in the store is refused, never kept."""
        path = self.meta_dir / rel
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            data = path.read_bytes()
            if valid(data):
                return data
        data = fetch()
        if valid(data):
            _write_whole(path, data)
        return data

    def _touch(self, path: Path) -> None:
        """mtime = now, strictly after this process's previous touch (coarse filesystem clocks tie otherwise)."""
        self._clock = max(time.time_ns(), self._clock + 1)
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: fetched again when next opened
            os.utime(path, ns=(self._clock, self._clock))

    def files(self) -> list[tuple[int, int, Path]]:
        """(mtime_ns, size, path) of every complete shard under the root (all caches sharing it); stale temp files
        of dead fetches are removed on the way."""
        out: list[tuple[int, int, Path]] = []
        stack = [self.root]
        now = time.time()
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except FileNotFoundError:
                continue
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        if e.name != META:  # kept metadata is no shard: never evicted
                            stack.append(Path(e.path))
                        continue
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if e.name.startswith(".") and e.name.endswith(".tmp"):
                    if now - st.st_mtime > STALE_TMP_S:
                        _unlink(Path(e.path))
                    continue
                out.append((st.st_mtime_ns, st.st_size, Path(e.path)))
        return out

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used shards until the folder fits `max_bytes`; returns how many."""
        if self.max_bytes is None:
            return 0
        files = sorted(self.files())
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, path in files:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            _unlink(path)
            total -= size
            removed += 1
        self.evicted += removed
        return removed


def _location_path(root: Path, location: str) -> Path:
    return Path(root) / META / "locations" / f"{hashlib.sha256(location.encode()).hexdigest()[:32]}.json"


def keep_metadata(root: Path, location: str, meta: dict[str, Any]) -> None:
    """Keep the metadata a reader just opened from `location` (refreshed by every open)."""
    _write_whole(_location_path(root, location), json.dumps({"location": location, "metadata": meta}).encode())


def kept_metadata(root: Path, location: str) -> dict[str, Any] | None:
    """The metadata a reader last opened from `location`, if it is kept and passes its field checksums (a cache
    without them, written before 0.6, is never served from a copy)."""
    try:
        doc = json.loads(_location_path(root, location).read_bytes())
        meta = doc["metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if doc.get("location") != location or META_CHECKSUMS not in meta or metadata.damage(meta):
        return None
    return dict(meta)


def _write_whole(path: Path, data: bytes) -> None:
    """Replace `path` atomically (a temp file renamed into place): readers see the old bytes or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _open_if_present(path: Path) -> int:
    """A read-only descriptor of `path`, or -1 when it is absent (never fetched, or evicted)."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return -1


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):  # another process evicted it first
        path.unlink()
