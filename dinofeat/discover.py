"""Discovery: which files are images, in a deterministic order, keyed by their POSIX path under the root."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dinofeat.archive import Member, is_tar_source, list_images, shard_paths, shard_stem
from dinofeat.errors import ConfigError
from dinofeat.paths import is_url, local_path

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


def key_for(name: str) -> str:
    """A UTF-8 key for a file name. Names the OS gave us with undecodable bytes (surrogate escapes) spell those
    bytes as `\\xNN`, so one odd name never stops a run; every other name is its own key."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


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
    keys: list[str] = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        p = p if p.is_absolute() else base / p
        try:
            keys.append(p.resolve().relative_to(base).as_posix())
        except ValueError as e:
            raise ConfigError(f"{list_file}:{n}: {line!r} is outside the root {base}") from e
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{list_file} lists some files more than once")
    return base, sorted(keys)


def discover(source: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, limit: int | None = None):
    """A folder (walked), a .txt list of paths, or tar shards (`shard.tar`, `shards/{000000..000099}.tar`).
    `limit` keeps the first N keys of the sorted order."""
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


def source_root(source: str) -> Path | str:
    """A source's root as Source keeps it: a Path, or a URL (pattern) as given (Path would fold its '//')."""
    return source if is_url(source) else Path(source)


def locator(source: str, renamed: dict[str, str] | None = None) -> Callable[[str], str | Member]:
    """key -> what to open, without walking a folder (a tar source lists its shards' headers once). `renamed`:
    the keys whose file names differ (as recorded with the cache)."""
    if is_tar_source(source):
        return discover_tars(source).path
    return Source(local_path(source, "image source"), (), dict(renamed or {})).path


def size_and_mtime(loc: str | Member) -> tuple[int, int]:
    """What staleness checks compare: a file's, or an archive member's recorded size and mtime."""
    if isinstance(loc, Member):
        return loc.size, loc.mtime_ns
    st = os.stat(loc)
    return st.st_size, st.st_mtime_ns
