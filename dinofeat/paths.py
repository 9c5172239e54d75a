"""Local paths where dinofeat needs them: an image folder or list file. A URL there is refused before any work,
because `Path("s3://bucket/x")` silently becomes the local folder `s3:/bucket/x`. (Caches and tar shard sources
may be URLs: dinofeat.cache.objects and dinofeat.sources.archive handle those.)"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dinofeat.errors import ConfigError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str | os.PathLike[str]) -> bool:
    return bool(_URL.match(os.fspath(value)))


def file_url_path(url: str) -> str:
    """The local path of a `file:` URL (RFC 8089): `file:///data/c`, `file://localhost/data/c` and the short form
    `file:/data/c` are the folder `/data/c`. Any other host is refused: `file://server/data/c` names a folder on
    another machine, and reading it as the relative folder `server/data/c` (or `file:/data/c` as `./file:/data/c`)
    would quietly make a new cache here."""
    if url[5:7] != "//":  # the short form: an absolute path right after the scheme
        if not url[5:].startswith("/") or not url[5:].strip("/"):
            raise ConfigError(f"{url!r} is a file: URL without an absolute path; give file:///path/to/cache")
        return url[5:]
    rest = url[7:]
    host, slash, path = rest.partition("/")
    if host.lower() not in ("", "localhost"):
        raise ConfigError(
            f"{url!r} names a folder on the machine {host!r}; a file:// URL here is a local folder (file:///path or "
            "file://localhost/path): mount that machine's folder and give the mount path"
        )
    if not path.strip("/"):
        raise ConfigError(f"{url!r} names no folder; give file:///path/to/cache")
    return slash + path


def is_file_url(value: str | os.PathLike[str]) -> bool:
    """`file://...` or the short `file:/...` (any case); a name starting `file:` is never taken as a relative
    folder (`Path("file:/data/c")` is `./file:/data/c`)."""
    return os.fspath(value)[:5].lower() == "file:"


def local_path(value: str | os.PathLike[str], what: str) -> Path:
    """`value` as a local Path; a URL (s3://, gs://, http://, file://, ...) raises ConfigError naming `what`."""
    text = os.fspath(value)
    if is_url(text) or is_file_url(text):
        raise ConfigError(
            f"{what} {text!r} is a URL; it must be a local path (caches may be s3://bucket/prefix URLs, and tar "
            "shard sources URLs such as s3://bucket/shards/{000000..000099}.tar): mount the bucket (mountpoint-s3, "
            "gcsfuse) and give the mount path"
        )
    return Path(text)


def check_cache_dir(path: Path) -> None:
    """ConfigError unless a local cache can live at `path`: it is a folder or does not exist yet, and the nearest
    existing folder above it is a folder (not a file). Checked before the lock and the cache are created, so a
    typo leaves nothing behind."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # not created yet; a path through a file: named below
    except OSError as e:  # a symlink loop, no permission
        raise ConfigError(f"cache path {str(path)!r} cannot be used: {e.strerror or e}") from None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"cache path {str(path)!r} is a file, not a folder; give a folder (it is created)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cache path {str(path)!r} lies under {str(parent)!r}, which is a file")
            return


def key_for(name: str) -> str:
    """A UTF-8 key for a file name. Names the OS gave us with undecodable bytes (surrogate escapes) spell those
    bytes as `\\xNN`, so one odd name never stops a run; every other name is its own key."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def model_ref(spec: str) -> str:
    """How a cache records a model: a local model folder by its absolute path (so a rerun from another folder, or
    `./m` for `m`, names the same model), a hub id as given (a folder of that name is what transformers loads)."""
    if spec and not is_url(spec) and os.path.isdir(spec):
        return str(Path(spec).resolve())
    return spec
