"""Host memory for shards on their way from the model to the disk, reused.

Each shard's rows are copied from the device straight into that shard's host arrays (no per-batch buffers, no
assembly copy in the writer). On a GPU those arrays are pinned, so the copies are asynchronous; pinning is slow
(cudaHostAlloc of 128 MiB takes tens of milliseconds and serialises with the device), so a buffer the writer is done
with goes back to a free list and the next shard of any bucket reuses it: shards are sized alike (`--shard-mb`), so
one buffer fits the next. What is out at once is bounded by the writer's queue (shards in flight); the free list
keeps at most `keep_bytes`.
"""

from __future__ import annotations

import threading

import torch


class HostBuffers:
    """`take(shape, dtype)` -> a host tensor viewing a reused flat buffer; `give(t)` hands its buffer back."""

    def __init__(self, pinned: bool, keep_bytes: int) -> None:
        self.pinned = pinned
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []  # flat uint8 buffers, most recently given last
        self._owner: dict[int, torch.Tensor] = {}  # data_ptr of a view handed out -> its flat buffer
        self._lock = threading.Lock()
        self.allocated = 0  # buffers allocated (what reuse saves)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            flat = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if flat is None:
            flat = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned)
            self.allocated += 1
        view = flat[:nbytes].view(dtype).view(shape)
        with self._lock:
            self._owner[view.data_ptr()] = flat
        return view

    def give(self, t: torch.Tensor) -> None:
        """Return the buffer behind a tensor from `take` (once); the oldest free buffers are dropped past
        `keep_bytes`."""
        with self._lock:
            flat = self._owner.pop(t.data_ptr(), None)
            if flat is None:
                return
            self._free.append(flat)
            while sum(b.numel() for b in self._free) > self.keep_bytes and len(self._free) > 1:
                self._free.pop(0)

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)
