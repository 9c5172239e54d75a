"""What a cache is made of, as data: format versions, status codes, stored dtypes, the index columns, and the plan
(buckets, rows, shards) that the index records. The planner in dinofeat.extraction makes plans; the cache layer
stores and reads them; neither needs the other's code for it."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dinofeat.cache.arrays import base_of
from dinofeat.keys import joined, packed

# 2: incremental parts (bucket arrays "WxH_k"), index group named in metadata.index_group
# 3: crc32c per stored chunk (shard inner codec) recorded in done markers, crc32c per index column in the metadata,
#    `last_sealed` (the generation new readers get while an incremental run works)
# 4: a version 3 cache whose feature arrays are not only the last block of the image (--layers, --flip,
#    --no-layer-norm): `metadata.arrays` names them, and readers that do not know it (dinofeat <= 0.3) must refuse it
#    rather than serve block 4 as the model's output. Default caches stay version 3.
# 5: a version 3 or 4 cache with vacant rows: an image replaced by one of other dimensions was planned again into
#    another bucket, so its old row is held by no image. Readers that assume every row has an image (dinofeat
#    <= 0.6.1) would pair the rows after it with the wrong keys when they write; they must refuse it.
FORMAT_VERSION = 3
FEATURE_SETS_VERSION = 4
VACANT_ROWS_VERSION = 5
WRITABLE_VERSIONS = (FORMAT_VERSION, FEATURE_SETS_VERSION, VACANT_ROWS_VERSION)
READABLE_VERSIONS = (1, 2, 3, 4, 5)  # a version 1 cache is a version 2 cache with one part and its index in "index"
META_KEY = "dinofeat"
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
STATUS_PRUNED = 3  # done, then gone from the source and dropped with --prune: never served or counted again
# zarr 3.1 has no bfloat16: bf16 features are stored as their uint16 bit patterns (exact; see docs/format.md)
ZARR_DTYPES = {"fp16": "float16", "bf16": "uint16", "fp32": "float32"}
INDEX_COLUMNS = ("key", "bucket", "row", "src_w", "src_h", "distortion", "file_size", "mtime_ns")
SOURCE_COLUMNS = ("archive", "offset")  # tar shard sources only: metadata.source_archives[archive], byte offset
ARRAY_CONFIG = {"write_empty_chunks": True}  # whole-shard writes, and ~2x faster sharded writes in zarr 3.1
# the failure recorded for a vacant row (one no image holds: its image was planned again into another bucket)
VACANT = "vacant: its image changed dimensions and was planned again into another bucket"


def np_dtype(store_dtype: str) -> np.dtype:
    return np.dtype(ZARR_DTYPES[store_dtype])


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact: bf16 is the top half of an fp32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class BucketPlan:
    """One bucket's arrays: `rows` images, `shard_rows` images per shard (the last shard may be short).

    `part` numbers the run that planned the arrays: 0 for the first, k for the k-th incremental run. Images added
    later get arrays of their own, so finished shards are never rewritten. Part 0 is named "WxH", part k "WxH_k".
    """

    width: int
    height: int
    patch: int
    rows: int
    shard_rows: int
    part: int = 0
    dit: tuple[int, int] | None = None  # (width, height) of the DiT bucket this one is tied to (a TiedSpec)

    @property
    def name(self) -> str:
        return bucket_name(self.width, self.height, self.part)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.patch, self.width // self.patch

    @property
    def num_shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def shard_range(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range for bucket {self.name} ({self.num_shards} shards)")
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)


@dataclass(frozen=True)
class ShardRef:
    """A unit of work, numbered globally (`ordinal`) so shards can be dealt to ranks as ordinal % world."""

    bucket: str
    shard: int
    start: int
    stop: int
    ordinal: int


@dataclass
class Plan:
    """Where every image goes. Arrays are parallel to `keys` (discovery order); failed probes have bucket -1."""

    keys: Sequence[str]  # packed (dinofeat/keys.py) when planned or read from the index; tests may give a list
    bucket: np.ndarray  # int32 index into `buckets`, -1 when the header probe failed
    row: np.ndarray  # int64 row inside the bucket, -1 when failed
    src_w: np.ndarray
    src_h: np.ndarray
    distortion: np.ndarray  # float32 |log(bucket AR / image AR)|
    file_size: np.ndarray
    mtime_ns: np.ndarray
    probe_errors: dict[int, str]
    buckets: tuple[BucketPlan, ...]
    # tar shard sources: where each image's bytes are (index into `archives`, byte offset), so ranks other than the
    # one that listed the shards read them from the plan instead of listing them again; None for files
    archive: np.ndarray | None = None
    offset: np.ndarray | None = None
    archives: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.keys)

    def shards(self) -> list[ShardRef]:
        out: list[ShardRef] = []
        for b in self.buckets:
            for u in range(b.num_shards):
                start, stop = b.shard_range(u)
                out.append(ShardRef(b.name, u, start, stop, len(out)))
        return out

    def shard_of(self, i: int) -> tuple[str, int] | None:
        """(bucket name, shard) holding image i; None for an image whose probe failed."""
        if self.bucket[i] < 0:
            return None
        b = self.buckets[int(self.bucket[i])]
        return b.name, int(self.row[i]) // b.shard_rows

    def rows_to_keys(self) -> dict[str, np.ndarray]:
        """bucket name -> for each of its rows, the position (into keys) of the image it holds; -1 for a vacant row
        (its image was planned again into another bucket, see `extend_plan`)."""
        out: dict[str, np.ndarray] = {}
        for i, b in enumerate(self.buckets):
            pos = np.flatnonzero(self.bucket == i)
            rows = self.row[pos]
            ok = (rows >= 0) & (rows < b.rows)  # a damaged index: validate names it
            held = np.full(b.rows, -1, np.int64)
            held[rows[ok]] = pos[ok]
            out[b.name] = held
        return out

    def vacant_rows(self) -> int:
        """How many rows of the buckets no image holds."""
        return sum(b.rows for b in self.buckets) - int((self.bucket >= 0).sum())

    def histogram(self) -> list[tuple[str, int]]:
        return [(b.name, b.rows) for b in self.buckets]


def bucket_name(width: int, height: int, part: int = 0) -> str:
    return f"{width}x{height}" if part == 0 else f"{width}x{height}_{part}"


def bucket_record(b: BucketPlan) -> dict[str, Any]:
    """A bucket's entry in metadata.buckets."""
    return {
        "name": b.name,
        "width": b.width,
        "height": b.height,
        "grid": list(b.grid),
        "rows": b.rows,
        "shard_rows": b.shard_rows,
        "part": b.part,
    } | ({"dit_size": list(b.dit)} if b.dit else {})


