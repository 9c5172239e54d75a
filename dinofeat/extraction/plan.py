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
from dinofeat.images.probe import Probe
from dinofeat.sources.archive import Member

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
