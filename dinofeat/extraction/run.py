"""The precompute runner: discover -> probe -> bucket -> plan -> decode+resize -> batch -> model -> slice -> write.

A reader -> mapper -> writer loop: DataLoader workers decode (reader), the encoder runs in the main thread
(mapper), a background thread writes whole shards (writer). Everything is resumable at shard granularity.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dinofeat import __version__
from dinofeat.buckets import AnySpec, BucketSpecError, TiedSpec, make_buckets, spec_for
from dinofeat.cache import maintenance, store
from dinofeat.cache.arrays import ArraySet, parse_layers
from dinofeat.cache.lock import cache_lock
from dinofeat.cache.objects import cache_location
from dinofeat.cache.store import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PENDING,
    STATUS_PRUNED,
    Store,
    marker_status,
    merged_channel_stats,
)
from dinofeat.errors import CacheFormatError, CacheMismatchError, ConfigError, DinofeatError, SourceChangedError
from dinofeat.extraction import ranks
from dinofeat.extraction.config import FINGERPRINTED, ExtractConfig
from dinofeat.extraction.config import inherit as inherit_settings
from dinofeat.extraction.loader import BatchJob, DecodedBatch, make_loader
from dinofeat.extraction.model import Encoder, ModelInfo, load_model_info, resolve_device, resolve_dtype
from dinofeat.extraction.plan import (
    BucketPlan,
    Plan,
    batch_size_for,
    extend_plan,
    make_plan,
    pending_batches,
    projected_bytes,
)
from dinofeat.extraction.tokens import split_tokens
from dinofeat.extraction.writer import ShardResult, ShardWriter
from dinofeat.images.probe import probe_many
from dinofeat.paths import check_cache_dir, local_path
from dinofeat.sources.archive import Member, is_archive_source
from dinofeat.sources.discover import Source, discover, no_images, source_root
from dinofeat.storeerrors import store_errors

DEFAULT_TOKEN_BUDGET = {"cuda": 131072, "cpu": 8192}


@dataclass
class Summary:
    """What a run did; the CLI prints it, the Python API returns it."""

    cache: str
    total: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0
    processed: int = 0  # images computed by this run
    seconds: float = 0.0
    bytes_written: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    sealed: bool = False
    new_files: int = 0  # in the folder but not planned (a --limit run leaves them out)
    removed_files: int = 0  # planned but gone from the folder; their features are kept
    appended: int = 0  # images this run added to an existing cache (an incremental run)
    removed_examples: list[str] = field(default_factory=list)
    world_size: int = 1
    rank: int = 0
    cleaned_files: int = 0
    dry_run: bool = False
    histogram: list[tuple[str, int]] = field(default_factory=list)
    projected_bytes: int = 0
    pruned: int = 0  # images dropped with --prune, by this run or an earlier one (not served, not counted as done)
    pruned_now: int = 0  # dropped by this run
    repaired: list[str] = field(default_factory=list)  # shards --repair found damaged and re-extracted
    damaged: list[str] = field(default_factory=list)  # marked shards whose files are gone (rerun with --repair)
    inherited: dict[str, Any] = field(default_factory=dict)  # settings taken from the cache (not given this run)
    version: str = __version__

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


@dataclass(frozen=True)
class Prepared:
    """Everything checked before any image is touched."""

    config: ExtractConfig
    model: ModelInfo
    spec: AnySpec
    device: torch.device
    dtype: str
    arrays: ArraySet

    @property
    def registers_stored(self) -> int:
        return self.model.num_register_tokens if self.config.keep_registers else 0

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the stored numbers. A rerun with any of these different is refused."""
        return {
            "model_id": self.model.id,
            "model_revision": self.model.revision,
            "model_config_hash": self.model.config_hash,
            "compute_dtype": self.dtype,
            "store_dtype": self.config.store_dtype,
            "bucket_spec": self.spec.to_dict(),
            "bucket_spec_hash": self.spec.hash,
            "recipe": self.config.recipe.to_dict(),
            "keep_registers": self.config.keep_registers,
            "limit": self.config.limit,
        } | ({} if self.arrays.is_default(self.model.num_layers) else {"features": self._features()})

    def _features(self) -> dict[str, Any]:
        a = self.arrays
        return {"layers": list(a.layers), "layer_norm": a.layer_norm, "flip": a.flip}


