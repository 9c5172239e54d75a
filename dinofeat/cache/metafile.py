"""The cache's metadata file (the root zarr.json, attributes["dinofeat"]): read and checked once at open, written
only by compare-and-swap. The rules of its content are dinofeat.cache.metadata; this is its I/O."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dinofeat.cache import metadata
from dinofeat.cache.layout import META_KEY, READABLE_VERSIONS
from dinofeat.cache.objects import Files
from dinofeat.errors import CacheConflictError, CacheFormatError


def refuse_damaged(path: str, meta: dict[str, Any]) -> None:
    """CacheFormatError naming every metadata field that fails its checksum or cannot be right."""
    bad = metadata.damage(meta)
    if bad:
        raise CacheFormatError(
            f"{path}: metadata field(s) {', '.join(bad)} fail their checksum (edited or damaged since written); the "
            "cache is refused rather than read wrongly. Restore zarr.json from a copy, or rebuild with --overwrite"
        )
    wrong = metadata.problems(meta)
    if wrong:
        raise CacheFormatError(
            f"{path}: damaged metadata: " + "; ".join(f"{f}: {why}" for f, why in wrong) + ". Restore zarr.json "
            "from a copy, or rebuild with --overwrite"
        )


def read_meta(files: Files) -> dict[str, Any]:
    """A cache's metadata, refused with one clear reason when it is not a dinofeat cache this build can read."""
    where = files.location
    try:
        doc = json.loads(files.read("zarr.json"))
    except FileNotFoundError:
        if not files.remote and not Path(files.root).is_dir():  # type: ignore[attr-defined]
            raise CacheFormatError(f"no dinofeat cache at {where} (no such folder)") from None
        raise CacheFormatError(f"{where} is not a dinofeat cache (no zarr.json)") from None
    except ValueError:
        raise CacheFormatError(f"{where}: zarr.json is not valid JSON (damaged)") from None
    except OSError as e:  # a file where the folder should be, a symlink loop, permissions
        raise CacheFormatError(f"cannot read a cache at {where}: {e.strerror or e}") from None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    meta = attrs.get(META_KEY) if isinstance(attrs, dict) else None
    if not isinstance(meta, dict):
        raise CacheFormatError(f"{where} is a zarr group without dinofeat metadata")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CacheFormatError(
            f"{where} has cache format version {version}; this build reads versions "
            + ", ".join(map(str, READABLE_VERSIONS))
        )
    refuse_damaged(where, meta)
    return meta


class MetaFile:
    """The metadata as this process last read or wrote it, and its generation (the count of metadata writes)."""

    def __init__(self, files: Files) -> None:
        self.files = files
        self._meta = read_meta(files)
        self.generation = int(self._meta.get("generation", 0))

    @property
    def data(self) -> dict[str, Any]:
        return dict(self._meta)

    def reload(self) -> None:
        self._meta = read_meta(self.files)
        self.generation = int(self._meta.get("generation", 0))

    def disk(self) -> dict[str, Any]:
        """The metadata on disk now (another writer's changes included)."""
        return dict(json.loads(self.files.read("zarr.json"))["attributes"][META_KEY])

    def disk_state(self) -> str | None:
        return self.disk().get("state")

    def check_generation(self, disk: dict[str, Any] | None = None) -> dict[str, Any]:
        """The metadata on disk, if no other writer changed it since this process last read or wrote it."""
        disk = self.disk() if disk is None else disk
        if int(disk.get("generation", 0)) != self.generation:
            raise CacheConflictError(
                f"{self.files.location} was changed by another run while this one worked (metadata generation "
                f"{disk.get('generation', 0)}, this run expected {self.generation}); this run's metadata update was "
                "not written, so the other run's work is kept. Rerun when no other run uses the cache"
            )
        return disk

    def update(self, **changes: Any) -> None:
        """Compare-and-swap: apply `changes` to the metadata on disk (never to a stale copy in memory), only if
        it is still the generation this process knows, and count the generation up. The write itself is conditional
        on the version read (an object store's If-Match; locally the flock guards it), so two runs that both
        passed the generation check cannot both write. Damaged metadata is never re-stamped."""
        raw, version = self.files.read_versioned("zarr.json")
        doc = json.loads(raw)
        disk = self.check_generation(dict(doc["attributes"][META_KEY]))
        refuse_damaged(self.files.location, disk)
        new = metadata.stamp({**disk, **changes, "generation": self.generation + 1})
        doc["attributes"][META_KEY] = new
        if self.files.replace("zarr.json", json.dumps(doc, indent=2).encode(), version) is None:
            self.check_generation()  # names the other run's generation
            raise CacheConflictError(
                f"{self.files.location}: the metadata changed while this run wrote it; nothing was written"
            )
        self._meta = new
        self.generation += 1
