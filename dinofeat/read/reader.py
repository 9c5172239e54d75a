"""FeatureCache: read-only access to a sealed cache, by key or by position, through the fast shard reader."""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinofeat.cache.layout import bf16_bits_to_float32
from dinofeat.cache.objects import Files, LocalFiles, RemoteFiles, open_files
from dinofeat.cache.shardcache import ShardCache, keep_metadata, kept_metadata
from dinofeat.cache.shardfile import HandlePool
from dinofeat.cache.store import Store
from dinofeat.errors import CacheFormatError, ChecksumError, ConfigError
from dinofeat.keys import PackedKeys, packed
from dinofeat.read.facts import CacheFacts
from dinofeat.read.generation import open_generation
from dinofeat.read.rows import row_reader
from dinofeat.storeerrors import NO_CHANGE, as_store_error, store_errors


@dataclass(frozen=True)
class Features:
    """One image's features. `patches[i, j]` is image region (i, j) of the resized (bucket-sized) image; when
    `flipped`, of the mirrored image (region (i, w - 1 - j) of the original)."""

    key: str
    cls: np.ndarray  # [D]
    patches: np.ndarray  # [h, w, D]
    bucket: tuple[int, int]  # (width, height) the image was resized to
    registers: np.ndarray | None = None  # [R, D] when stored
    flipped: bool = False
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # other stored layers: 'cls_l8', 'patches_l8', ...