def prepare(config: ExtractConfig, group: ranks.Group | None = None) -> Prepared:
    """Validate settings against the model's config; raises ConfigError before any work starts."""
    info = load_model_info(config.model, config.revision)
    spec = bucket_spec(config, info.patch_size)
    check_bucket_pixels(spec, config.recipe.max_pixels)
    device = resolve_device(ranks.device_for(group or ranks.Group(), config.device))
    layers = parse_layers(config.layers, info.num_layers)
    arrays = ArraySet(layers, config.flip, config.keep_registers and info.num_register_tokens > 0, config.layer_norm)
    return Prepared(config, info, spec, device, resolve_dtype(config.dtype, device), arrays)


def bucket_spec(config: ExtractConfig, patch: int) -> AnySpec:
    """The DINO-side bucket spec; tied to the DiT's own buckets when `dit_scale` is set. ConfigError if the sides
    cannot be multiples of the patch (or, tied, the grids cannot align)."""
    try:
        return spec_for(
            config.area,
            config.multiple,
            config.min_ar,
            config.max_ar,
            config.num_buckets,
            config.bucket_mode,
            patch,
            config.dit_scale,
            config.dit_token,
            config.bucket_version,
        )
    except BucketSpecError as e:
        raise ConfigError(str(e)) from e


def check_bucket_pixels(spec: AnySpec, max_pixels: int) -> None:
    """ConfigError when the largest bucket is beyond what can be decoded and held (the recipe's pixel limit, PIL's
    decompression-bomb threshold by default): an --area typo must not create a cache and then fail for lack of
    memory."""
    side = spec.dit.area if isinstance(spec, TiedSpec) else spec.area
    if spec.mode == "fit":  # every image gets its own size of about area^2 pixels (on the DINO side)
        w, h = spec.dino_size(side, side) if isinstance(spec, TiedSpec) else (side, side)
        biggest = w * h
    else:
        biggest = max(b.width * b.height for b in make_buckets(spec))
    if biggest > max_pixels:
        raise ConfigError(
            f"area {side} gives buckets of {biggest:,} pixels, more than the {max_pixels:,} an image may have "
            f"(largest area about {int(max_pixels**0.5):,}); check --area"
        )


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """One line per differing leaf, named by its dotted path (`recipe.jpeg_draft`), so a refusal says exactly
    which setting changed."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: cache has {a!r}, this run wants {b!r}")
    return out


def _diff_hint(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What to do about the one change users hit by upgrading: dinofeat 0.1's default drafted JPEGs."""
    if old.get("recipe", {}).get("jpeg_draft") is True and new.get("recipe", {}).get("jpeg_draft") != 1:
        return (
            "\nThis cache was made by dinofeat 0.1, whose default decoded JPEGs in the DCT domain (draft), which "
            "distorts hard edges. JPEGs are now decoded in full by default. Rebuild the cache with --overwrite "
            "(recommended), or finish it with the old recipe: --jpeg-draft --draft-gap 1."
        )
    return ""


def build_plan(src: Source, prep: Prepared, progress: bool, part: int = 0) -> Plan:
    paths = [src.path(k) for k in src.keys]
    with tqdm(total=len(paths), desc="probe", unit="img", disable=not progress) as bar:
        probes = probe_many(paths, prep.config.recipe.max_pixels, prep.config.probe_threads, bar.update)
    shard_bytes = int(prep.config.shard_mb * 2**20)
    return make_plan(
        list(src.keys),
        probes,
        prep.spec,
        prep.model.patch_size,
        prep.model.hidden_size,
        prep.config.store_dtype,
        shard_bytes,
        prep.registers_stored,
        part,
        prep.arrays.copies,
    )


def _metadata(prep: Prepared, plan: Plan, src: Source) -> dict[str, Any]:
    return {
        "dinofeat_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": prep.model.to_dict(),
        "random_weights": prep.model.random,
        "fingerprint": prep.fingerprint(),
        "dtypes": {"compute": prep.dtype, "store": prep.config.store_dtype},
        "patch_size": prep.model.patch_size,
        "num_register_tokens": prep.model.num_register_tokens,
        "registers_stored": prep.registers_stored,
        "arrays": prep.arrays.to_dict(),
        "hidden_size": prep.model.hidden_size,
        "bucket_spec": prep.spec.to_dict(),
        "bucket_spec_hash": prep.spec.hash,
        "recipe": prep.config.recipe.to_dict(),
        "source_root": str(src.root),
        "num_images": len(plan),
        "buckets": [store.bucket_record(b) for b in plan.buckets],
    }


