"""An open cache: its files, its zarr root, and one part per concern, each owning its own files.

    st.metafile   the metadata (checked at open, compare-and-swap on write)      dinofeat.cache.metafile
    st.index      the index and the plan's records                                dinofeat.cache.index
    st.shards     the feature arrays and their shard objects                      dinofeat.cache.shards
    st.markers    done markers and their summary                                  dinofeat.cache.markers
    st.stats      per-shard channel statistics                                    dinofeat.cache.stats

What happens to a cache over its life (create, resume, extend, seal, retire, repair, prune) is
dinofeat.cache.lifecycle; layout and rules are in docs/format.md. Concurrency rules (zarr 3.1 loses data otherwise):
arrays are created once at their planned size; a shard is written whole, in one call, by one writer; its done
marker is written after it; readers trust only marked shards.
"""

from __future__ import annotations

import os
from typing import Any

import zarr

from dinofeat.cache.arrays import ArraySet
from dinofeat.cache.index import Index
from dinofeat.cache.markers import Markers
from dinofeat.cache.metafile import MetaFile
from dinofeat.cache.objects import Files, open_files
from dinofeat.cache.shards import Shards
from dinofeat.cache.stats import ShardStats


def open_group(files: Files, mode: str) -> Any:
    """The zarr group at the cache's root: a local path, or zarr's FsspecStore over the cache's object prefix."""
    if files.remote:
        store = zarr.storage.FsspecStore.from_url(files.zarr_store(), read_only=mode == "r")
        return zarr.open_group(store, mode=mode)
    return zarr.open_group(files.zarr_store(), mode=mode)


class Store:
    """An open cache (a directory, or a prefix in an object store). `mode` "r" reads; anything else may write.
    Raises CacheFormatError at once for what is not a dinofeat cache this build can read, or whose metadata is
    damaged."""

    def __init__(self, path: str | os.PathLike[str] | Files, mode: str = "r") -> None:
        self.files = path if isinstance(path, Files) else open_files(path)
        self.path = self.files.location  # what messages name
        self.metafile = MetaFile(self.files)
        self._mode = "r" if mode == "r" else "r+"
        self.root = open_group(self.files, self._mode)
        self.index = Index(self)
        self.shards = Shards(self)
        self.markers = Markers(self)
        self.stats = ShardStats(self)

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata as this store last read or wrote it (a copy)."""
        return self.metafile.data

    @property
    def format_version(self) -> int:
        return int(self.meta["format_version"])

    @property
    def arrays(self) -> ArraySet:
        """The feature arrays this cache holds (blocks x variants x token kinds)."""
        return ArraySet.from_meta(self.meta)

    def reload(self) -> None:
        """Read the metadata and the zarr root again (another run switched the index since this store opened)."""
        self.root = open_group(self.files, self._mode)
        self.metafile.reload()
        self.shards.forget()
