"""Discovery: which files are images, in a deterministic order, keyed by their POSIX path under the root."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from dinofeat.errors import ConfigError
from dinofeat.keys import PackedKeys, joined, pack
from dinofeat.paths import is_url, key_for, local_path
from dinofeat.sources.archive import Member, is_parquet, is_tar_source, list_members, shard_paths, shard_stem
from dinofeat.sources.members import Members, from_mapping, members_of

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)


@dataclass(frozen=True, eq=False)
class Source:
    """An image source: `root` + sorted relative `keys` (POSIX), packed (dinofeat/keys.py). `path(key)` is the file
    to open, or the archive member (tar shards and parquet files: `root` is then the file pattern, and `members`
    holds each image's location as columns parallel to the keys).

    `renamed` maps the keys of files whose names are not valid UTF-8 (the cache stores keys as UTF-8) to their
    real relative names: the key spells each undecodable byte as `\\xNN` (see `key_for`). Keys may be given as any
    sequence of str, and members as a `{key: Member}` mapping: both are packed into columns."""

    root: Path | str  # a URL pattern for remote tar shards
    keys: PackedKeys
    renamed: dict[str, str] = field(default_factory=dict)
    members: Members | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.keys, PackedKeys):
            object.__setattr__(self, "keys", pack(list(self.keys)))
        if isinstance(self.members, Mapping):
            object.__setattr__(self, "members", from_mapping(self.keys, self.members) if self.members else None)

    def path(self, key: str) -> str | Member:
        if self.members is not None:
            i = self.keys.find(key)
            if i < 0:
                raise KeyError(key)
            return self.members.member(i, key)
        return str(self.root / self.renamed.get(key, key))

    def location(self, i: int) -> str | Member:
        """What to open for the image at position i."""
        key = self.keys[i]
        if self.members is not None:
            return self.members.member(i, key)
        return str(self.root / self.renamed.get(key, key))

    def locations(self) -> Sequence[str | Member]:
        """Every image's location, made one at a time as it is asked for (no list of them is kept)."""
        return _Locations(self)

    def take(self, positions: np.ndarray) -> Source:
        """The images at `positions` (ascending keeps the keys sorted)."""
        keys = self.keys.take(positions)
        renamed = {k: v for k, v in self.renamed.items() if k in keys} if self.renamed else {}
        members = self.members.take(positions) if self.members is not None else None
        return Source(self.root, keys, renamed, members)

    def head(self, n: int) -> Source:
        return self if n >= len(self.keys) else self.take(np.arange(max(0, n)))

    def subset(self, keys: Sequence[str]) -> Source:
        """The images of `keys` (each must be in this source), in that order."""
        if keys is self.keys:
            return self
        pos = self.keys.positions(keys)
        if (pos < 0).any():
            raise KeyError(keys[int(np.flatnonzero(pos < 0)[0])])
        return self.take(pos)


class _Locations(Sequence):
    def __init__(self, src: Source) -> None:
        self.src = src

    def __len__(self) -> int:
        return len(self.src.keys)

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, slice):
            return [self.src.location(j) for j in range(*i.indices(len(self)))]
        return self.src.location(i)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(root: Path, renamed: dict[str, str] | None = None) -> list[str]:
    """Recursive walk (symlinked dirs not followed), hidden entries skipped, image extensions only, sorted keys.
    Keys that differ from the real relative name (non-UTF-8 names) are recorded in `renamed`."""
    keys: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for f in filenames:
            if not f.startswith(".") and is_image_name(f):
                name = PurePosixPath(*rel.parts, f).as_posix()
                key = key_for(name)
                keys.append(key)
                if key != name and renamed is not None:
                    renamed[key] = name
    keys.sort()
    return keys


def read_list(list_file: Path, root: Path | None) -> tuple[Path, list[str]]:
    """A text file of paths, one a line (# comments and blanks skipped). Relative paths resolve against `root`,
    or the list file's folder. Keys are relative to that root; order is sorted, duplicates refused."""
    base = (root or list_file.parent).resolve()
    entries = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append((line, base, f"{list_file}:{n}"))
    return base, sorted(keys_under(base, entries, str(list_file)))


def keys_under(base: Path, entries: list[tuple[str, Path, str]], what: str) -> list[str]:
    """Keys of listed paths: (path, folder it is relative to, where it was listed) -> path relative to `base`.
    A path outside `base` or listed twice is refused."""
    keys: list[str] = []
    for line, folder, where in entries:
        p = Path(line)
        p = p if p.is_absolute() else folder / p
        try:
            keys.append(p.resolve().relative_to(base).as_posix())
        except ValueError as e:
            raise ConfigError(f"{where}: {line!r} is outside the root {base}") from e
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{what} lists some files more than once")
    return keys


def discover(source: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, limit: int | None = None):
    """A folder (walked), a .txt list of paths, tar shards (`shard.tar`, `shards/{000000..000099}.tar`) or parquet
    files (`data/*.parquet`). `limit` keeps the first N keys."""
    if is_parquet(os.fspath(source)):
        return discover_parquet(os.fspath(source), limit)
    if is_tar_source(os.fspath(source)):
        return discover_tars(os.fspath(source), limit)
    src = local_path(source, "image source")
    renamed: dict[str, str] = {}
    if src.is_dir():
        base, keys = src.resolve(), walk_images(src.resolve(), renamed)
    elif src.is_file():
        base, keys = read_list(src, Path(root) if root else None)
    else:
        raise ConfigError(f"image source {str(src)!r} does not exist")
    if limit is not None:
        keys = keys[:limit]
    return Source(base, pack(keys, presorted=True), renamed)