def _check_fingerprint(st: Store, prep: Prepared) -> None:
    if st.format_version not in store.WRITABLE_VERSIONS:
        raise CacheMismatchError(
            f"{st.path} is a format {st.format_version} cache (dinofeat 0.2 or older); this version reads it but "
            f"adds only to format {store.FORMAT_VERSION} caches, whose chunks carry checksums. Rebuild it with "
            "--overwrite, or finish it with the dinofeat that started it"
        )
    old, new = st.meta.get("fingerprint", {}), prep.fingerprint()
    diff = fingerprint_diff(old, new)
    if diff:
        raise CacheMismatchError(
            f"{st.path} was made with different settings; refusing to reuse it (pass --overwrite to start over):\n  "
            + "\n  ".join(diff)
            + _diff_hint(old, new)
        )


def open_or_create(
    cache: Path | str, src: Source, prep: Prepared, overwrite: bool, progress: bool
) -> tuple[Store, Plan, int]:
    """Reuse a matching cache (resume), extend it with images new to the folder (incremental), refuse a mismatched
    one, or plan and create a new one. Returns the store, the plan and how many images were appended."""
    if overwrite:
        store.retire(cache)  # moved aside, not deleted: open readers keep their generation until the new one seals
    if store.exists(cache):
        st = Store(cache, mode="r+")
        _check_fingerprint(st, prep)
        if st.meta.get("state") != "planning":
            return (st, *extend(st, src, prep, progress))
        if st.markers():
            raise CacheMismatchError(f"{cache} is damaged: its plan is incomplete but some shards are written")
        store.remove(cache)  # crashed while planning: nothing was extracted, plan again
    elif store.occupied(cache):
        raise ConfigError(f"{cache} exists, is not empty and is not a dinofeat cache")
    plan = build_plan(src, prep, progress)
    st = Store.create(
        cache, _metadata(prep, plan, src), plan, prep.model.hidden_size, prep.registers_stored, prep.config.store_dtype
    )
    st.write_source_names(src.renamed)
    return st, plan, 0


def extend(st: Store, src: Source, prep: Prepared, progress: bool) -> tuple[Plan, int]:
    """Images in the folder but not in the cache get a plan of their own (a new part: new bucket arrays, rows
    from 0), appended after the existing plan. Finished shards are never rewritten; removed images are kept."""
    plan = st.read_plan()
    planned = set(plan.keys)
    added = [k for k in src.keys if k not in planned]  # discovery order: parquet rows stay in row-group order
    if not added:
        return plan, 0
    part = 1 + max((b.part for b in plan.buckets), default=0)
    new = build_plan(src.subset(tuple(added)), prep, progress, part)
    plan = extend_plan(plan, new)
    st.extend(plan, prep.model.hidden_size, prep.registers_stored, prep.config.store_dtype)
    st.write_source_names({**st.source_names(), **src.renamed})
    return plan, len(added)


def planned_members(plan: Plan) -> dict[str, Member]:
    """Each archive image's location as the plan recorded it (tar: byte range; parquet: row)."""
    members: dict[str, Member] = {}
    if plan.archive is not None and plan.offset is not None:
        for i in np.flatnonzero(plan.archive >= 0):
            key = plan.keys[i]
            archive = plan.archives[int(plan.archive[i])]
            sample = key.split("/", 1)[1]  # keys are <file stem>/<sample key or row>
            members[key] = Member(archive, sample, int(plan.offset[i]), int(plan.file_size[i]), int(plan.mtime_ns[i]))
    return members


def moved_members(plan: Plan, src: Source) -> dict[str, Member]:
    """Planned archive images that are somewhere else now (a tar shard or parquet file rewritten since it was
    planned): key -> where rank 0's listing found it in this run. The other ranks of a process group locate
    images from the plan, so rank 0 hands them these corrections; images that stayed put are not sent."""
    if not src.members:
        return {}
    planned = planned_members(plan)
    out = {}
    for key, now in src.members.items():
        was = planned.get(key)
        if was is None:
            continue
        resized = was.size >= 0 and now.size >= 0 and was.size != now.size  # a parquet row's size: -1 until read
        if resized or (was.archive, was.offset, was.mtime_ns) != (now.archive, now.offset, now.mtime_ns):
            out[key] = now
    return out


def source_from_plan(plan: Plan, root: str, renamed: dict[str, str], moved: dict[str, Member] | None = None) -> Source:
    """What a rank other than rank 0 reads images from: the plan's keys and, for archives, each image's location as
    recorded in the index, corrected by what rank 0 found `moved` in this run, so only rank 0 ever lists the
    source and every rank reads what rank 0 checked."""
    members = planned_members(plan) | dict(moved or {})
    return Source(source_root(root), tuple(plan.keys), dict(renamed), members)


