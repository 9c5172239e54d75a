"""The extraction loop, a reader -> mapper -> writer pipeline: DataLoader workers decode whole batches of one bucket
(reader), the encoder runs in the main thread (mapper), a background thread writes whole shards (writer). Batches
are a fixed partition of each bucket's rows, so a resumed run computes exactly the batches a fresh one would."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from dinofeat.cache.layout import VACANT, BucketPlan, Plan
from dinofeat.cache.store import Store
from dinofeat.errors import DinofeatError, SourceChangedError
from dinofeat.extraction import assemble
from dinofeat.extraction.assemble import STORE_TORCH, ShardAssembler
from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.hostbuffers import HostBuffers
from dinofeat.extraction.loader import BatchJob, DecodedBatch, batches, make_loader
from dinofeat.extraction.locate import planned_facts
from dinofeat.extraction.model import Encoder
from dinofeat.extraction.plan import batch_size_for, pending_batches
from dinofeat.extraction.prepare import Prepared
from dinofeat.extraction.stub import StubEncoder
from dinofeat.extraction.tokens import split_tokens
from dinofeat.extraction.writer import WRITER_THREADS, ShardResult, ShardWriter, Timings
from dinofeat.keys import packed
from dinofeat.progress import bar as progress_bar
from dinofeat.sources.discover import Facts, Source

DEFAULT_TOKEN_BUDGET = {"cuda": 131072, "cpu": 8192}


# torch.compile takes ~20 s per input shape for ViT-L/16 at 1024 on an H200 and then saves ~4 ms per image (53 ->
# 68 img/s model-only, docs/benchmarks.md): it pays from ~5,000 images per shape; 20,000 leaves room for slower
# compiles and smaller gains (ViT-S saves less per image)
AUTO_COMPILE_IMAGES_PER_SHAPE = 20_000


def should_compile(device: torch.device, images: int, shapes: int) -> bool:
    """Whether a run compiles the encoder when not told: on CUDA, with enough images per input shape to pay for
    compiling each one. Never on a CPU (the model's own kernels are what a CPU run waits on)."""
    return device.type == "cuda" and shapes > 0 and images >= AUTO_COMPILE_IMAGES_PER_SHAPE * shapes


def input_shapes(jobs: list[BatchJob]) -> int:
    """The input shapes the encoder sees: a bucket's full batches and its last, shorter one are two graphs to a
    compiled (dynamic=False) encoder, each compiled once."""
    return len({(j.size, len(j.paths)) for j in jobs})


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
    progress: bool = True,
    pruned: set[str] | frozenset[str] = frozenset(),
) -> LoopResult:
    """Extract every pending shard; returns when all are written (or raises on a fatal error) with what it did.
    Rows of `pruned` images are stored as failed (zeros, left out of the statistics): they are gone from the
    source."""
    cfg = prep.config
    buckets = {b.name: b for b in plan.buckets}
    mine = {name: {u for (n, u) in pending if n == name} for name in buckets}
    jobs = _batch_jobs(plan, src, prep, mine)
    if not jobs:
        return LoopResult(0, 0.0, 0, 0, {})
    arrays = prep.arrays
    make_encoder = StubEncoder if _CEILING["stub"] else Encoder
    shapes = input_shapes(jobs)
    compiled = (
        cfg.compile if cfg.compile is not None else should_compile(prep.device, sum(len(j.paths) for j in jobs), shapes)
    )
    encoder = make_encoder(prep.model, prep.device, prep.dtype, compiled, shapes, arrays.layers, arrays.layer_norm)
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(prep.device)
    cuda = prep.device.type == "cuda"
    loader = make_loader(jobs, cfg.recipe, workers, cuda, cfg.decode_timeout_s, split=SPLIT_BATCHES or cuda)
    writer = (DroppingWriter if _CEILING["drop_writes"] else ShardWriter)(st, max_pending=WRITER_QUEUE)
    shard_bytes = int(cfg.shard_mb * 2**20)
    buffers = HostBuffers(pinned=cuda, keep_bytes=(WRITER_QUEUE + WRITER_THREADS + 2) * shard_bytes)
    assemblers = {n: ShardAssembler(buckets[n], mine[n], writer, buffers, cfg.store_dtype) for n in buckets}
    gone = _pruned_rows(plan, pruned)
    n_pending = sum(_rows_in(b, mine[b.name], 0, b.rows) for b in plan.buckets)
    timings, on_device = writer.timings, assemble.moments_on_device(prep.device)
    t0, n_failed = time.perf_counter(), 0
    try:
        # on CUDA the run's device is the current one: the events that tell the writers a shard's copies have landed
        # are recorded on its stream (`--device cuda:1` in one process would otherwise record them on cuda:0's)
        with (
            torch.cuda.device(prep.device) if cuda else contextlib.nullcontext(),
            progress_bar(total=n_pending, desc="extract", unit="img", enabled=progress, smoothing=0.05) as bar,
        ):
            for batch in _timed(batches(loader, prep.device, cfg.recipe), timings):
                job, b = batch.job, buckets[batch.job.bucket]
                with timings.stage("encode"):
                    outputs, moments = _encode(encoder, batch, b, prep, device_moments=on_device)
                n_failed += sum(  # a batch may span other ranks' shards; a vacant row holds no image
                    why != VACANT and r // b.shard_rows in mine[b.name] for r, why in batch.failed.items()
                )
                failed = batch.failed | {r: PRUNED for r in gone.get(b.name, ()) if job.start <= r < job.stop}
                with timings.stage("host_copy"):  # includes waiting on the writers when a shard is handed over
                    assemblers[job.bucket].add(job.start, outputs, moments, failed, batch.changed)
                bar.update(_rows_in(b, mine[b.name], job.start, job.stop))
    except BaseException as e:
        with contextlib.suppress(BaseException):
            writer.close()  # shards already handed over (all checked) still get written and marked: less to redo
        err = _run_error(e, cfg)
        if err is e:
            raise
        raise err from (None if isinstance(e, SourceChangedError) else e)
    writer.close()
    return LoopResult(
        n_pending,
        time.perf_counter() - t0,
        writer.bytes_written,
        writer.shards_written,
        dict(timings.seconds),
        n_failed,
    )


