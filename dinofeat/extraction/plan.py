"""Planning: probed sizes -> bucket per image -> row per image -> shards -> batches. Pure functions.

The shard is the unit of work: one writer writes a whole shard in one call, then marks it done. Batches are a
fixed partition of each bucket's rows (so a resumed run computes exactly the batches a fresh run would); they never
mix buckets, and may span shards so that small shards never cap the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinofeat.buckets import AnySpec, TiedSpec, assign, make_buckets
from dinofeat.cache.layout import BucketPlan, Plan, extend_plan  # noqa: F401  (extend_plan: planning's API)
from dinofeat.images.probe import Probe, Probes
from dinofeat.keys import PackedKeys
from dinofeat.sources.archive import Member
from dinofeat.sources.members import Members

ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


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
    members: Members | None = None,
) -> Plan:
    """Assign every probed image to a bucket and a row. Rows follow discovery order inside each bucket. `part`
    names the arrays of an incremental run (see BucketPlan). `members`: where each image of an archive source is
    (else taken from the probes' paths, when they are Members). Vectorised over the columns: a size is assigned
    its bucket once, however many images share it; `keys` are kept as given (packed ones are not copied)."""
    if len(keys) != len(probes):
        raise ValueError("keys and probes differ in length")
    pr = probes if isinstance(probes, Probes) else Probes.of(probes)
    n = len(keys)
    ok = np.ones(n, bool)
    ok[list(pr.errors)] = False
    wh = np.stack([pr.width, pr.height], axis=1).astype(np.int64)[ok]
    sizes, which = np.unique(wh, axis=0, return_inverse=True)
    assigned = [assign(spec, int(w), int(h)) for w, h in sizes]
    chosen = np.array([(a.bucket.width, a.bucket.height) for a in assigned], np.int64).reshape(-1, 2)
    used = sorted({(int(w), int(h)) for w, h in chosen}, key=lambda b: (b[0] / b[1], b[0]))
    if spec.mode == "list":  # keep the table's order
        order = {(b.width, b.height): k for k, b in enumerate(make_buckets(spec))}
        used.sort(key=lambda b: order[b])
    index_of = {b: k for k, b in enumerate(used)}
    size_bucket = np.array([index_of[(int(w), int(h))] for w, h in chosen], np.int32)
    bucket = np.full(n, -1, np.int32)
    bucket[ok] = size_bucket[which.reshape(-1)]
    distortion = np.zeros(n, np.float32)
    distortion[ok] = np.array([a.distortion for a in assigned], np.float32)[which.reshape(-1)]
    counts = np.bincount(bucket[ok], minlength=len(used))
    row = np.full(n, -1, np.int64)
    held = np.flatnonzero(ok)
    by_bucket = held[np.argsort(bucket[held], kind="stable")]  # each bucket's images, in discovery order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    row[by_bucket] = np.arange(len(by_bucket)) - starts[bucket[by_bucket]]
    plans = []
    for (w, h), rows in zip(used, counts.tolist(), strict=True):
        per = bytes_per_image((h // patch, w // patch), hidden, store_dtype, registers_stored, copies)
        dit = spec.dit_size(w, h) if isinstance(spec, TiedSpec) else None
        plans.append(BucketPlan(w, h, patch, rows, shard_rows_for(per, shard_bytes, rows), part, dit))
    if members is not None:
        archive, offset, archives = compact_locations(members)
    elif isinstance(probes, Probes):  # columns carry no paths: files (an archive source passes its members)
        archive, offset, archives = None, None, ()
    else:
        archive, offset, archives = member_locations([p.path for p in probes])
    return Plan(
        keys=keys if isinstance(keys, PackedKeys) else list(keys),
        bucket=bucket,
        row=row,
        src_w=np.where(ok, pr.width, 0).astype(np.int32),
        src_h=np.where(ok, pr.height, 0).astype(np.int32),
        distortion=distortion,
        file_size=pr.file_size.astype(np.int64),
        mtime_ns=pr.mtime_ns.astype(np.int64),
        probe_errors=dict(sorted(pr.errors.items())),
        buckets=tuple(plans),
        archive=archive,
        offset=offset,
        archives=archives,
    )


def compact_locations(members: Members) -> tuple[np.ndarray | None, np.ndarray | None, tuple[str, ...]]:
    """(archive index, offset) of every image and the archives it uses, in first-seen order (as a plan records
    them: an archive no image of this plan comes from is left out)."""
    if not len(members):
        return None, None, ()
    used, first = np.unique(members.archive, return_index=True)
    by_first = used[np.argsort(first)]
    remap = np.full(len(members.archives), -1, np.int32)
    remap[by_first] = np.arange(len(by_first))
    return remap[members.archive], members.offset.astype(np.int64), tuple(members.archives[a] for a in by_first)


def member_locations(paths: Sequence[object]) -> tuple[np.ndarray | None, np.ndarray | None, tuple[str, ...]]:
    """(archive index, byte offset) of every image whose location is an archive Member, and the archives in
    first-seen order; Nones when no image comes from an archive."""
    names: dict[str, int] = {}
    archive = np.full(len(paths), -1, np.int32)
    offset = np.full(len(paths), -1, np.int64)
    for i, p in enumerate(paths):
        if isinstance(p, Member):
            archive[i] = names.setdefault(p.archive, len(names))
            offset[i] = p.offset
    if not names:
        return None, None, ()
    return archive, offset, tuple(names)


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
