"""Planning: probed sizes -> bucket per image -> row per image -> shards -> batches. Pure functions.

The shard is the unit of work: one writer writes a whole shard in one call, then marks it done. Batches are a
fixed partition of each bucket's rows (so a resumed run computes exactly the batches a fresh run would); they never
mix buckets, and may span shards so that small shards never cap the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dinofeat.buckets import AnySpec, TiedSpec, assign, make_buckets
from dinofeat.images.probe import Probe
from dinofeat.sources.archive import Member

ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


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

    keys: list[str]
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

    def rows_to_keys(self) -> dict[str, np.ndarray]:
        """bucket name -> array of positions (into keys) ordered by row."""
        out: dict[str, np.ndarray] = {}
        for i, b in enumerate(self.buckets):
            pos = np.flatnonzero(self.bucket == i)
            out[b.name] = pos[np.argsort(self.row[pos], kind="stable")]
        return out

    def histogram(self) -> list[tuple[str, int]]:
        return [(b.name, b.rows) for b in self.buckets]


def bucket_name(width: int, height: int, part: int = 0) -> str:
    return f"{width}x{height}" if part == 0 else f"{width}x{height}_{part}"


def bytes_per_image(grid: tuple[int, int], hidden: int, store_dtype: str, registers: int = 0, copies: int = 1) -> int:
    """Stored bytes of one image: `copies` feature sets (chosen layers x variants) of CLS, registers, patches."""
    h, w = grid
    return copies * (h * w + 1 + registers) * hidden * ITEMSIZE[store_dtype]


def shard_rows_for(image_bytes: int, shard_bytes: int, rows: int) -> int:
    """Images per shard: as many as fit in `shard_bytes` (at least one), never more than the bucket holds."""
    return max(1, min(rows, shard_bytes // max(1, image_bytes)))


def make_plan(
    keys: Sequence[str],
    probes: Sequence[Probe],
    spec: AnySpec,
    patch: int,
    hidden: int,
    store_dtype: str,
    shard_bytes: int,
    registers_stored: int = 0,
    part: int = 0,
    copies: int = 1,
) -> Plan:
    """Assign every probed image to a bucket and a row. Rows follow discovery order inside each bucket. `part`
    names the arrays of an incremental run (see BucketPlan)."""
    if len(keys) != len(probes):
        raise ValueError("keys and probes differ in length")
    n = len(keys)
    sizes = np.zeros((n, 2), np.int64)
    distortion = np.zeros(n, np.float32)
    probe_errors: dict[int, str] = {}
    chosen: list[tuple[int, int] | None] = []
    for i, p in enumerate(probes):
        if p.error is not None:
            probe_errors[i] = p.error
            chosen.append(None)
            continue
        a = assign(spec, p.width, p.height)
        chosen.append((a.bucket.width, a.bucket.height))
        distortion[i] = a.distortion
        sizes[i] = (p.width, p.height)
    used = sorted({c for c in chosen if c is not None}, key=lambda wh: (wh[0] / wh[1], wh[0]))
    if spec.mode == "list":  # keep the table's order
        order = {(b.width, b.height): k for k, b in enumerate(make_buckets(spec))}
        used.sort(key=lambda wh: order[wh])
    index_of = {wh: k for k, wh in enumerate(used)}
    bucket = np.full(n, -1, np.int32)
    row = np.full(n, -1, np.int64)
    counts = [0] * len(used)
    for i, c in enumerate(chosen):
        if c is None:
            continue
        k = index_of[c]
        bucket[i] = k
        row[i] = counts[k]
        counts[k] += 1
    plans = []
    for (w, h), rows in zip(used, counts, strict=True):
        per = bytes_per_image((h // patch, w // patch), hidden, store_dtype, registers_stored, copies)
        dit = spec.dit_size(w, h) if isinstance(spec, TiedSpec) else None
        plans.append(BucketPlan(w, h, patch, rows, shard_rows_for(per, shard_bytes, rows), part, dit))
    archive, offset, archives = member_locations(probes)
    return Plan(
        keys=list(keys),
        bucket=bucket,
        row=row,
        src_w=sizes[:, 0].astype(np.int32),
        src_h=sizes[:, 1].astype(np.int32),
        distortion=distortion,
        file_size=np.array([p.file_size for p in probes], np.int64),
        mtime_ns=np.array([p.mtime_ns for p in probes], np.int64),
        probe_errors=probe_errors,
        buckets=tuple(plans),
        archive=archive,
        offset=offset,
        archives=archives,
    )


def member_locations(probes: Sequence[Probe]) -> tuple[np.ndarray | None, np.ndarray | None, tuple[str, ...]]:
    """(archive index, byte offset) of every probed archive member, and the archives in first-seen order; Nones
    when no image comes from an archive."""
    names: dict[str, int] = {}
    archive = np.full(len(probes), -1, np.int32)
    offset = np.full(len(probes), -1, np.int64)
    for i, p in enumerate(probes):
        if isinstance(p.path, Member):
            archive[i] = names.setdefault(p.path.archive, len(names))
            offset[i] = p.path.offset
    if not names:
        return None, None, ()
    return archive, offset, tuple(names)


def extend_plan(old: Plan, new: Plan) -> Plan:
    """`old` followed by `new` (an incremental run's own plan, made with a fresh `part`): new keys come after the
    old ones in the index, their bucket ids point past the old buckets, rows and shards of `old` are untouched."""
    if set(old.keys) & set(new.keys):
        raise ValueError("an extension may only add keys")
    if {b.part for b in new.buckets} & {b.part for b in old.buckets}:
        raise ValueError("an extension needs a part number of its own")
    offset = len(old.buckets)
    return Plan(
        keys=[*old.keys, *new.keys],
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


def batch_size_for(tokens_per_image: int, token_budget: int, override: int | None = None) -> int:
    """Images per forward pass: a token budget, so 1024^2 and 512^2 buckets both fill the device."""
    if override is not None:
        return override
    return max(1, token_budget // max(1, tokens_per_image))


def batches_for_bucket(rows: int, batch_size: int) -> list[tuple[int, int]]:
    """A fixed partition of a bucket's rows into batches. It depends only on (rows, batch_size), never on what
    is already done, so a resumed run feeds the model exactly the batches an uninterrupted run would."""
    return [(a, min(a + batch_size, rows)) for a in range(0, rows, batch_size)]


def pending_batches(bucket: BucketPlan, pending: set[int], batch_size: int) -> list[tuple[int, int]]:
    """The batches that touch at least one pending shard (rows of done shards in them are recomputed, not
    rewritten). Batches may span shards, so a small shard never caps the batch size."""
    out = []
    for a, b in batches_for_bucket(bucket.rows, batch_size):
        first, last = a // bucket.shard_rows, (b - 1) // bucket.shard_rows
        if any(u in pending for u in range(first, last + 1)):
            out.append((a, b))
    return out


def projected_bytes(plan: Plan, hidden: int, store_dtype: str, registers_stored: int = 0, copies: int = 1) -> int:
    return sum(b.rows * bytes_per_image(b.grid, hidden, store_dtype, registers_stored, copies) for b in plan.buckets)
