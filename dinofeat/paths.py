"""Where a cache or an image source lives. Local paths only for now: a URL is refused before any work, because
`Path("s3://bucket/feats")` silently becomes the local folder `s3:/bucket/feats`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dinofeat.errors import ConfigError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str | os.PathLike[str]) -> bool:
    return bool(_URL.match(os.fspath(value)))


def local_path(value: str | os.PathLike[str], what: str) -> Path:
    """`value` as a local Path; a URL (s3://, gs://, http://, file://, ...) raises ConfigError naming `what`."""
    text = os.fspath(value)
    if is_url(text):
        raise ConfigError(
            f"{what} {text!r} is a URL; dinofeat reads and writes local paths only (remote caches and sources are "
            "not supported yet): give a local directory, or mount the bucket (s3fs, gcsfuse) and give the mount path"
        )
    return Path(text)
