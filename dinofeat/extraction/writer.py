"""Background shard writers: the model never waits on disk. A few threads, a bounded queue, whole shards only.

Per shard a writer waits for its rows to land in host memory, computes its per-channel statistics (from the per-row
sums the device computed, or from the rows), writes each array from the rows in place (`Shards.write`: no copy
of the shard), fsyncs it, then writes the statistics and the done marker that vouches for them. Several threads
keep several shards in flight: writing, checksumming and fsync release the GIL, so they overlap each other and the
main thread. How long each stage took is summed in `timings` (what `dinofeat bench` reports).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from dinofeat.cache.arrays import FLIP_SUFFIX
from dinofeat.cache.stats import ChannelStats, pooled_shard_stats
from dinofeat.cache.store import Store
from dinofeat.sources.discover import Facts

WRITER_THREADS = 2


@dataclass
class ShardResult:
    """One shard's rows [start, stop). `build` gives the arrays (it first waits for the device copies); `moments`,
    when the device computed them, gives each statistics array's per-row (mean, M2) ([rows, 2, D], float64);
    `release` hands the shard's host buffers back once it is written or dropped."""

    bucket: str
    shard: int
    start: int
    stop: int
    build: Callable[[], dict[str, np.ndarray]]
    failed: dict[int, str] = field(default_factory=dict)
    changed: dict[int, Facts] = field(default_factory=dict)  # row -> facts of the bytes read, where not as planned
    moments: Callable[[], dict[str, np.ndarray]] | None = None
    release: Callable[[], None] | None = None


class Timings:
    """Seconds per stage, summed over threads (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)


class ShardWriter:
    """Writes each shard in one call per array, fsyncs it, writes its per-channel statistics, then its done marker
    with every chunk's crc32c. Errors surface on the next call; after one, queued shards are dropped unwritten."""

    def __init__(self, store: Store, max_pending: int = 2, threads: int = WRITER_THREADS) -> None:
        self.store = store
        self._bf16 = store.meta["dtypes"]["store"] == "bf16"
        self._stat_names = store.arrays.stat_names()  # cls and patches of each layer, both variants pooled
        self.bytes_written = 0
        self.shards_written = 0
        self.timings = Timings()
        self._lock = threading.Lock()
        self._q: queue.Queue[ShardResult | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"dinofeat-writer-{i}", daemon=True) for i in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                if self._error is None:  # after a failure nothing more is written
                    self._write(item)
            except BaseException as e:  # re-raised in the main thread
                with self._lock:
                    self._error = self._error or e
            finally:
                if item.release is not None:
                    item.release()

    def _write(self, item: ShardResult) -> None:
        stage = self.timings.stage
        with stage("writer_build"):
            arrays = item.build()
        with stage("writer_stats"):
            stats = self._stats(item, arrays)
        with stage("writer_write"):
            written = self.store.shards.write(item.bucket, item.start, arrays)
            self.store.shards.sync(item.bucket, item.shard)  # data on disk before the marker that vouches for it
        with stage("writer_marker"):
            stats_crc = self.store.stats.write(item.bucket, item.shard, stats)
            sums = self.store.shards.checksums(item.bucket, item.shard)  # each chunk's crc32c, as stored
            self.store.markers.write(
                item.bucket, item.shard, item.start, item.stop, item.failed, sums, stats_crc, item.changed
            )
        with self._lock:
            self.bytes_written += written
            self.shards_written += 1

    def _stats(self, item: ShardResult, arrays: dict[str, np.ndarray]) -> dict[str, ChannelStats]:
        """Per-channel statistics of the shard's done rows (failed rows are zeros and are left out)."""
        done = np.ones(item.stop - item.start, bool)
        done[[r - item.start for r in item.failed]] = False
        if item.moments is not None:
            return self._stats_from_moments(item.moments(), arrays, done)
        return pooled_shard_stats(arrays, done, self._stat_names, FLIP_SUFFIX, self._bf16)

    def _stats_from_moments(
        self, moments: dict[str, np.ndarray], arrays: dict[str, np.ndarray], done: np.ndarray
    ) -> dict[str, ChannelStats]:
        """The same statistics from each row's (mean, M2): a layer's mirrored-image rows pooled with the original's."""
        out = {}
        for name in self._stat_names:
            rows = [moments[n][done] for n in (name, name + FLIP_SUFFIX) if n in moments]
            if rows:
                per_row = int(np.prod(arrays[name].shape[1:-1]))  # vectors in one row: 1 (cls) or h*w (patches)
                out[name] = ChannelStats.merge_rows(np.concatenate(rows), per_row)
        return out

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, result: ShardResult) -> None:
        """Queue a shard; blocks while `max_pending` wait (the time the main thread waits on the writers)."""
        try:
            self._check()
        except BaseException:
            if result.release is not None:
                result.release()
            raise
        with self.timings.stage("writer_wait"):
            self._q.put(result)

    def close(self) -> None:
        """Wait for every queued shard; raise the first write error if there was one."""
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()
        self._check()