def discover_tars(source: str, limit: int | None = None) -> Source:
    """Image members of every shard (local paths or URLs), keyed `<shard stem>/<sample key>`; only tar headers are
    read. Each shard's listing is packed as it comes (its keys sorted), so nothing per image is kept as a Python
    object; shards whose keys follow each other in order (zero-padded stems) need no sort of the whole."""
    keys, found = [], []
    for shard in shard_paths(source):
        stem = shard_stem(shard)
        samples, offsets, sizes, mtimes = list_members(shard, IMAGE_EXTENSIONS)
        keys.append(pack([f"{stem}/{k}" for k in samples], presorted=True))
        found.append((shard, offsets, sizes, mtimes))
    src = _sorted(Source(source_root(source), joined(keys), {}, members_of(found)))
    return src if limit is None else src.head(limit)


def _sorted(src: Source) -> Source:
    """`src` with its images in key order (a no-op for a listing that is sorted already)."""
    return src if src.keys.is_sorted() else src.take(src.keys.order)


def discover_parquet(source: str, limit: int | None = None, threads: int = 16) -> Source:
    """Rows of every parquet file (local or URLs), in file then row order (the order that reads each row group
    least often), keyed `<file stem>/<key>`. Only footers and the small key or path columns are read. Files
    whose image column holds paths make a list of files, as a .txt list does."""
    from dinofeat.sources.parquet import list_rows, listing_root, split_column

    files = shard_paths(source)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        listings = list(pool.map(list_rows, files))
    kinds = {x.column.kind == "path" for x in listings}
    if len(kinds) > 1:
        raise ConfigError(f"some files of {source!r} hold image bytes, others file paths")
    if kinds == {True}:
        if is_url(source):
            raise ConfigError("a parquet list of file paths must be a local file (the paths are read as local files)")
        base = listing_root(files)
        parent = {f: Path(split_column(f)[0]).resolve().parent for f in files}
        entries = [
            (p, parent[f], f"{f}: row {row}")
            for f, x in zip(files, listings, strict=True)
            for row, p in enumerate(x.paths or [])
            if p  # a row without a path names no file
        ]
        keys = keys_under(base, entries, source)
        return Source(base, pack(keys[:limit] if limit is not None else keys))
    keys, found = [], []
    for f, x in zip(files, listings, strict=True):
        stem = shard_stem(f)
        n = len(x.keys)
        keys.append(pack([f"{stem}/{k}" for k in x.keys]))
        found.append((f, np.arange(n), np.full(n, -1), np.full(n, x.mtime_ns)))
    src = Source(source_root(source), joined(keys), {}, members_of(found))
    return src if limit is None else src.head(limit)


def no_images(source: str | os.PathLike[str]) -> str:
    """The one line a source without a single image gets (an empty or mistyped folder, an empty list or archive)."""
    text = os.fspath(source)
    if is_parquet(text):
        return f"no image rows found in {text!r} (the parquet files hold no rows)"
    if is_tar_source(text):
        return f"no images found in {text!r} (no tar member ends in {', '.join(sorted(IMAGE_EXTENSIONS))})"
    if Path(text).is_file():
        return f"no images found in {text!r}: the list names no files"
    return f"no images found in {text!r} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}; hidden files skipped)"


def source_root(source: str) -> Path | str:
    """A source's root as Source keeps it: a Path, or a URL (pattern) as given (Path would fold its '//')."""
    return source if is_url(source) else Path(source)


def locator(source: str, renamed: dict[str, str] | None = None) -> Callable[[str], str | Member]:
    """key -> what to open, without walking a folder (a tar source lists its shards' headers once). `renamed`:
    the keys whose file names differ (as recorded with the cache)."""
    if is_parquet(source):
        return discover_parquet(source).path
    if is_tar_source(source):
        return discover_tars(source).path
    return Source(local_path(source, "image source"), pack([]), dict(renamed or {})).path


# what an image was read from: (size, mtime_ns, archive or None, byte offset or -1)
Facts = tuple[int, int, str | None, int]


def facts_of(loc: str | Member) -> Facts:
    """Where an image's bytes are now, as the index records them (a file: size and mtime; an archive member: also
    its archive and offset)."""
    size, mtime = size_and_mtime(loc)
    if isinstance(loc, Member):
        return size, mtime, loc.archive, loc.offset
    return size, mtime, None, -1


def same_facts(now: Facts, was: Facts) -> bool:
    """Equal facts: size and mtime by the staleness rule, then the place."""
    return not is_stale(now[:2], was[:2]) and now[2:] == was[2:]


def is_stale(now: tuple[int, int], recorded: tuple[int, int]) -> bool:
    """(size, mtime) now vs when read; a size of -1 (a parquet row not read yet) is not compared."""
    return now[1] != recorded[1] or (now[0] >= 0 and recorded[0] >= 0 and now[0] != recorded[0])


def size_and_mtime(loc: str | Member) -> tuple[int, int]:
    """What staleness checks compare: a file's, or an archive member's recorded size and mtime (a parquet row's size
    is -1 until read: its file's mtime is what changes)."""
    if isinstance(loc, Member):
        return loc.size, loc.mtime_ns
    st = os.stat(loc)
    return st.st_size, st.st_mtime_ns