def array_shape(name: str, rows: int, grid: tuple[int, int], hidden: int, registers: int) -> tuple[int, ...]:
    """Shape of a feature array by its token kind (see dinofeat.cache.arrays)."""
    h, w = grid
    return {"cls": (rows, hidden), "patches": (rows, h, w, hidden), "registers": (rows, registers, hidden)}[
        base_of(name)
    ]


def extend_plan(old: Plan, new: Plan, moved: Collection[str] = ()) -> Plan:
    """`old` followed by `new` (an incremental run's own plan, made with a fresh `part`): new keys come after the
    old ones in the index, their bucket ids point past the old buckets, rows and shards of `old` are untouched.

    `moved`: keys of `old` that `new` plans again (their image changed dimensions): each keeps its place in the
    index and takes `new`'s bucket, row, size and source facts; the row it held in `old` becomes vacant."""
    old_keys, new_keys = packed(old.keys), packed(new.keys)
    at_old = old_keys.positions(new_keys)  # each new key's place in old, -1 for a key old does not hold
    again_mask = at_old >= 0
    if again_mask.any() and not {new_keys[int(j)] for j in np.flatnonzero(again_mask)} <= set(moved):
        raise ValueError("an extension may only add keys, or plan again the keys it is told to move")
    if {b.part for b in new.buckets} & {b.part for b in old.buckets}:
        raise ValueError("an extension needs a part number of its own")
    both = _appended(old, new)
    if not again_mask.any():
        return both
    keep = np.concatenate([np.arange(len(old)), len(old) + np.flatnonzero(~again_mask)])
    src = len(old) + np.flatnonzero(again_mask)
    dst = at_old[again_mask]
    columns = {}
    for name in ("bucket", "row", "src_w", "src_h", "distortion", "file_size", "mtime_ns", "archive", "offset"):
        col = getattr(both, name)
        if col is not None:
            col = col.copy()
            col[dst] = col[src]
            columns[name] = col[keep]
    moved_old = set(dst.tolist())  # old positions planned again: their old probe error (if any) no longer holds
    why = {i: r for i, r in both.probe_errors.items() if i >= len(old) or i not in moved_old}
    why |= {int(d): both.probe_errors[int(s)] for s, d in zip(src, dst, strict=True) if int(s) in both.probe_errors}
    new_pos = np.full(len(both), -1, np.int64)
    new_pos[keep] = np.arange(len(keep))
    errors = {int(new_pos[i]): r for i, r in why.items() if new_pos[i] >= 0}
    return replace(both, keys=packed(both.keys).take(keep), probe_errors=dict(sorted(errors.items())), **columns)


def _appended(old: Plan, new: Plan) -> Plan:
    """Every key of `new` after those of `old`, bucket ids and archive indices remapped into the union."""
    offset = len(old.buckets)
    return Plan(
        keys=joined([packed(old.keys), packed(new.keys)]),
        bucket=np.concatenate([old.bucket, np.where(new.bucket >= 0, new.bucket + offset, -1)]).astype(np.int32),
        row=np.concatenate([old.row, new.row]).astype(np.int64),
        src_w=np.concatenate([old.src_w, new.src_w]).astype(np.int32),
        src_h=np.concatenate([old.src_h, new.src_h]).astype(np.int32),
        distortion=np.concatenate([old.distortion, new.distortion]).astype(np.float32),
        file_size=np.concatenate([old.file_size, new.file_size]).astype(np.int64),
        mtime_ns=np.concatenate([old.mtime_ns, new.mtime_ns]).astype(np.int64),
        probe_errors={**old.probe_errors, **{len(old) + i: why for i, why in new.probe_errors.items()}},
        buckets=(*old.buckets, *new.buckets),
        **_merged_locations(old, new),
    )


def _merged_locations(old: Plan, new: Plan) -> dict[str, object]:
    """The archive columns of `old` followed by `new`'s, `new`'s archive indices remapped into the union list."""
    if old.archive is None and new.archive is None:
        return {}
    archives = list(dict.fromkeys([*old.archives, *new.archives]))
    # new archive index -> union index; the trailing -1 keeps "not from an archive" (-1) as -1
    remap = np.array([archives.index(a) for a in new.archives] + [-1], np.int32)
    (old_a, old_o), (new_a, new_o) = _locations(old), _locations(new)
    return {
        "archive": np.concatenate([old_a, remap[new_a]]),
        "offset": np.concatenate([old_o, new_o]),
        "archives": tuple(archives),
    }


def _locations(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """The plan's (archive, offset) columns, all -1 when its images are files."""
    if plan.archive is None or plan.offset is None:
        return np.full(len(plan), -1, np.int32), np.full(len(plan), -1, np.int64)
    return plan.archive.astype(np.int32), plan.offset.astype(np.int64)
