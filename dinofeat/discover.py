"""Discovery: which files are images, in a deterministic order, keyed by their POSIX path under the root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dinofeat.errors import ConfigError
from dinofeat.paths import local_path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)


@dataclass(frozen=True)
class Source:
    """An image source: `root` + sorted relative `keys` (POSIX). `path(key)` is the file to open."""

    root: Path
    keys: tuple[str, ...]

    def path(self, key: str) -> str:
        return str(self.root / key)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(root: Path) -> list[str]:
    """Recursive walk (symlinked dirs not followed), hidden entries skipped, image extensions only, sorted."""
    keys: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for f in filenames:
            if not f.startswith(".") and is_image_name(f):
                keys.append(PurePosixPath(*rel.parts, f).as_posix())
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
    """A folder (walked) or a .txt list of paths. `limit` keeps the first N keys of the sorted order."""
    src = local_path(source, "image source")
    if src.is_dir():
        base, keys = src.resolve(), walk_images(src.resolve())
    elif src.is_file():
        base, keys = read_list(src, Path(root) if root else None)
    else:
        raise ConfigError(f"image source {str(src)!r} does not exist")
    if limit is not None:
        keys = keys[:limit]
    return Source(base, tuple(keys))
