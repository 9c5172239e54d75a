"""Images inside tar shards (webdataset, img2dataset): listed from the tar headers, read by byte range, never unpacked.
Members are also how parquet rows travel (dinofeat.sources.parquet: the offset is the row), and the file patterns of
both.

Shards are local paths or URLs (`s3://bucket/shards/{000000..000999}.tar`, any fsspec URL): a remote shard is listed
through a read-ahead stream (tarfile seeks over the data; each 8 MiB read-ahead GET covers many small members) and
each image is one ranged GET.

A webdataset sample is the members sharing a key: the member name up to the first dot of its basename
(`000123.jpg`, `000123.txt`, `000123.json`). Our key for it is `<shard stem>/<sample key>`, stable and unique across
the shards, and what a DiT dataloader over the same tars can rebuild from webdataset's `__url__` and `__key__`.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from dinofeat.errors import ConfigError, SourceChangedError
from dinofeat.filesystems import filesystem
from dinofeat.paths import is_url, key_for
from dinofeat.sources.parquet import read_row, split_column, with_column

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True)
class Member:
    """One archive member as a byte range: what decode workers receive instead of a path (small, picklable)."""

    archive: str
    name: str
    offset: int
    size: int
    mtime_ns: int

    def __str__(self) -> str:
        return f"{self.archive}:{self.name}"


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard patterns: `a/{000000..000099}.tar` (zero padding kept), `{a,b}`, several braces."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise ConfigError(f"empty range {{{body}}} in {pattern!r}")
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ConfigError(f"cannot expand {{{body}}} in {pattern!r}: use {{000..099}} or {{a,b}}")
    return [x for o in options for x in expand_braces(head + o + tail)]


def is_tar_source(source: str) -> bool:
    return source.endswith(".tar") or (_BRACE.search(source) is not None and ".tar" in source)


def is_parquet(source: str) -> bool:
    """A parquet file or pattern (`data/{00000..00009}.parquet`, `data/*.parquet`, either with `?column=NAME`)."""
    return split_column(source)[0].endswith(".parquet")


def is_archive_source(source: str) -> bool:
    """Tar shards or parquet files: images inside other files, local or at URLs."""
    return is_tar_source(source) or is_parquet(source)


def sample_key(member_name: str) -> str:
    """webdataset's rule: directory kept, basename cut at its first dot."""
    if "//" not in member_name and "/." not in "/" + member_name and member_name[:1] != "/" and member_name[-1:] != "/":
        head, _, base = member_name.rpartition("/")  # the common name: string operations (a listing's hot loop)
        stem = base.split(".", 1)[0]
        return f"{head}/{stem}" if head else stem
    p = PurePosixPath(member_name)  # './a.jpg', 'a//b.jpg', hidden folders: as PurePosixPath normalises them
    stem = p.name.split(".", 1)[0]
    return (p.parent / stem).as_posix() if str(p.parent) != "." else stem


def list_images(archive: str, extensions: frozenset[str]) -> dict[str, Member]:
    """Image members of one tar by sample key (see `list_members`), as Member objects."""
    found: dict[str, Member] = {}
    for key, name, offset, size, mtime in _scan(archive, extensions):
        if key not in found or name < found[key].name:
            found[key] = Member(archive, name, offset, size, mtime)
    return found


