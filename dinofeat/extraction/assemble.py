"""From the model's outputs to whole shards in host memory: each batch's rows are copied straight into the host
arrays of the shards they belong to (reused buffers from `HostBuffers`, pinned on a GPU so the copies run
asynchronously), and a shard goes to the writer once its last row is in. On a GPU the statistics' per-row sums are
taken here too, on the device, before the copy."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dinofeat.cache.layout import BucketPlan
from dinofeat.extraction.hostbuffers import HostBuffers
from dinofeat.extraction.writer import ShardResult, ShardWriter
from dinofeat.sources.discover import Facts


class ShardAssembler:
    """Copies each batch's outputs straight into the host arrays of the shards they belong to (reused buffers,
    pinned on a GPU, so the copies run asynchronously), and hands each shard to the writer once its last row is in."""

    def __init__(
        self, bucket: BucketPlan, pending: set[int], writer: ShardWriter, buffers: HostBuffers, store_dtype: str
    ) -> None:
        self.b = bucket
        self.pending = pending
        self.writer = writer
        self.buffers = buffers
        self.store_dtype = store_dtype
        self.open: dict[int, _OpenShard] = {}

    def add(
        self,
        start: int,
        outputs: dict[str, torch.Tensor],
        moments: dict[str, torch.Tensor],
        failed: dict[int, str],
        changed: dict[int, Facts],
    ) -> None:
        stop = start + next(iter(outputs.values())).shape[0]
        for u in range(start // self.b.shard_rows, (stop - 1) // self.b.shard_rows + 1):
            if u not in self.pending:
                continue
            s0, s1 = self.b.shard_range(u)
            a, z = max(s0, start), min(s1, stop)
            shard = self.open.get(u) or self._open(u, s1 - s0, outputs, moments)
            for name, t in outputs.items():
                shard.arrays[name][a - s0 : z - s0].copy_(t[a - start : z - start], non_blocking=True)
            for name, m in moments.items():  # [rows, 2, D]: a batch's rows are one contiguous slice, copied async
                shard.moments[name][a - s0 : z - s0].copy_(m[a - start : z - start], non_blocking=True)
            shard.failed.update({r: why for r, why in failed.items() if a <= r < z})
            shard.changed.update({r: f for r, f in changed.items() if a <= r < z and r not in failed})
            shard.filled += z - a
            if shard.filled == s1 - s0:
                self._flush(u, s0, s1)

    def _open(self, u: int, rows: int, outputs: dict[str, torch.Tensor], moments: dict[str, torch.Tensor]):
        take = self.buffers.take
        dtype = STORE_TORCH[self.store_dtype]
        shard = _OpenShard(
            {n: take((rows, *t.shape[1:]), dtype) for n, t in outputs.items()},
            {n: take((rows, 2, m.shape[-1]), torch.float64) for n, m in moments.items()},
        )
        self.open[u] = shard
        return shard

    def _flush(self, u: int, s0: int, s1: int) -> None:
        shard, dtype = self.open.pop(u), self.store_dtype
        event = None
        if any(t.is_pinned() for t in shard.arrays.values()):
            event = torch.cuda.Event()
            event.record()  # after every copy into this shard was queued

        def landed() -> None:
            if event is not None:
                event.synchronize()  # device->host copies of this shard have landed (idempotent)

        def build() -> dict[str, np.ndarray]:
            landed()
            out = {name: _to_numpy(t, dtype) for name, t in shard.arrays.items()}
            for arr in out.values():
                for r in shard.failed:
                    arr[r - s0] = 0  # failed rows are zeros; their status says failed
            return out

        def moments() -> dict[str, np.ndarray]:
            landed()
            return {name: m.numpy() for name, m in shard.moments.items()}

        def release() -> None:
            for t in (*shard.arrays.values(), *shard.moments.values()):
                self.buffers.give(t)

        result = ShardResult(self.b.name, u, s0, s1, build, shard.failed, shard.changed, None, release)
        if shard.moments:
            result.moments = moments
        self.writer.submit(result)


@dataclass
class _OpenShard:
    """A shard being filled: its host arrays (and per-row moments), failures, changed sources, rows filled."""

    arrays: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]
    failed: dict[int, str] = field(default_factory=dict)
    changed: dict[int, Facts] = field(default_factory=dict)
    filled: int = 0


def _to_numpy(t: torch.Tensor, store_dtype: str) -> np.ndarray:
    if store_dtype == "bf16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


STORE_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def moments_on_device(device: torch.device) -> bool:
    """Where the statistics' sums are taken: on a GPU before the copy (nearly free there), on a CPU by the writer
    threads from the host rows (the main thread's cores belong to the model)."""
    return device.type == "cuda"


def row_moments(t: torch.Tensor) -> torch.Tensor:
    """[B, ..., D] -> [B, 2, D] float64: each row's per-channel mean and sum of squared deviations (M2) over its
    vectors, from the values as stored. Means are summed in float64, deviations squared in float32 around them: no
    cancellation where a channel's mean is large beside its spread (`sq - n mean^2` in float32 lost 3-10% of such a
    channel's std). On the device, before the copy to the host: the writer then merges rows (`merge_rows`)."""
    x = t.reshape(t.shape[0], -1, t.shape[-1])
    mean = x.sum(1, dtype=torch.float64) / x.shape[1]
    dev = x.float() - mean.float()[:, None, :]
    return torch.stack([mean, (dev * dev).sum(1, dtype=torch.float64)], dim=1)