class FeatureCache(CacheFacts):
    """Read-only view of the images whose status is done. Opening reads metadata and the index once; rows are
    read on demand (one positioned read each). Picklable: a DataLoader worker reopens its own file handles.

    One generation: the cache directory is held open and every shard is opened relative to it, so a reader
    keeps serving the cache it opened while `precompute --overwrite` builds a new one at the same path (the old
    one is moved aside, and deleted when the new one seals; reads of shards not yet open then fail loudly).
    An unpickled copy checks that the path still holds the cache it was made from (`cache_id`). Opened while an
    incremental run adds images, it serves the last sealed generation (`serving_last_sealed` is then True).

    Integrity (format 3): the index columns are checked against their crc32c at open, and with `verify` every row
    read is checked against the crc32c its shard's done marker recorded; a mismatch raises ChecksumError naming
    the key (cost: docs/benchmarks.md). Format 1-2 caches have no row checksums and are read unchecked.

    Remote caches (`s3://bucket/feats`, gs://, az://): one ranged GET per row, each shard's index fetched once and
    kept (in `max_open_files` shards' worth of LRU). With `local_cache` (a folder), each shard is fetched whole the
    first time a row of it is read and served from that folder afterwards (shared by DataLoader workers, ranks and
    caches). `local_cache_bytes` caps the folder: least recently opened shards are removed to make room (shards
    readers hold open still take their space until closed). Once the folder holds every shard, DataLoader workers
    of later epochs ask the store nothing (array metadata is kept there too, checked against its recorded
    checksums; docs/format.md). Credentials: the object store's usual environment."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fast: bool = True,
        verify: bool = True,
        max_open_files: int = 128,
        local_cache: str | os.PathLike[str] | None = None,
        local_cache_bytes: int | None = None,
    ) -> None:
        self._files: Files = open_files(path)
        self.path: Path | str = self._files.root if isinstance(self._files, LocalFiles) else self._files.location
        self._fast, self._verify = fast, verify
        self._local_cache = Path(local_cache) if local_cache else None
        if local_cache_bytes is not None and (local_cache_bytes <= 0 or local_cache is None):
            raise ConfigError(f"local_cache_bytes ({local_cache_bytes}) needs a local_cache folder and a size > 0")
        self._pool = HandlePool(max_open_files)  # one fd (or shard index) budget for every bucket and array
        self._root_fd: int | None = None
        self._pin()
        with store_errors(self.path, NO_CHANGE, chained=False):  # an outage ends in dinofeat's one line, in any process
            st = Store(self._files)
            self._check_same_directory()
            if isinstance(self._files, RemoteFiles) and self._local_cache is not None:
                cache_id = str(st.meta.get("cache_id", "unknown"))
                self._files.shard_cache = ShardCache(self._local_cache, cache_id, local_cache_bytes)
                keep_metadata(self._local_cache, self._files.location, st.meta)  # what this reader's workers check
            g = open_generation(st)
        self.meta, self.arrays, self.serving_last_sealed = g.meta, g.arrays, g.serving_last_sealed
        self._bucket_plans, self._expected, self._failures = g.bucket_plans, g.expected, g.failures
        # every per-image column is numpy (keys packed, dinofeat.keys): forked workers share its pages
        self._keys: PackedKeys = packed(g.keys)
        self._bucket, self._row = g.bucket, g.row
        # bucket ids group by size, so images added by incremental runs batch with the older ones of their size
        self._sizes = list(dict.fromkeys(b.size for b in self._bucket_plans))
        self._size_of_group = np.array([self._sizes.index(b.size) for b in self._bucket_plans], np.int32)
        self._bucket_ids = self._size_of_group[self._bucket]
        self._readers: dict[tuple[int, str], Any] = {}

    def _pin(self) -> None:
        """Local caches: hold the directory open and read every file relative to it (one generation)."""
        if isinstance(self._files, LocalFiles):
            self._root_fd = _open_dir(Path(self.path))
            self._files = LocalFiles(Path(self.path), self._root_fd)

    def _check_same_directory(self) -> None:
        if self._root_fd is not None and os.fstat(self._root_fd).st_ino != os.stat(self.path).st_ino:
            os.close(self._root_fd)  # replaced between the two opens
            self._root_fd = None
            raise CacheFormatError(f"{self.path} was replaced while opening it (--overwrite running?); open it again")

    # ---- pickling: nothing heavy crosses into workers --------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = {}
        state["_root_fd"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pin()
        with store_errors(self.path, NO_CHANGE, chained=False):  # a DataLoader worker's own connections
            now = self._cache_id_now()
        if now != self.meta.get("cache_id"):
            if self._root_fd is not None:
                os.close(self._root_fd)
            self._root_fd = None
            raise CacheFormatError(
                f"{self.path} is no longer the cache this reader opened (it was rebuilt with --overwrite); "
                "open a new FeatureCache"
            )

    def _cache_id_now(self) -> object:
        """The cache_id at this reader's path now. A remote cache read through a local shard cache: as the last
        reader that opened it kept it there, so that DataLoader workers of later epochs never ask the store (a
        rebuild is seen once a reader opens the cache again; shards are kept per cache_id, and a shard of another
        generation fetched meanwhile fails its row checksums). Otherwise: from the cache itself."""
        if isinstance(self._files, RemoteFiles) and self._local_cache is not None:
            kept = kept_metadata(self._local_cache, self._files.location)
            if kept is not None:
                return kept.get("cache_id")
        return Store(self._files).meta.get("cache_id")

    def __del__(self) -> None:
        self.close()

    # ---- metadata ---------------------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        """The cache is in an object store (reads are ranged GETs)."""
        return self._files.remote

    def dit_size(self, i: int) -> tuple[int, int] | None:
        """Tied caches: (width, height) of the DiT bucket of the image at position i, as recorded at planning."""
        return self._bucket_plans[int(self._bucket[i])].dit

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(width, height) of each bucket id."""
        return list(self._sizes)

    @property
    def bucket_ids(self) -> np.ndarray:
        """Bucket id (an index into `buckets`) of every position: what BucketBatchSampler groups by."""
        return self._bucket_ids

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) the image at position i was resized to."""
        return self._sizes[int(self._bucket_ids[i])]

    @property
    def failures(self) -> dict[str, str]:
        return dict(self._failures)

    # ---- access -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        """Every key, in position order (a new list each call: the reader itself keeps them packed)."""
        return list(self._keys)

    def key(self, i: int) -> str:
        return self._keys.key(operator.index(i))

    def index_of(self, key: str) -> int:
        """The position of `key`: a binary search of the packed keys (no dict of every key is built)."""
        i = self._keys.find(key) if isinstance(key, str) else -1
        if i < 0:
            why = self._failures.get(key) if isinstance(key, str) else None
            raise KeyError(f"{key!r} failed during precompute: {why}" if why else f"{key!r} is not in the cache")
        return i

    def __contains__(self, key: str) -> bool:
        try:
            self.index_of(key)
        except KeyError:
            return False
        return True

    def _reader(self, b: int, name: str) -> Any:
        rd = self._readers.get((b, name))
        if rd is None:
            if name not in self.arrays.names():
                raise KeyError(f"array {name!r} is not stored in this cache; it has {', '.join(self.arrays.names())}")
            bucket = self._bucket_plans[b]
            expected = self._expected.get((bucket.name, name))
            rd = row_reader(self._files, self.meta, bucket, name, self._pool, self._fast, self._verify, expected)
            self._readers[(b, name)] = rd
        return rd

    def _as_float(self, a: np.ndarray) -> np.ndarray:
        return bf16_bits_to_float32(a) if self.meta["dtypes"]["store"] == "bf16" else a

    def read(self, i: int, name: str) -> np.ndarray:
        """One array for position i: 'cls', 'patches', 'registers', or another stored one ('patches_l8',
        'patches_flip'; see `arrays`)."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        b, r = int(self._bucket[i]), int(self._row[i])
        try:
            return self._as_float(self._reader(b, name).read_row(r))
        except ChecksumError as e:
            why = f"{self.key(i)!r} ({name}): {e}. Run `dinofeat validate` to list every damaged row"
            raise ChecksumError(why) from None
        except Exception as e:
            error = as_store_error(e, self.path)
            if error is None:
                raise
            raise error from None

    def __getitem__(self, i: int | str) -> Features:
        return self.get(i)

    def get(
        self, i: int | str, *, flip: bool = False, layers: tuple[int, ...] | None = None, registers: bool = True
    ) -> Features:
        """Features of position (or key) i: of the mirrored image with `flip` (stored with --flip); `layers` picks
        the other stored layers to read besides the primary one (None: all, (): none)."""
        if isinstance(i, str):
            i = self.index_of(i)
        a = self.arrays
        if flip and not a.flip:
            raise KeyError(f"{self.path} stores no mirrored-image features (precompute with --flip)")
        regs = self.read(i, a.name("registers", flip=flip)) if a.registers and registers else None
        extra = a.extra_layer_names(flip, layers)
        return Features(
            self.key(i),
            self.read(i, a.name("cls", flip=flip)),
            self.read(i, a.name("patches", flip=flip)),
            self.size(i),
            regs,
            flip,
            {s: self.read(i, n) for s, n in extra.items()},
        )

    def close(self) -> None:
        if hasattr(self, "_readers"):  # __del__ of a cache whose __init__ raised
            self._readers.clear()
            self._pool.clear()
        fd, self._root_fd = getattr(self, "_root_fd", None), None
        if fd is not None:
            os.close(fd)


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise CacheFormatError(f"no dinofeat cache at {path} (no such folder)") from None