WRITER_QUEUE = 2  # shards waiting for a writer thread, beyond those being written
SPLIT_BATCHES = False  # decode tasks on a CPU too (tests: the join is checked where CUDA is absent)
_CEILING = {"stub": False, "drop_writes": False}


@contextlib.contextmanager
def pipeline_ceiling(drop_writes: bool = False) -> Iterator[None]:
    """Within: extractions in this process run a StubEncoder (the model's output shapes, no compute) and, with
    `drop_writes`, hand every shard to a writer that discards it. What `dinofeat bench` measures the pipeline's
    ceiling with; the features such a run stores are noise (the bench's temporary cache only)."""
    saved = dict(_CEILING)
    _CEILING.update(stub=True, drop_writes=drop_writes)
    try:
        yield
    finally:
        _CEILING.update(saved)


class DroppingWriter(ShardWriter):
    """A writer that drops every shard it is handed (its buffers go back at once): the pipeline without writes."""

    def submit(self, result: ShardResult) -> None:
        self._check()
        if result.release is not None:
            result.release()


@dataclass(frozen=True)
class LoopResult:
    """What `run_shards` did: images extracted, seconds, feature bytes and shards written, and seconds per stage:
    `loader_wait` (the main thread waiting for decoded batches), `encode` (the model, cast; on a GPU only the launch
    unless the host waits), `host_copy` (copies into shard buffers, `writer_wait` included), `writer_wait` (blocked
    handing a shard over), and the writer threads' summed `writer_build`, `writer_stats`, `writer_write` (encode,
    write, fsync), `writer_marker`."""

    images: int
    seconds: float
    bytes_written: int
    shards: int
    timings: dict[str, float]
    failed: int = 0  # images among `images` that could not be read or decoded


def _timed(loader: Iterable[DecodedBatch], timings: Timings) -> Iterator[DecodedBatch]:
    """The loader's batches, the wait for each added to `loader_wait`."""
    it = iter(loader)
    while True:
        with timings.stage("loader_wait"):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


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
            rows = [int(i) for i in positions[b.name][a:z]]  # -1: a vacant row
            # the source listed in plan order (a new cache, or a rank reading the plan): by position, no lookup
            locate = src.location if src.keys is plan.keys else lambda i: src.path(plan.keys[i])
            paths = tuple(None if i < 0 else locate(i) for i in rows)
            facts = tuple(NO_FACTS if i < 0 else planned_facts(plan, i) for i in rows)
            sizes = tuple((0, 0) if i < 0 else (int(plan.src_w[i]), int(plan.src_h[i])) for i in rows)
            jobs.append(BatchJob(b.name, a, z, (b.width, b.height), paths, facts, sizes))
    return jobs


NO_FACTS: Facts = (0, 0, None, -1)  # a vacant row's: never compared (it is not read)


def _encode(
    encoder: Encoder, batch: DecodedBatch, b: BucketPlan, prep: Prepared, device_moments: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One decoded batch through the encoder: every stored array (block x variant x token kind), cast to the stored
    dtype on the device; with `device_moments`, also each statistics array's per-row moments (`row_moments`)."""
    cfg, arrays = prep.config, prep.arrays
    states = encoder.encode_variants(batch.pixels, cfg.recipe.mean, cfg.recipe.std, arrays.flip)
    stat_names = set(arrays.stat_names()) if device_moments else set()
    outputs, moments = {}, {}
    for (layer, flipped), hidden in states.items():
        parts = split_tokens(hidden, prep.model.num_register_tokens, b.grid)
        tokens = dict(zip(("cls", "registers", "patches"), parts, strict=True))
        for base in arrays.bases:
            name = arrays.name(base, layer, flipped)
            outputs[name] = tokens[base].to(STORE_TORCH[cfg.store_dtype])
            if arrays.name(base, layer, False) in stat_names:
                moments[name] = assemble.row_moments(outputs[name])
    return outputs, moments


def _pruned_rows(plan: Plan, pruned: set[str] | frozenset[str]) -> dict[str, set[int]]:
    """bucket name -> rows of pruned images."""
    out: dict[str, set[int]] = {}
    if pruned:
        at = packed(plan.keys).positions(sorted(pruned))
        for i in at[at >= 0].tolist():
            if plan.bucket[i] >= 0:
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
