"""Discovery: which files are images, in a deterministic order, keyed by their POSIX path under the root."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dinofeat.errors import ConfigError
from dinofeat.paths import is_url, key_for, local_path
from dinofeat.sources.archive import Member, is_parquet, is_tar_source, list_images, shard_paths, shard_stem

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)


@dataclass(frozen=True)
class Source:
    """An image source: `root` + sorted relative `keys` (POSIX). `path(key)` is the file to open, or the archive
    member (tar shards: `root` is then the shard pattern, and `members` maps each key to its byte range).

    `renamed` maps the keys of files whose names are not valid UTF-8 (the cache stores keys as UTF-8) to their
    real relative names: the key spells each undecodable byte as `\\xNN` (see `key_for`)."""

    root: Path | str  # a URL pattern for remote tar shards
    keys: tuple[str, ...]
    renamed: dict[str, str] = field(default_factory=dict, compare=False)
    members: dict[str, Member] = field(default_factory=dict, compare=False)

    def path(self, key: str) -> str | Member:
        if self.members:
            return self.members[key]
        return str(self.root / self.renamed.get(key, key))

    def subset(self, keys: tuple[str, ...]) -> Source:
        wanted = set(keys)
        return Source(
            self.root,
            keys,
            {k: v for k, v in self.renamed.items() if k in wanted},
            {k: v for k, v in self.members.items() if k in wanted},
        )


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
    return Source(base, tuple(keys), renamed)


def discover_tars(source: str, limit: int | None = None) -> Source:
    """Image members of every shard (local paths or URLs), keyed `<shard stem>/<sample key>`; only tar headers are
    read."""
    members: dict[str, Member] = {}
    for shard in shard_paths(source):
        stem = shard_stem(shard)
        for key, m in list_images(shard, IMAGE_EXTENSIONS).items():
            members[f"{stem}/{key}"] = m
    keys = sorted(members)[:limit] if limit is not None else sorted(members)
    return Source(source_root(source), tuple(keys), {}, {k: members[k] for k in keys})


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
        return Source(base, tuple(keys[:limit] if limit is not None else keys))
    members: dict[str, Member] = {}
    for f, x in zip(files, listings, strict=True):
        stem = shard_stem(f)
        for row, k in enumerate(x.keys):
            members[f"{stem}/{k}"] = Member(f, k, row, -1, x.mtime_ns)
    keys = list(members)[:limit] if limit is not None else list(members)
    return Source(source_root(source), tuple(keys), {}, {k: members[k] for k in keys})


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
    return Source(local_path(source, "image source"), (), dict(renamed or {})).path


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
