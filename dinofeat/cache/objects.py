"""Where a cache's files live: a local directory, or a prefix in an object store (s3://, gs://, az://, any fsspec
URL). Remote access goes through fsspec here and through zarr's own FsspecStore in dinofeat.cache.store.

Everything the cache does to its files goes through `Files`: whole-object reads and writes (a local write is a
temp file, fsync and rename; a remote one is one PUT, atomic by nature), conditional writes (a lock that only one
run can create, a metadata update that fails if another run changed it since it was read), listing, deletion,
and `open` for positioned reads of shards (local: one `preadv`; remote: one ranged GET).

Why fsspec (s3fs) and not obstore, measured against the same S3 server (benchmarks/s3_clients.py,
docs/benchmarks.md): obstore is faster per request (small objects 3.7 vs 13.5 ms, 2 KB ranged GETs 4.1 vs 6.8 ms,
576 KB ones 26.4 vs 29.2 ms; s3fs PUTs 36 MB shards faster, 133 vs 115 MB/s), but it is not fork-safe: once a
process has used it, a forked child's requests hang forever (its tokio runtime's threads do not survive the fork),
and torch's DataLoader forks its workers by default on Linux. A reader that hangs training is worse than one
that is slower per request, and the request latency that matters on real S3 is the service's (tens of ms), which
both share; throughput comes from concurrency (`FeatureDataset.fetch_threads`). fsspec also reaches every store it has a
filesystem for (gcsfs, adlfs, ...). Credentials come from each filesystem's usual environment and config (for s3fs:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws, AWS_ENDPOINT_URL for
S3-compatible servers, instance roles); dinofeat never stores or prints them. Conditional writes are S3's
(If-None-Match, If-Match) and GCS's (ifGenerationMatch, dinofeat.cache.gcs); on other stores they are a check
followed by a write (not atomic). Tested: s3:// and gs://.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, ParamSpec, TypeAlias, TypeVar

from dinofeat.cache import gcs
from dinofeat.cache.shardcache import ShardCache
from dinofeat.errors import ConfigError, StoreError
from dinofeat.filesystems import filesystem
from dinofeat.paths import file_url_path, is_file_url, is_url
from dinofeat.storeerrors import NO_CHANGE, store_errors

Buffer: TypeAlias = bytes | bytearray | memoryview


class Blob:
    """A file or object open for positioned reads. Local blobs own an fd (closed when the blob is collected, so a
    thread still reading from a blob an LRU just evicted never sees its fd closed or reused)."""

    size: int

    def read_at(self, offset: int, n: int) -> bytes:
        raise NotImplementedError

    def readinto_at(self, buffers: list[Any], offset: int) -> int:
        """Fill `buffers` (writable memoryviews/bytearrays) with consecutive bytes from `offset`; returns the count."""
        raise NotImplementedError

    def read_ranges(self, offsets: list[int], lengths: list[int]) -> list[bytes]:
        return [self.read_at(o, n) for o, n in zip(offsets, lengths, strict=True)]


class LocalBlob(Blob):
    __slots__ = ("fd", "size")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def read_at(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def readinto_at(self, buffers: list[Any], offset: int) -> int:
        return os.preadv(self.fd, buffers, offset)

    def advise_random(self) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down os already
            os.close(self.fd)


class Files(ABC):
    """The files of one cache, by path relative to its root ('zarr.json', '_dinofeat/done/b/0.json')."""

    remote: bool
    location: str  # what messages name

    @abstractmethod
    def open(self, rel: str) -> Blob:
        """For positioned reads. FileNotFoundError if absent."""

    @abstractmethod
    def read(self, rel: str) -> bytes:
        """The whole file. FileNotFoundError if absent."""

    def read_kept(self, rel: str, valid: Callable[[bytes], bool]) -> bytes:
        """The whole file, from a local copy where one is kept and passes `valid` (its recorded checksum): a remote
        cache read through a local shard cache keeps its arrays' zarr.json, so later epochs never ask the store."""
        return self.read(rel)

    @abstractmethod
    def read_versioned(self, rel: str) -> tuple[bytes, Any]:
        """The file and a version token for `replace`."""

    @abstractmethod
    def write(self, rel: str, data: bytes) -> None:
        """Replace the file atomically and durably: a reader sees the old bytes or the new, never a mix."""

    def write_parts(self, rel: str, parts: Sequence[Buffer]) -> None:
        """`write` of the parts' concatenation. Object stores get one body (one copy); a local file is written from
        the parts themselves (LocalFiles), so a 128 MiB shard is never copied into one `bytes` on its way."""
        self.write(rel, b"".join(parts))

    @abstractmethod
    def create(self, rel: str, data: bytes) -> Any:
        """Write only if the file does not exist (atomic). Returns the new version, or None if it exists."""

    @abstractmethod
    def replace(self, rel: str, data: bytes, version: Any) -> Any:
        """Write only if the file is still at `version` (from read_versioned). Returns the new version, or None if
        the file changed since."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Files under the folder `prefix` (recursive), as paths relative to the root, sorted."""

    @abstractmethod
    def children(self, rel: str) -> list[str]:
        """Names of the sub-folders of `rel` (for object stores: common prefixes)."""

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Delete one file; absent is fine."""

    @abstractmethod
    def delete_tree(self, rel: str) -> int:
        """Delete everything under folder `rel` ('' = the whole cache); returns how many files."""

    @abstractmethod
    def sync(self, rel: str) -> None:
        """Make a written file durable (local: fsync it and its folder). Objects are durable once PUT."""

    @abstractmethod
    def total_bytes(self) -> int: ...

    @abstractmethod
    def zarr_store(self) -> str:
        """What zarr opens for this root: a local path, or the URL zarr's FsspecStore opens."""

    @abstractmethod
    def sibling(self, suffix: str) -> tuple[Files, str]:
        """Files rooted at the cache's parent, and the name `<cache name><suffix>` in it (the lock lives beside the
        cache, so that deleting or moving the cache never touches it)."""