def join_cache(
    cache: Path | str, src: Source | None, prep: Prepared, group: ranks.Group, timeout_s: float
) -> tuple[Store, Plan]:
    """A non-leader rank opens the cache rank 0 planned: after the barrier, or in a manual split by polling until
    it is planned and, when the folder holds images the plan lacks, until rank 0 has extended it."""

    def meta() -> dict[str, Any]:
        try:
            return Store(cache).meta if store.exists(cache) else {}
        except CacheFormatError:
            return {}

    def ready(after: str | None = None) -> bool:
        m = meta()
        return m.get("state") in ("planned", "sealed") and (after is None or m.get("index_group") != after)

    if not group.connected:
        ranks.wait_until(ready, f"rank 0 to plan {cache}", timeout_s)
    st = Store(cache, mode="r+")
    _check_fingerprint(st, prep)
    plan = st.read_plan()
    if src is not None and not group.connected and set(src.keys) - set(plan.keys):  # rank 0 is adding images
        old = st.meta.get("index_group", "index")
        ranks.wait_until(lambda: ready(after=old), f"rank 0 to add new images to {cache}", timeout_s)
        st = Store(cache, mode="r+")
        plan = st.read_plan()
    return st, plan


def missing_in_pending(plan: Plan, found: set[str], pending: set[tuple[str, int]]) -> list[str]:
    """Planned images gone from the folder whose shard still has to be extracted (they would stop the run);
    images gone from finished shards are only reported."""
    out = []
    for i in np.flatnonzero(plan.bucket >= 0):
        key = plan.keys[i]
        if key not in found:
            b = plan.buckets[plan.bucket[i]]
            if (b.name, int(plan.row[i]) // b.shard_rows) in pending:
                out.append(key)
    return out


def _refuse_missing(plan: Plan, src: Source, pending: set[tuple[str, int]], pruned: set[str]) -> None:
    """Rank 0 checks every unfinished shard (before the others start), each rank its own shards again. Pruned
    images are not missing: they are recorded as gone."""
    missing = [k for k in missing_in_pending(plan, set(src.keys), pending) if k not in pruned]
    if missing:
        raise ConfigError(
            f"{len(missing)} planned images of unfinished shards are gone from {src.root} (e.g. {missing[0]!r}); "
            "restore them, or rerun with --prune to drop them from the cache"
        )


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _disk_errors(cache: Path | str) -> Iterator[None]:
    """Disk full, read-only filesystem, permissions: one clear line instead of a traceback (the CLI exits 1)."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        raise DinofeatError(
            f"cannot write the cache {cache}: {e.strerror} ({e.filename or cache}). Finished shards are kept: free "
            "space or fix permissions, then rerun the same command to resume"
        ) from e


def _reason_class(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


def finalize(st: Store, plan: Plan, seal: bool = True) -> tuple[np.ndarray, dict[str, str], bool]:
    """Status of every image from the plan and the done markers; seal the cache (when `seal`) once nothing is
    pending."""
    markers = st.markers()
    status, failures = marker_status(plan, markers, st.pruned())
    complete = bool((status != STATUS_PENDING).all())
    if seal and complete and st.disk_state() != "sealed":
        st.seal(status, failures, merged_channel_stats(st, plan, markers), markers, plan)
    return status, failures, complete


class _ShardAssembler:
    """Collects batch outputs into whole shards, then hands each finished shard to the writer."""

    def __init__(self, bucket: BucketPlan, pending: set[int], writer: ShardWriter, store_dtype: str) -> None:
        self.b = bucket
        self.pending = pending
        self.writer = writer
        self.store_dtype = store_dtype
        self.parts: dict[int, list[tuple[int, dict[str, torch.Tensor]]]] = {}
        self.filled: Counter[int] = Counter()
        self.failed: dict[int, dict[int, str]] = {}
        self.event: Any = None

    def add(self, start: int, outputs: dict[str, torch.Tensor], failed: dict[int, str], event: Any) -> None:
        stop = start + next(iter(outputs.values())).shape[0]
        self.event = event
        for u in range(start // self.b.shard_rows, (stop - 1) // self.b.shard_rows + 1):
            if u not in self.pending:
                continue
            s0, s1 = self.b.shard_range(u)
            a, z = max(s0, start), min(s1, stop)
            self.parts.setdefault(u, []).append((a - s0, {k: v[a - start : z - start] for k, v in outputs.items()}))
            self.failed.setdefault(u, {}).update({r: why for r, why in failed.items() if a <= r < z})
            self.filled[u] += z - a
            if self.filled[u] == s1 - s0:
                self._flush(u, s0, s1)

    def _flush(self, u: int, s0: int, s1: int) -> None:
        parts, failed, event, dtype = self.parts.pop(u), self.failed.pop(u, {}), self.event, self.store_dtype

        def build() -> dict[str, np.ndarray]:
            if event is not None:
                event.synchronize()  # device->host copies of this shard have landed
            out: dict[str, np.ndarray] = {}
            for name in parts[0][1]:
                first = parts[0][1][name]
                arr = np.zeros((s1 - s0, *first.shape[1:]), _host_np_dtype(dtype))
                for off, tensors in parts:
                    t = tensors[name]
                    arr[off : off + t.shape[0]] = _to_numpy(t, dtype)
                for r in failed:
                    arr[r - s0] = 0  # failed rows are zeros; their status says failed
                out[name] = arr
            return out

        self.writer.submit(ShardResult(self.b.name, u, s0, s1, build, failed))


def _host_np_dtype(store_dtype: str) -> np.dtype:
    return np.dtype({"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}[store_dtype])


def _to_numpy(t: torch.Tensor, store_dtype: str) -> np.ndarray:
    if store_dtype == "bf16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


_STORE_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _to_host(t: torch.Tensor, store_dtype: str) -> torch.Tensor:
    """Cast on the device (halves the transfer for fp16), copy into pinned memory without blocking."""
    t = t.to(_STORE_TORCH[store_dtype])
    if t.device.type == "cpu":
        return t.contiguous()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def default_workers(device: torch.device) -> int:
    """Decode processes. On a GPU: every core but one (the main thread feeds the device). On a CPU the model needs
    the cores itself: decode workers only steal from its threads (measured on 2 cores: inline decoding is ~8%
    faster end to end, docs/benchmarks.md), so small machines decode inline and large ones use a few workers."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(16, cpus - 1))
    return 0 if cpus <= 4 else max(1, cpus // 8)


def _rows_in(b: BucketPlan, shards: set[int], a: int, z: int) -> int:
    """How many of rows [a, z) fall in `shards` of bucket b."""
    total = 0
    for u in range(a // b.shard_rows, (z - 1) // b.shard_rows + 1):
        if u in shards:
            s0, s1 = b.shard_range(u)
            total += min(s1, z) - max(s0, a)
    return total


def run_shards(
    st: Store,
    plan: Plan,
    src: Source,
    prep: Prepared,
    pending: set[tuple[str, int]],
    summary: Summary,
    progress: bool = True,
    pruned: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Extract every pending shard; returns when all are written (or raises on a fatal error). Rows of `pruned`
    images are stored as failed (zeros, left out of the statistics): they are gone from the source."""
    cfg = prep.config
    buckets = {b.name: b for b in plan.buckets}
    mine = {name: {u for (n, u) in pending if n == name} for name in buckets}
    jobs = _batch_jobs(plan, src, prep, mine)
    if not jobs:
        return
    arrays = prep.arrays
    encoder = Encoder(
        prep.model, prep.device, prep.dtype, cfg.compile, len({j.size for j in jobs}), arrays.layers, arrays.layer_norm
    )
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(prep.device)
    loader = make_loader(jobs, cfg.recipe, workers, prep.device.type == "cuda", cfg.decode_timeout_s)
    writer = ShardWriter(st)
    assemblers = {name: _ShardAssembler(buckets[name], mine[name], writer, cfg.store_dtype) for name in buckets}
    gone = _pruned_rows(plan, pruned)
    n_pending = sum(_rows_in(b, mine[b.name], 0, b.rows) for b in plan.buckets)
    t0 = time.perf_counter()
    try:
        with tqdm(total=n_pending, desc="extract", unit="img", disable=not progress, smoothing=0.05) as bar:
            batch: DecodedBatch
            for batch in loader:
                job, b = batch.job, buckets[batch.job.bucket]
                outputs = _encode(encoder, batch, b, prep)
                event = None
                if prep.device.type == "cuda":
                    event = torch.cuda.Event()
                    event.record()
                failed = batch.failed | {r: PRUNED for r in gone.get(b.name, ()) if job.start <= r < job.stop}
                assemblers[job.bucket].add(job.start, outputs, failed, event)
                bar.update(_rows_in(b, mine[b.name], job.start, job.stop))
    except BaseException as e:
        with contextlib.suppress(BaseException):
            writer.close()  # shards already handed over (all checked) still get written and marked: less to redo
        err = _run_error(e, cfg)
        if err is e:
            raise
        raise err from (None if isinstance(e, SourceChangedError) else e)
    else:
        writer.close()
    finally:
        summary.seconds += time.perf_counter() - t0
        summary.bytes_written += writer.bytes_written
    summary.processed += n_pending


PRUNED = "pruned: gone from the source"


def _batch_jobs(plan: Plan, src: Source, prep: Prepared, mine: dict[str, set[int]]) -> list[BatchJob]:
    """The batches that cover this rank's pending shards: a fixed partition of each bucket's rows, sized by the
    token budget, so a resumed run feeds the model exactly the batches a fresh one would."""
    cfg = prep.config
    budget = cfg.token_budget or DEFAULT_TOKEN_BUDGET.get(prep.device.type, 8192)
    positions = plan.rows_to_keys()
    jobs: list[BatchJob] = []
    for b in plan.buckets:
        if not mine[b.name]:
            continue
        tokens = (b.grid[0] * b.grid[1] + 1 + prep.model.num_register_tokens) * len(prep.arrays.variants)
        bs = batch_size_for(tokens, budget, cfg.batch_size)
        for a, z in pending_batches(b, mine[b.name], bs):
            paths = tuple(src.path(plan.keys[i]) for i in positions[b.name][a:z])
            jobs.append(BatchJob(b.name, a, z, (b.width, b.height), paths))
    return jobs


def _encode(encoder: Encoder, batch: DecodedBatch, b: BucketPlan, prep: Prepared) -> dict[str, torch.Tensor]:
    """One decoded batch through the encoder: every stored array (block x variant x token kind), cast to the
    stored dtype and on its way to pinned host memory."""
    cfg, arrays = prep.config, prep.arrays
    states = encoder.encode_variants(batch.pixels, cfg.recipe.mean, cfg.recipe.std, arrays.flip)
    outputs = {}
    for (layer, flipped), hidden in states.items():
        parts = split_tokens(hidden, prep.model.num_register_tokens, b.grid)
        tokens = dict(zip(("cls", "registers", "patches"), parts, strict=True))
        for base in arrays.bases:
            outputs[arrays.name(base, layer, flipped)] = _to_host(tokens[base], cfg.store_dtype)
    return outputs


def _pruned_rows(plan: Plan, pruned: set[str] | frozenset[str]) -> dict[str, set[int]]:
    """bucket name -> rows of pruned images."""
    out: dict[str, set[int]] = {}
    if pruned:
        for i, k in enumerate(plan.keys):
            if k in pruned and plan.bucket[i] >= 0:
                out.setdefault(plan.buckets[int(plan.bucket[i])].name, set()).add(int(plan.row[i]))
    return out


def _run_error(e: BaseException, cfg: ExtractConfig) -> BaseException:
    """What the run raises for an error in its loop: one clear line where we know what happened."""
    if isinstance(e, SourceChangedError):  # from a decode worker: its message carries the worker's traceback
        return SourceChangedError(_worker_message(e))
    if isinstance(e, RuntimeError) and "timed out" in str(e):
        return DinofeatError(
            f"no decoded batch for {cfg.decode_timeout_s:.0f}s (a read hung on a network mount?); finished shards are "
            "kept, rerun to resume"
        )
    return e


def _worker_message(e: BaseException) -> str:
    """The message of an error a DataLoader worker raised, without the traceback DataLoader wraps it in."""
    text = str(e).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(type(e).__module__) and ": " in last else last


@dataclass(frozen=True)
class Actions:
    """What a run does besides extracting what is pending: start over, re-extract damaged shards, drop images
    that are gone from the source, or only plan."""

    overwrite: bool = False
    repair: bool = False
    prune: bool = False
    dry_run: bool = False


def extract(
    source: str | os.PathLike[str],
    cache: str | os.PathLike[str],
    config: ExtractConfig | None = None,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    repair: bool = False,
    prune: bool = False,
    inherit: Collection[str] | None = None,
    **overrides: Any,
) -> Summary:
    """Precompute features for every image under `source` into `cache`; rerun the same call to resume.

    `overrides` are ExtractConfig fields, e.g. `extract("imgs", "feats", model="facebook/dinov3-vitl16-...",
    area=512)`. Raises ConfigError / CacheMismatchError before any work; bad images are recorded, not raised.
    `repair` re-extracts the shards that fail a full check (and only those); `prune` drops the cached images that
    are gone from the source (docs/format.md, "Repair and prune"). On an existing cache, the settings named in
    `inherit` come from the cache's record (default: with no `config`, every stored-number setting not in
    `overrides`, so a rerun needs no options); the summary's `inherited` says which.
    """
    with store_errors(os.fspath(cache)):  # a source or cache on object storage that fails: one line
        return _extract(source, cache, config, Actions(overwrite, repair, prune, dry_run), inherit, overrides)


def _extract(
    source: str | os.PathLike[str],
    cache: str | os.PathLike[str],
    config: ExtractConfig | None,
    actions: Actions,
    inherit: Collection[str] | None,
    overrides: dict[str, Any],
) -> Summary:
    dry_run, overwrite, repair, prune = actions.dry_run, actions.overwrite, actions.repair, actions.prune
    given = os.fspath(cache)  # what messages name
    names = (set(FINGERPRINTED) - set(overrides) if config is None else set()) if inherit is None else set(inherit)
    cache, config = _checked_inputs(source, cache, config, overrides)
    config, taken = settings_for(cache, config, names, overwrite)
    group = ranks.join(config.rank, config.world_size, config.device)
    prep = prepare(config, group)
    # in a process group only rank 0 lists the source (100M files or tar headers); the others read the plan
    src = discover(source, limit=config.limit) if group.is_leader or not group.connected or dry_run else None
    if src is not None and not src.keys:
        raise ConfigError(no_images(source))
    summary = Summary(cache=given, dry_run=dry_run, world_size=group.world_size, rank=group.rank, inherited=taken)
    if dry_run:
        assert src is not None
        return _dry_run(src, prep, summary)
    if (overwrite or prune or repair) and group.world_size > 1 and not group.connected:
        raise ConfigError(
            "--overwrite, --repair and --prune change the whole cache, which a manual --rank/--world-size split "
            "shares: run them once as one process (or a process group) before starting the ranks"
        )
    progress = config.progress and group.is_leader
    with contextlib.ExitStack() as held, _disk_errors(cache):
        st, plan, src = _open_on_every_rank(cache, src, prep, group, actions, summary, held)
        pending = _pending_shards(st, plan, src, group, summary)
        run_shards(st, plan, src, prep, pending, summary, progress, st.pruned())
        group.barrier()  # every rank's shards are marked before anyone seals
        _finish(st, plan, group, summary, repaired=repair)
        if summary.sealed and group.is_leader:
            store.purge_retired(cache)  # an --overwrite's old generation, kept for its readers until now
    return summary


def _checked_inputs(
    source: str | os.PathLike[str], cache: str | os.PathLike[str], config: ExtractConfig | None, overrides: Any
) -> tuple[Path | str, ExtractConfig]:
    """The cache's real location and the settings, with every path and option refused before anything exists."""
    cache = cache_location(cache)  # symlinks resolved (one cache, one lock); unsupported URLs refused before any work
    if isinstance(cache, Path):
        check_cache_dir(cache)
    if not is_archive_source(os.fspath(source)):
        local_path(source, "image source")  # folders and lists are local; tar shards and parquet files may be URLs
    try:
        return cache, replace(config or ExtractConfig(), **overrides)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def settings_for(
    cache: Path | str, config: ExtractConfig, names: Collection[str], overwrite: bool = False
) -> tuple[ExtractConfig, dict[str, Any]]:
    """`config` with the settings in `names` taken from an existing cache's record (none when starting over or
    when there is no cache yet), and what was taken."""
    if not names or overwrite:
        return config, {}
    try:
        meta = Store(cache).meta
    except CacheFormatError:
        return config, {}  # no cache yet (or a damaged one, which opening it for the run reports)
    return inherit_settings(config, meta, names)


def _dry_run(src: Source, prep: Prepared, summary: Summary) -> Summary:
    plan = build_plan(src, prep, prep.config.progress)
    summary.total = len(plan)
    summary.failed = len(plan.probe_errors)
    summary.pending = summary.total - summary.failed
    summary.histogram = plan.histogram()
    summary.projected_bytes = projected_bytes(
        plan, prep.model.hidden_size, prep.config.store_dtype, prep.registers_stored, prep.arrays.copies
    )
    summary.failures_by_reason = dict(Counter(_reason_class(r) for r in plan.probe_errors.values()))
    return summary


def _pending_shards(st: Store, plan: Plan, src: Source, group: ranks.Group, summary: Summary) -> set[tuple[str, int]]:
    """This rank's unmarked shards, cleaned of what a crash left in them; the source compared with the plan."""
    found, planned = set(src.keys), set(plan.keys) - st.pruned()
    removed = sorted(planned - found)
    summary.new_files, summary.removed_files = len(found - planned), len(removed)
    summary.removed_examples = removed[:5]
    done = set(st.markers())
    pending = {(s.bucket, s.shard) for s in plan.shards() if (s.bucket, s.shard) not in done and group.owns(s.ordinal)}
    if not group.is_leader and not group.connected:  # rank 0 checked every shard; a manual split's rank its own
        _refuse_missing(plan, src, pending, st.pruned())
    summary.cleaned_files += st.cleanup(pending, orphans=False)
    return pending


def _finish(st: Store, plan: Plan, group: ranks.Group, summary: Summary, repaired: bool) -> None:
    """Every rank's counts summed, the cache sealed once nothing is pending, and the run's outcome counted."""
    if group.connected:
        parts = group.gather((summary.processed, summary.seconds, summary.bytes_written))
        summary.processed = sum(p[0] for p in parts)
        summary.seconds = max(p[1] for p in parts)
        summary.bytes_written = sum(p[2] for p in parts)
    status, failures, complete = finalize(st, plan, seal=group.is_leader or not group.connected)
    group.barrier()  # the seal is on disk before any rank returns
    summary.total = len(plan)
    summary.done = int((status == STATUS_DONE).sum())
    summary.failed = int((status == STATUS_FAILED).sum())
    summary.pending = int((status == STATUS_PENDING).sum())
    summary.pruned = int((status == STATUS_PRUNED).sum())
    summary.failures_by_reason = dict(Counter(_reason_class(r) for r in failures.values()))
    summary.sealed = complete
    summary.histogram = plan.histogram()
    if group.is_leader and not repaired:  # the cheap check: one listing (bit flips need validate or --repair)
        summary.damaged = [str(d) for d in maintenance.missing_shard_files(st, plan, st.markers())]


def _open_on_every_rank(
    cache: Path | str,
    src: Source | None,
    prep: Prepared,
    group: ranks.Group,
    actions: Actions,
    summary: Summary,
    held: contextlib.ExitStack,
) -> tuple[Store, Plan, Source]:
    """Rank 0 takes the cache's lock, then plans (creates, resumes or extends the cache; repairs and prunes it when
    asked) while the others wait; an error while locking or planning is raised on every rank, so no rank waits
    forever for a plan that will never come. The lock stays in `held` for the whole run. Ranks of a manual split
    each hold it shared. Returns the source every rank reads: rank 0's listing, or the plan's locations corrected
    by what rank 0 found moved."""
    manual = group.world_size > 1 and not group.connected
    if not group.is_leader:
        outcome = group.broadcast(None)
        if isinstance(outcome, BaseException):
            raise outcome
        if manual:
            held.enter_context(cache_lock(cache, shared=True, what=f"precompute rank {group.rank}/{group.world_size}"))
        st, plan = join_cache(cache, src, prep, group, prep.config.wait_s)
        if src is None:
            src = source_from_plan(plan, str(st.meta["source_root"]), st.source_names(), outcome or {})
        return st, plan, src
    assert src is not None  # rank 0 always lists the source
    try:
        held.enter_context(cache_lock(cache, shared=manual, what="precompute" + (" rank 0" if manual else "")))
        st, plan, summary.appended = open_or_create(cache, src, prep, actions.overwrite, prep.config.progress)
        summary.cleaned_files += st.cleanup(set(), orphans=True)
        _maintain(st, plan, src, actions, summary, prep.config.progress)
        _refuse_missing(plan, src, {(s.bucket, s.shard) for s in plan.shards()} - set(st.markers()), st.pruned())
        moved = moved_members(plan, src) if group.connected else {}
    except Exception as e:
        group.broadcast(e)
        raise
    group.broadcast(moved)  # where rank 0 found images that are no longer where the plan says
    return st, plan, src


def _maintain(st: Store, plan: Plan, src: Source, actions: Actions, summary: Summary, progress: bool) -> None:
    """--prune, then --repair (a shard re-extracted by the repair already leaves the pruned images out)."""
    if actions.prune:
        summary.pruned_now = len(maintenance.prune(st, plan, set(src.keys)))
    if actions.repair:
        summary.repaired = [str(d) for d in maintenance.repair(st, plan, progress)]
