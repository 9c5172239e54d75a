"""Background shard writer: the model never waits on disk. One thread, a bounded queue, whole shards only."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dinofeat.cache.arrays import FLIP_SUFFIX
from dinofeat.cache.layout import bf16_bits_to_float32
from dinofeat.cache.stats import ChannelStats, pooled_shard_stats
from dinofeat.cache.store import Store
from dinofeat.sources.discover import Facts


@dataclass
class ShardResult:
    """One shard's rows [start, stop). `build` assembles the arrays (it may first wait for device copies)."""

    bucket: str
    shard: int
    start: int
    stop: int
    build: Callable[[], dict[str, np.ndarray]]
    failed: dict[int, str] = field(default_factory=dict)
    changed: dict[int, Facts] = field(default_factory=dict)  # row -> facts of the bytes read, where not as planned


class ShardWriter:
    """Writes each shard in one call per array, fsyncs it, writes its per-channel statistics, then its done marker
    with every chunk's crc32c. Errors surface on the next call."""

    def __init__(self, store: Store, max_pending: int = 2) -> None:
        self.store = store
        self._bf16 = store.meta["dtypes"]["store"] == "bf16"
        self._stat_names = store.arrays.stat_names()  # cls and patches of each layer, both variants pooled
        self.bytes_written = 0
        self.shards_written = 0
        self._q: queue.Queue[ShardResult | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dinofeat-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure; nothing more is written
            try:
                arrays = item.build()
                self.bytes_written += self.store.shards.write(item.bucket, item.start, arrays)
                self.store.shards.sync(item.bucket, item.shard)  # data on disk before the marker that vouches for it
                stats_crc = self.store.stats.write(item.bucket, item.shard, self._stats(item, arrays))
                sums = self.store.shards.checksums(item.bucket, item.shard)  # each chunk's crc32c, as stored
                self.store.markers.write(
                    item.bucket, item.shard, item.start, item.stop, item.failed, sums, stats_crc, item.changed
                )
                self.shards_written += 1
            except BaseException as e:  # re-raised in the main thread
                self._error = e

    def _stats(self, item: ShardResult, arrays: dict[str, np.ndarray]) -> dict[str, ChannelStats]:
        """Per-channel statistics of the shard's done rows (failed rows are zeros and are left out)."""
        done = np.ones(item.stop - item.start, bool)
        done[[r - item.start for r in item.failed]] = False
        wanted = {*self._stat_names, *(n + FLIP_SUFFIX for n in self._stat_names)}
        as_float = {n: bf16_bits_to_float32(a) if self._bf16 else a for n, a in arrays.items() if n in wanted}
        return pooled_shard_stats(as_float, done, self._stat_names, FLIP_SUFFIX)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, result: ShardResult) -> None:
        self._check()
        self._q.put(result)

    def close(self) -> None:
        """Wait for every queued shard; raise the first write error if there was one."""
        self._q.put(None)
        self._thread.join()
        self._check()
