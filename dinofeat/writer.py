"""Background shard writer: the model never waits on disk. One thread, a bounded queue, whole shards only."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dinofeat.store import Store


@dataclass
class ShardResult:
    """One shard's rows [start, stop). `build` assembles the arrays (it may first wait for device copies)."""

    bucket: str
    shard: int
    start: int
    stop: int
    build: Callable[[], dict[str, np.ndarray]]
    failed: dict[int, str] = field(default_factory=dict)


class ShardWriter:
    """Writes each shard in one call per array, fsyncs it, then writes its done marker with every chunk's
    crc32c. Errors surface on the next call."""

    def __init__(self, store: Store, max_pending: int = 2) -> None:
        self.store = store
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
                self.bytes_written += self.store.write_shard(item.bucket, item.start, item.build())
                self.store.sync_shard(item.bucket, item.shard)  # data on disk before the marker that vouches for it
                sums = self.store.shard_checksums(item.bucket, item.shard)  # each chunk's crc32c, as stored
                self.store.write_marker(item.bucket, item.shard, item.start, item.stop, item.failed, sums)
                self.shards_written += 1
            except BaseException as e:  # re-raised in the main thread
                self._error = e

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