def list_members(archive: str, extensions: frozenset[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Image members of one tar as columns: sample keys in ascending order, and each one's data offset, size and
    modification time (ns). A sample with several image members keeps the first by name; unreadable shards raise
    ConfigError before any work."""
    best: dict[str, tuple[str, int, int, int]] = {}
    for key, name, offset, size, mtime in _scan(archive, extensions):
        if key not in best or name < best[key][0]:
            best[key] = (name, offset, size, mtime)
    keys = sorted(best)
    cols = [np.fromiter((best[k][j] for k in keys), np.int64, len(keys)) for j in (1, 2, 3)]
    return keys, cols[0], cols[1], cols[2]


def _scan(archive: str, extensions: frozenset[str]) -> Iterator[tuple[str, str, int, int, int]]:
    """(sample key, name, data offset, size, mtime ns) of every image member, from the tar headers only (tarfile
    seeks over the data).

    A member's mtime is taken from its own 512-byte header block (the one just before its data), the block every
    later read checks: pax writers keep the exact value in an extended header before it and put a rounded one
    (Python's tarfile, hence webdataset) or a truncated one (bsdtar) in the block, so the listing must read the
    same field the read-time check does, whatever the writer. Without a pax mtime the block's is the member's."""
    try:
        with _open_archive(archive) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for info in tf:
                if not info.isreg() or os.path.splitext(info.name)[1].lower() not in extensions:
                    continue
                if info.name.rpartition("/")[2].startswith("."):
                    continue
                mtime = info.mtime
                if "mtime" in info.pax_headers:
                    f.seek(info.offset_data - tarfile.BLOCKSIZE)  # just read by tarfile: in the stream's buffer
                    own = _parse_header(f.read(tarfile.BLOCKSIZE))
                    mtime = own.mtime if own is not None else mtime
                # a name in another encoding than UTF-8 (tarfile gives its bytes as surrogates): keyed as a file of that
                # name is, each undecodable byte spelled \xNN (the cache stores keys as UTF-8)
                key = key_for(sample_key(info.name))
                yield key, info.name, info.offset_data, info.size, int(mtime) * 1_000_000_000
    except (OSError, tarfile.TarError) as e:
        raise ConfigError(f"cannot read the tar shard {archive}: {e}") from e


LISTING_READAHEAD = 8 * 2**20


def _open_archive(archive: str) -> io.BufferedIOBase:
    if is_url(archive):
        return filesystem(archive).open(archive, "rb", block_size=LISTING_READAHEAD, cache_type="readahead")
    return open(archive, "rb")


def _read_range(archive: str, offset: int, n: int) -> bytes:
    """n bytes at offset: one pread, or one ranged GET for a URL."""
    if is_url(archive):
        return bytes(filesystem(archive).cat_file(archive, start=offset, end=offset + n))
    fd = os.open(archive, os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


class _Slice(io.RawIOBase):
    """A read-only, seekable view of a member's bytes. It holds no file descriptor between reads (each read is one
    open + pread + close), so an image opened through it for its header needs no closing of ours."""

    def __init__(self, m: Member) -> None:
        super().__init__()
        self.m, self.pos = m, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.m.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buf), self.m.size - self.pos))
        if n == 0:
            return 0
        data = _read_range(self.m.archive, self.m.offset + self.pos, n)
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def header_reader(m: Member) -> io.BufferedIOBase:
    """For probing: reads only what the image header parser asks for (a parquet row is read whole: its row group is
    the smallest unit a parquet file can be read in)."""
    if is_parquet(m.archive):
        return io.BytesIO(read_member(m))
    return io.BufferedReader(_Slice(m), buffer_size=16384)


def read_member(m: Member) -> bytes:
    """The whole member, in one positioned read or ranged GET (for decoding). A parquet member's offset is its row;
    its size is -1 until a probe has read it."""
    if is_parquet(m.archive):
        data = read_row(m.archive, m.offset, m.mtime_ns)
        if m.size >= 0 and len(data) != m.size:
            raise OSError(f"{m}: {len(data)} bytes, {m.size} when planned: the parquet file changed")
        return data
    if m.offset < tarfile.BLOCKSIZE:
        raise SourceChangedError(f"{m}: no tar header before byte {m.offset}; the plan does not fit this shard")
    data = _read_range(m.archive, m.offset - tarfile.BLOCKSIZE, m.size + tarfile.BLOCKSIZE)
    if len(data) != m.size + tarfile.BLOCKSIZE:
        raise OSError(f"{m}: truncated archive ({len(data) - tarfile.BLOCKSIZE} of {m.size} bytes)")
    why = header_mismatch(data[: tarfile.BLOCKSIZE], m)
    if why:
        raise SourceChangedError(
            f"{m.archive} changed since it was planned: {why}; rerun the same command (the source is listed again)"
        )
    return data[tarfile.BLOCKSIZE :]


def header_mismatch(header: bytes, m: Member) -> str | None:
    """Why the 512-byte tar header just before a member's data is not the member the plan recorded (None if it is).
    A read checks its name, size and mtime for free (the same positioned read), so a shard rewritten with other
    members at those offsets never yields another image's bytes. Size and mtime are compared exactly: the listing
    took them from this same block. The name is compared exactly unless the writer had to shorten it (see
    `names_agree`)."""
    info = _parse_header(header)
    if info is None:
        return f"byte {m.offset - tarfile.BLOCKSIZE} is no longer a tar header"
    if not names_agree(info.name, m.name):
        return f"the member at byte {m.offset} is now {info.name!r}, not {m.name!r}"
    if info.size != m.size:
        return f"{m.name!r} is now {info.size} bytes, planned as {m.size}"
    if m.mtime_ns >= 0 and int(info.mtime) * 1_000_000_000 != m.mtime_ns:
        return f"{m.name!r} has another modification time than when planned"
    return None


def _parse_header(block: bytes) -> tarfile.TarInfo | None:
    """A member's own header block, as it stands (no extended headers applied); None if it is not one."""
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None


VERBATIM_NAME = 80  # planned names (or keys) this short and ASCII are stored in the header as they are, by any writer
CUT_AT = 90  # a stored name this long (UTF-8 bytes) may have been cut at the block's 100 bytes (bsdtar cuts at 98)


def names_agree(stored: str, planned: str) -> bool:
    """Whether a header block's own name field (`stored`) names the planned member (its full name, or its sample
    key when the plan is read from the index). A name that does not fit the block (over 100 bytes with its suffix,
    or not ASCII) lives in a pax or GNU extended header, and the block holds the writer's shortening of it:
    tarfile writes '?' for each non-ASCII character and cuts at 100 characters, GNU tar cuts at 100 bytes (maybe
    inside a character), bsdtar drops whole leading folders or cuts at 98 bytes. Such a name agrees when, character
    by character, it spells the planned name or one of its trailing paths ('?' or a cut byte standing for exactly
    one non-ASCII character), and either ends where that name (or its key) ends, or was cut at the block's length."""
    if planned in (stored, sample_key(stored), key_for(stored), key_for(sample_key(stored))):
        return True
    if planned.isascii() and len(planned) <= VERBATIM_NAME:
        return False
    cut = len(stored.encode("utf-8", "surrogateescape")) >= CUT_AT
    spelled = stored
    while cut and spelled and "\udc80" <= spelled[-1] <= "\udcff":
        spelled = spelled[:-1]  # the bytes of a character cut at the limit spell nothing
    spelled = _normal_path(key_for(spelled))  # as the key reads it: no './' or '//', other encodings as \xNN
    parts = planned.split("/")
    return any(_spells(spelled, "/".join(parts[i:]), cut) for i in range(len(parts)))


def _normal_path(name: str) -> str:
    """`name` without the spellings PurePosixPath drops: leading './', repeated '/', '/./' inside."""
    while name.startswith("./"):
        name = name[2:].lstrip("/")
    while "//" in name or "/./" in name:
        name = name.replace("//", "/").replace("/./", "/")
    return name


def _spells(stored: str, planned: str, cut: bool) -> bool:
    """`stored` is `planned` written by a writer: equal characters, '?' for a non-ASCII one; it may stop early only
    when `cut`, and go on past a planned key only with the key's suffix ('.jpg')."""
    for i, c in enumerate(stored):
        if i == len(planned):
            return c == "."  # the planned name is a key: the stored name goes on with its suffix
        if c != planned[i] and not (c == "?" and not planned[i].isascii()):
            return False
    return len(stored) == len(planned) or cut


def shard_paths(source: str) -> list[str]:
    """The files a source names (one path, a brace pattern or a `*` glob; parquet ones keep their `?column=`),
    each checked to exist (for URLs: one listing per folder, not one request per file)."""
    pattern, column = split_column(source)
    what = "parquet files" if is_parquet(source) else "tar shards"
    paths = [p for b in expand_braces(pattern) for p in (_glob(b) if "*" in b else [b])]
    if not paths:
        raise ConfigError(f"no {what} match {pattern!r}")
    missing = [p for p in paths if not _exists(p)] if not is_url(pattern) else _missing_objects(paths)
    if missing:
        raise ConfigError(f"{len(missing)} of {len(paths)} {what} do not exist (e.g. {missing[0]!r})")
    stems = [shard_stem(p) for p in paths]
    if len(set(stems)) != len(stems):
        raise ConfigError(f"{what} of {source!r} share file names; keys (<file>/<sample>) would collide")
    return [with_column(p, column) for p in paths]


def _glob(pattern: str) -> list[str]:
    """Sorted matches of a `*` pattern: local paths, or URLs with their scheme kept."""
    if not is_url(pattern):
        return sorted(glob.glob(pattern))
    scheme = pattern.split("://", 1)[0]
    return sorted(f"{scheme}://{p}" for p in filesystem(pattern).glob(pattern))


def shard_stem(path: str) -> str:
    """`000123` for `.../000123.tar`, local or URL (a parquet file's `?column=` dropped)."""
    path = split_column(path)[0]
    return PurePosixPath(path.split("://", 1)[-1]).stem if is_url(path) else Path(path).stem


def _exists(path: str) -> bool:
    return Path(path).is_file()


def _missing_objects(urls: list[str]) -> list[str]:
    fs = filesystem(urls[0])
    folders: dict[str, set[str]] = {}
    missing = []
    for url in urls:
        folder = url.rsplit("/", 1)[0]
        if folder not in folders:
            try:
                folders[folder] = {str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
            except (FileNotFoundError, OSError):
                folders[folder] = set()
        if url.rsplit("/", 1)[1] not in folders[folder]:
            missing.append(url)
    return missing
