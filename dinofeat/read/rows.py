"""How a reader reads one array's rows: the fast path (dinofeat.cache.shardfile: one positioned read per row,
checked against its crc32c) when the array has the layout it reads, zarr-python otherwise. Either way the array's
zarr.json is checked first: against the checksum the metadata records, and its shape against its bucket's record."""

from __future__ import annotations

from typing import Any

import numpy as np

from dinofeat.cache import metadata
from dinofeat.cache.checksum import RowCrcs
from dinofeat.cache.layout import BucketPlan, array_shape
from dinofeat.cache.objects import Files
from dinofeat.cache.shardfile import HandlePool, ShardReader, UnsupportedLayout, read_layout
from dinofeat.cache.store import Store
from dinofeat.errors import CacheFormatError


def row_reader(
    files: Files,
    meta: dict[str, Any],
    bucket: BucketPlan,
    name: str,
    pool: HandlePool,
    fast: bool = True,
    verify: bool = True,
    expected: RowCrcs | None = None,
) -> Any:
    """A reader of `name`'s rows in `bucket`, with `read_row(row)`."""
    rel = f"buckets/{bucket.name}/{name}"
    try:
        layout = read_layout(rel, files, metadata.array_checksum(meta, bucket.name, name))
        check_shape(files.location, rel, layout.shape, meta, name, bucket)
    except FileNotFoundError:
        raise CacheFormatError(
            f"{files.location}: {rel} is missing (the cache was rebuilt with --overwrite since this reader opened "
            "it, or it is damaged); open the cache again"
        ) from None
    except UnsupportedLayout:
        layout = None
    if fast and layout is not None:
        return ShardReader(layout, pool, verify=verify, expected=expected)
    return ZarrRowReader(Store(files), bucket.name, name)


def check_shape(where: str, rel: str, shape: tuple[int, ...], meta: dict[str, Any], name: str, b: BucketPlan) -> None:
    """An array must hold the rows and the grid its bucket's record says (caches made before 0.6 have no
    zarr.json checksums: this is what catches an edited shape there)."""
    regs = int(meta.get("registers_stored") or 0)
    want = array_shape(name, b.rows, b.grid, int(meta["hidden_size"]), regs)
    if tuple(shape) != want:
        raise CacheFormatError(f"{where}: {rel} has shape {tuple(shape)}, its bucket says {want} (damaged)")


class ZarrRowReader:
    """Fallback through zarr-python for layouts the fast path does not read."""

    def __init__(self, st: Store, bucket: str, name: str) -> None:
        self.arr = st.shards.array(bucket, name)

    def read_row(self, row: int) -> np.ndarray:
        return np.asarray(self.arr[row])

    def close(self) -> None:
        pass
