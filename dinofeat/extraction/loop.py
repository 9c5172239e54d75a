"""The extraction loop, a reader -> mapper -> writer pipeline: DataLoader workers decode whole batches of one bucket
(reader), the encoder runs in the main thread (mapper), a background thread writes whole shards (writer). Batches
are a fixed partition of each bucket's rows, so a resumed run computes exactly the batches a fresh one would."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dinofeat.cache.layout import BucketPlan, Plan
from dinofeat.cache.store import Store
from dinofeat.errors import DinofeatError, SourceChangedError
from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.loader import BatchJob, DecodedBatch, make_loader
from dinofeat.extraction.locate import planned_facts
from dinofeat.extraction.model import Encoder
from dinofeat.extraction.plan import batch_size_for, pending_batches
from dinofeat.extraction.prepare import Prepared
from dinofeat.extraction.tokens import split_tokens
from dinofeat.extraction.writer import ShardResult, ShardWriter
from dinofeat.sources.discover import Facts, Source

DEFAULT_TOKEN_BUDGET = {"cuda": 131072, "cpu": 8192}


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
        self.changed: dict[int, dict[int, Facts]] = {}
        self.event: Any = None

    def add(
        self,
        start: int,
        outputs: dict[str, torch.Tensor],
        failed: dict[int, str],
        changed: dict[int, Facts],
        event: Any,
    ) -> None:
        stop = start + next(iter(outputs.values())).shape[0]
        self.event = event
        for u in range(start // self.b.shard_rows, (stop - 1) // self.b.shard_rows + 1):
            if u not in self.pending:
                continue
            s0, s1 = self.b.shard_range(u)
            a, z = max(s0, start), min(s1, stop)
            self.parts.setdefault(u, []).append((a - s0, {k: v[a - start : z - start] for k, v in outputs.items()}))
            self.failed.setdefault(u, {}).update({r: why for r, why in failed.items() if a <= r < z})
            self.changed.setdefault(u, {}).update({r: f for r, f in changed.items() if a <= r < z and r not in failed})
            self.filled[u] += z - a
            if self.filled[u] == s1 - s0:
                self._flush(u, s0, s1)

    def _flush(self, u: int, s0: int, s1: int) -> None:
        parts, failed, event, dtype = self.parts.pop(u), self.failed.pop(u, {}), self.event, self.store_dtype
        changed = self.changed.pop(u, {})

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

        self.writer.submit(ShardResult(self.b.name, u, s0, s1, build, failed, changed))


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
    progress: bool = True,
    pruned: set[str] | frozenset[str] = frozenset(),
) -> tuple[int, float, int]:
    """Extract every pending shard; returns when all are written (or raises on a fatal error) with (images
    extracted, seconds, bytes written). Rows of `pruned` images are stored as failed (zeros, left out of the
    statistics): they are gone from the source."""
    cfg = prep.config
    buckets = {b.name: b for b in plan.buckets}
    mine = {name: {u for (n, u) in pending if n == name} for name in buckets}
    jobs = _batch_jobs(plan, src, prep, mine)
    if not jobs:
        return 0, 0.0, 0
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
                assemblers[job.bucket].add(job.start, outputs, failed, batch.changed, event)
                bar.update(_rows_in(b, mine[b.name], job.start, job.stop))
    except BaseException as e:
        with contextlib.suppress(BaseException):
            writer.close()  # shards already handed over (all checked) still get written and marked: less to redo
        err = _run_error(e, cfg)
        if err is e:
            raise
        raise err from (None if isinstance(e, SourceChangedError) else e)
    writer.close()
    return n_pending, time.perf_counter() - t0, writer.bytes_written


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
            paths = tuple(None if i < 0 else src.path(plan.keys[i]) for i in rows)
            facts = tuple(NO_FACTS if i < 0 else planned_facts(plan, i) for i in rows)
            sizes = tuple((0, 0) if i < 0 else (int(plan.src_w[i]), int(plan.src_h[i])) for i in rows)
            jobs.append(BatchJob(b.name, a, z, (b.width, b.height), paths, facts, sizes))
    return jobs


NO_FACTS: Facts = (0, 0, None, -1)  # a vacant row's: never compared (it is not read)


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