IOV_MAX = 1024  # buffers one writev takes (Linux)


def writev_all(fd: int, parts: Sequence[Buffer]) -> None:
    """Every byte of `parts`, in order, with as few system calls as writev allows (it may write less than asked)."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
    while views:
        n = os.writev(fd, views[:IOV_MAX])
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalFiles(Files):
    """A directory. With `dir_fd` (an open descriptor of the directory), every path is opened relative to it, so
    a reader keeps its generation when `--overwrite` moves the directory aside."""

    remote = False

    def __init__(self, root: Path, dir_fd: int | None = None) -> None:
        self.root = Path(root)
        self.location = str(root)
        self.dir_fd = dir_fd

    def _p(self, rel: str) -> Path:
        return self.root / rel

    def open(self, rel: str) -> LocalBlob:
        if self.dir_fd is not None:
            return LocalBlob(os.open(rel, os.O_RDONLY, dir_fd=self.dir_fd))
        return LocalBlob(os.open(self._p(rel), os.O_RDONLY))

    def read(self, rel: str) -> bytes:
        if self.dir_fd is not None:
            fd = os.open(rel, os.O_RDONLY, dir_fd=self.dir_fd)
            with os.fdopen(fd, "rb") as f:
                return f.read()
        return self._p(rel).read_bytes()

    def _version(self, rel: str) -> Any:
        st = self._p(rel).stat()
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read_versioned(self, rel: str) -> tuple[bytes, Any]:
        version = self._version(rel)
        return self._p(rel).read_bytes(), version

    def write(self, rel: str, data: bytes) -> None:
        self.write_parts(rel, (data,))

    def write_parts(self, rel: str, parts: Sequence[Buffer]) -> None:
        """A temp file written with `writev` straight from the parts, fsynced, renamed over the target."""
        path = self._p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # writer threads write different files
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                writev_all(fd, parts)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a disk-full write leaves no temp file behind
            raise
        fsync_path(path.parent)  # the rename itself survives a power cut

    def create(self, rel: str, data: bytes) -> Any:
        path = self._p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return self._version(rel)

    def replace(self, rel: str, data: bytes, version: Any) -> Any:
        """Local caches are guarded by the flock (dinofeat.cache.lock); the version check catches a writer that ignored
        it, within the window between the check and the rename."""
        if self._version(rel) != version:
            return None
        self.write(rel, data)
        return self._version(rel)

    def exists(self, rel: str) -> bool:
        return self._p(rel).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._p(prefix)
        out = []
        for dirpath, _, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root)
            out += [PurePosixPath(*rel.parts, f).as_posix() for f in files]
        return sorted(out)

    def children(self, rel: str) -> list[str]:
        d = self._p(rel)
        return sorted(e.name for e in os.scandir(d) if e.is_dir()) if d.is_dir() else []

    def delete(self, rel: str) -> None:
        p = self._p(rel)
        if p.is_dir() and not p.is_symlink():  # a folder where a file belongs (damage): it goes too
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def delete_tree(self, rel: str) -> int:
        d = self._p(rel)
        if not d.exists():
            return 0
        n = sum(1 for f in d.rglob("*") if f.is_file())
        shutil.rmtree(d, ignore_errors=True)
        return n

    def sync(self, rel: str) -> None:
        fsync_path(self._p(rel))
        fsync_path(self._p(rel).parent)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def zarr_store(self) -> str:
        return str(self.root)

    def sibling(self, suffix: str) -> tuple[Files, str]:
        root = Path(os.path.abspath(self.root))
        return LocalFiles(root.parent), f".{root.name}{suffix}"


class RemoteBlob(Blob):
    """One object, read by ranged GETs."""

    __slots__ = ("key", "owner", "size")

    def __init__(self, owner: RemoteFiles, key: str, size: int) -> None:
        self.owner, self.key, self.size = owner, key, size

    def read_at(self, offset: int, n: int) -> bytes:
        return bytes(self.owner.fs.cat_file(self.key, start=offset, end=offset + n))

    def readinto_at(self, buffers: list[Any], offset: int) -> int:
        total = sum(memoryview(b).nbytes for b in buffers)
        data = memoryview(self.read_at(offset, total))
        pos = 0
        for b in buffers:
            view = memoryview(b).cast("B")
            view[:] = data[pos : pos + view.nbytes]
            pos += view.nbytes
        return len(data)

    def read_ranges(self, offsets: list[int], lengths: list[int]) -> list[bytes]:
        if not offsets:
            return []
        n = len(offsets)
        ends = [o + k for o, k in zip(offsets, lengths, strict=True)]
        # concurrent GETs; fsspec returns a failed range's exception in the list unless told to raise it
        return list(self.owner.fs.cat_ranges([self.key] * n, offsets, ends, on_error="raise"))


CACHE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # stores of whole-object writes, tested: s3, gs


def split_url(url: str) -> tuple[str, str, str]:
    """'s3://bucket/a/b/' -> ('s3', 'bucket', 'a/b'). The cache must be a prefix inside a bucket, not the bucket
    itself: its lock object lives beside it."""
    scheme, rest = url.split("://", 1)
    if scheme.lower() not in CACHE_SCHEMES:
        raise ConfigError(
            f"{url!r}: a cache URL is an object store's (s3://, gs://, az://; file:// for a local folder), not "
            f"{scheme}://"
        )
    bucket, _, prefix = rest.partition("/")
    prefix = "/".join(p for p in prefix.split("/") if p)  # 'a//b/' and 'a/b' name one cache (and one lock)
    if not bucket or not prefix:
        raise ConfigError(f"{url!r}: give a prefix inside the bucket (s3://bucket/feats), not the bucket itself")
    try:
        filesystem(scheme)
    except ConfigError as e:
        raise ConfigError(f"{url!r}: {e}") from None
    return scheme.lower(), bucket, prefix


class RemoteFiles(Files):
    """A prefix in an object store, through fsspec (s3fs for s3://, gcsfs for gs://, adlfs for az://, ...). The
    filesystem object is made lazily in each process (`filesystem`), never pickled: DataLoader workers (forked or
    spawned) and ranks get their own connections. With a `shard_cache`, shards opened for reading are fetched whole
    once into its folder and read from there (shards are immutable once marked; dinofeat.cache.shardcache)."""

    remote = True

    def __init__(self, scheme: str, bucket: str, prefix: str, shard_cache: ShardCache | None = None) -> None:
        self.scheme, self.bucket, self.prefix = scheme, bucket, prefix.strip("/")
        # S3 has conditional PUTs (If-None-Match, If-Match), GCS generation preconditions; elsewhere they are a check,
        # then a write (not atomic)
        self.gcs = scheme in gcs.SCHEMES
        self.conditional = scheme in ("s3", "s3a") or self.gcs
        self.location = f"{scheme}://{bucket}/{self.prefix}".rstrip("/")
        self.shard_cache = shard_cache

    @classmethod
    def from_url(cls, url: str) -> RemoteFiles:
        return cls(*split_url(url))

    @property
    def fs(self) -> Any:
        return filesystem(self.scheme)

    def check_access(self) -> None:
        """One cheap request before a run creates anything (one LIST of at most one key on S3): missing credentials,
        a missing bucket or a store that does not answer fail here, before the model loads. Raises the client's
        error; `dinofeat.storeerrors` words it."""
        if self.scheme in ("s3", "s3a"):
            self.fs.call_s3("list_objects_v2", Bucket=self.bucket, Prefix=f"{self.prefix}/", MaxKeys=1)
            return
        try:
            self.fs.ls(self._key(""), detail=False, refresh=True)
        except FileNotFoundError:  # nothing under the prefix yet: fine, if the bucket itself is there
            if not self.fs.exists(self.bucket):
                raise StoreError(f"bucket {self.bucket!r} does not exist ({self.location})") from None

    def _key(self, rel: str) -> str:
        rel = rel.strip("/")
        return "/".join(p for p in (self.bucket, self.prefix, rel) if p)

    def open(self, rel: str) -> Blob:
        if self.shard_cache is not None:
            return LocalBlob(self.shard_cache.open(rel, lambda tmp: self.download(rel, tmp)))
        info = self.fs.info(self._key(rel))  # FileNotFoundError if absent
        if info.get("type") != "file":
            raise FileNotFoundError(self._key(rel))
        return RemoteBlob(self, self._key(rel), int(info["size"]))

    def download(self, rel: str, dest: Path) -> None:
        """Stream the object into the local file `dest` as one GET: memory stays at a few network buffers whatever
        the size (`read` holds the object whole, 3x over at its peak). s3fs and gcsfs would otherwise fetch large
        objects as concurrent parts held in memory until written (s3fs: 50 MiB parts, the whole shard); one stream
        was also the fastest here (docs/benchmarks.md), and concurrency comes from fetching several shards at once."""
        kw: dict[str, Any] = {}
        if self.scheme in ("s3", "s3a"):
            kw["max_concurrency"] = 1  # s3fs before concurrent get_file (2024.12) ignores it and streams anyway
        elif hasattr(self.fs, "_get_file_concurrent"):  # gcsfs with concurrent get_file (older: a query parameter)
            kw["concurrency"] = 1
        self.fs.get_file(self._key(rel), str(dest), **kw)

    def read(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self._key(rel)))

    def read_kept(self, rel: str, valid: Callable[[bytes], bool]) -> bytes:
        if self.shard_cache is None:
            return self.read(rel)
        return self.shard_cache.kept(rel, lambda: self.read(rel), valid)

    def read_versioned(self, rel: str) -> tuple[bytes, Any]:
        """The bytes and their ETag: the ETag is read before and after the bytes, and must not change between."""
        key = self._key(rel)
        version = gcs.version_of if self.gcs else _version_of  # GCS: the generation its preconditions compare
        for _ in range(5):
            etag = version(self.fs.info(key, refresh=True))
            data = bytes(self.fs.cat_file(key))
            if version(self.fs.info(key, refresh=True)) == etag:
                return data, etag
        raise OSError(f"{key} changed five times while being read")

    def write(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(rel), data)

    def create(self, rel: str, data: bytes) -> Any:
        if self.gcs:
            return gcs.put(self.fs, self._key(rel), data, "0")
        if not self.conditional:
            if self.exists(rel):
                return None
            self.write(rel, data)
            return self.read_versioned(rel)[1]
        try:
            return self.fs.pipe_file(self._key(rel), data, mode="create")["ETag"]  # If-None-Match: *
        except FileExistsError:
            return None
        except OSError as e:
            if _precondition_failed(e):
                return None
            raise

    def replace(self, rel: str, data: bytes, version: Any) -> Any:
        if self.gcs:
            return gcs.put(self.fs, self._key(rel), data, str(version))
        if not self.conditional:
            if self.read_versioned(rel)[1] != version:
                return None
            self.write(rel, data)
            return self.read_versioned(rel)[1]
        try:
            return self.fs.pipe_file(self._key(rel), data, IfMatch=version)["ETag"]
        except OSError as e:
            if _precondition_failed(e):
                return None
            raise

    def exists(self, rel: str) -> bool:
        return bool(self.fs.isfile(self._key(rel)))

    def list(self, prefix: str) -> list[str]:
        base = self._key(prefix)
        try:
            found = self.fs.find(base + "/", refresh=True)
        except FileNotFoundError:
            return []
        n = len(self._key("")) + 1
        return sorted(str(k)[n:] for k in found)

    def children(self, rel: str) -> list[str]:
        try:
            entries = self.fs.ls(self._key(rel) + "/", detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(rel))

    def delete_tree(self, rel: str) -> int:
        keys = [self._key(k) for k in self.list(rel)]
        if keys:
            self.fs.rm(keys)
        return len(keys)

    def sync(self, rel: str) -> None:
        """Nothing to do: an object is durable once its PUT returned."""

    def total_bytes(self) -> int:
        return sum(int(v["size"]) for v in self.fs.find(self._key("") + "/", detail=True, refresh=True).values())

    def zarr_store(self) -> str:
        return self.location

    def sibling(self, suffix: str) -> tuple[Files, str]:
        parent, _, name = self.prefix.rpartition("/")
        return RemoteFiles(self.scheme, self.bucket, parent), f"{name}{suffix}"


def _version_of(info: dict[str, Any]) -> Any:
    """An object's version token: its ETag where the store has one, else (size, modification time)."""
    for k in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(k):
            return info[k]
    return (info.get("size"), str(info.get("LastModified") or info.get("mtime") or info.get("updated")))


def _precondition_failed(e: OSError) -> bool:
    """s3fs turns S3's 412 PreconditionFailed into OSError(EINVAL, 'At least one of the pre-conditions ...')."""
    text = str(e).lower()
    return "pre-condition" in text or "precondition" in text or "412" in text


def open_files(location: str | os.PathLike[str]) -> Files:
    """The Files of a cache at a local path or a URL (URLs with an unsupported scheme raise ConfigError)."""
    text = os.fspath(location)
    if is_file_url(text):
        return LocalFiles(Path(os.path.realpath(file_url_path(text))))
    if is_url(text):
        return RemoteFiles.from_url(text)
    return LocalFiles(Path(os.path.realpath(text)))  # `c`, `./c`, `x/../c` and a link to it are one cache


def cache_location(value: str | os.PathLike[str]) -> Path | str:
    """A cache's one true name: a local path with every symlink resolved (`link`, `dir/../c`, `c/` and `c` are one
    cache, so they meet one lock), or a checked, normalised object-store URL ('s3://bucket/feats') whose store
    answered (`RemoteFiles.check_access`: no credentials, no bucket, no store end here in one line)."""
    files = open_files(value)
    if isinstance(files, LocalFiles):
        return Path(os.path.realpath(files.root))
    assert isinstance(files, RemoteFiles)
    with store_errors(files.location):
        files.check_access()  # credentials, bucket, a store that answers: before anything is created
    return files.location


P = ParamSpec("P")
R = TypeVar("R")


def on_store_errors(func: Callable[P, R]) -> Callable[P, R]:
    """For a command whose first argument is a cache: check the store answers (credentials, bucket) before it
    starts, and end a store failure in one line. A report that failed (`ok` false) is checked once more: validate
    records what it could not read as damage, and an outage that began mid-run must not read as a damaged cache
    (whose advice is to rebuild it)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        cache = args[0] if args else kwargs.get("cache")
        with store_errors(cache, NO_CHANGE):
            files = open_files(cache)  # type: ignore[arg-type]
            if files.remote:
                files.check_access()  # type: ignore[attr-defined]
            result = func(*args, **kwargs)
            if files.remote and getattr(result, "ok", True) is False:
                files.check_access()  # type: ignore[attr-defined]
            return result

    return wrapper
