"""Which share of the work this process does, and how the processes of one run wait for each other.

Three ways to run precompute:

- one process;
- under a launcher (`accelerate launch`, `torchrun`, or `dinofeat precompute --num-processes N`), which sets
  RANK / WORLD_SIZE / MASTER_ADDR: accelerate's `PartialState` joins the process group (gloo on CPU, nccl on GPU),
  rank 0 plans while the others wait, and errors raised while planning reach every rank;
- a manual split (`--rank R --world-size W`, e.g. SLURM array tasks) with no process group: the other ranks poll
  the cache until rank 0 has planned it.

Shards are dealt `ordinal % world_size == rank` either way, so no two processes ever write one shard.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from dinofeat.errors import ConfigError, PeerStoppedError

T = TypeVar("T")
PLAN_TIMEOUT = datetime.timedelta(hours=12)  # rank 0 may probe millions of headers while the others wait


@dataclass(frozen=True)
class Group:
    """This process's place in the run. `connected` means a torch.distributed process group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    connected: bool = False

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def owns(self, ordinal: int) -> bool:
        """Whether this process extracts the shard numbered `ordinal` (see plan.Plan.shards)."""
        return ordinal % self.world_size == self.rank

    def barrier(self) -> None:
        if self.connected:
            with self._peers():
                torch.distributed.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (picklable objects, exceptions included)."""
        if not self.connected:
            return obj
        box = [obj]
        with self._peers():
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.connected:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._peers():
            torch.distributed.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def _peers(self) -> Iterator[None]:
        """A process of the run that stopped (its own error says why) breaks the others' collectives with gloo's or
        nccl's RuntimeError, whose traceback filled a rank's output (issue 32.10): one line instead."""
        try:
            yield
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise PeerStoppedError(
                f"rank {self.rank}: another process of this run stopped ({first}); its own error says why. "
                "Finished shards are kept: rerun the same command"
            ) from None


def launched() -> bool:
    """Started by a launcher that expects a process group (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(rank: int, world_size: int, device: str | None) -> Group:
    """The group for this process: a launcher's process group when there is one, else the manual split."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return _from_torch(device)
    if not launched():
        if not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        return Group(rank, world_size)
    if world_size != 1 or rank != 0:
        raise ConfigError("--rank/--world-size are for manual splits; under a launcher the launcher sets them")
    watch_launcher()
    from accelerate import PartialState

    # accelerate warns (once per process) and sets 1 thread when OMP_NUM_THREADS is unset; each process's share of
    # the cores is what we want anyway (_from_torch sets torch's threads to it)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // max(1, local_world))))
    PartialState(cpu=_on_cpu(device), timeout=PLAN_TIMEOUT)
    return _from_torch(device)


LAUNCHER_POLL_S = 1.0  # how often a launched process checks that its launcher is alive
LAUNCHER_GRACE_S = 30.0  # after the SIGTERM, how long it may take to stop (a collective stuck on a dead peer)
_WATCHING: list[int] = []  # the pid whose launcher is watched (one watcher per process)


def watch_launcher(poll_s: float = LAUNCHER_POLL_S, grace_s: float = LAUNCHER_GRACE_S) -> None:
    """Stop this process when its launcher dies (issue 32.11). torchrun (and accelerate launch, which runs it) starts
    each worker in a session of its own, so killing the launcher's process group (a job step cancelled, Ctrl-C
    sent to the group, `kill -9 -PGID`) left the workers running: some finished the cache, others waited forever
    for peers and a rendezvous store that were gone. A daemon thread notices the parent change (the orphan is
    adopted by init or a subreaper) and sends this process SIGTERM, which precompute handles as Ctrl-C (finished
    shards kept, the lock released); one still alive `grace_s` later (stuck in a collective) exits."""
    if os.getpid() in _WATCHING:
        return
    _WATCHING[:] = [os.getpid()]
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)  # polling the parent: no event tells a child its parent died
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="dinofeat-launcher-watch", daemon=True).start()


def _on_cpu(device: str | None) -> bool:
    try:
        named_cpu = device is not None and torch.device(device).type == "cpu"
    except RuntimeError:  # a bad device string: resolve_device turns it into a ConfigError later
        named_cpu = False
    return named_cpu or not torch.cuda.is_available()


def _from_torch(device: str | None) -> Group:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    local_rank = int(os.environ.get("LOCAL_RANK", rank % local_world))
    if _on_cpu(device):  # N processes on one machine share its cores instead of each starting one thread per core
        torch.set_num_threads(max(1, _cores() // local_world))
    return Group(rank, world, local_rank, local_world, connected=True)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def device_for(group: Group, device: str | None) -> str | None:
    """Each local rank gets its own GPU unless the user named one by index ("cuda" alone names none)."""
    if device in (None, "cuda") and torch.cuda.is_available() and group.local_world_size > 1:
        return f"cuda:{group.local_rank % torch.cuda.device_count()}"
    return device


def wait_until(
    ready: Callable[[], bool],
    what: str,
    timeout_s: float,
    poll_s: float = 2.0,
    say: Callable[[str], None] | None = None,
) -> None:
    """Manual splits have no process group: poll the filesystem until rank 0 is done planning. `say` hears once
    that this rank is waiting (a log that stays silent for hours reads as a hung job)."""
    deadline = time.monotonic() + timeout_s
    if say is not None and not ready():
        say(f"waiting for {what} (up to {_span(timeout_s)}; it lists and probes the source first)")
    while not ready():
        if time.monotonic() > deadline:
            raise ConfigError(f"gave up after {timeout_s:.0f}s waiting for {what}; is rank 0 running?")
        time.sleep(poll_s)


def _span(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:.0f} s"
