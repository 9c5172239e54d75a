"""`dinofeat precompute --num-processes N`: start N local processes joined in a process group, as torchrun would.

Each process runs `precompute.extract` with RANK / WORLD_SIZE / MASTER_ADDR set, so the code path is exactly the
one `accelerate launch` and `torchrun` use (see `ranks`); on a GPU machine local rank k uses cuda:k. For many
machines use `accelerate launch` or `torchrun` themselves (docs/scale-out.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from dinofeat.cache.objects import cache_location
from dinofeat.errors import ConfigError, DinofeatError, PeerStoppedError
from dinofeat.extraction import ranks
from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.prepare import settings_for
from dinofeat.extraction.run import Summary, extract


def extract_processes(
    source: str | os.PathLike[str],
    cache: str | os.PathLike[str],
    config: ExtractConfig,
    num_processes: int = 1,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    repair: bool = False,
    prune: bool = False,
    inherit: Collection[str] = (),
) -> Summary:
    """`extract` in `num_processes` local processes (1: in this process). Returns the run's summary (images and
    bytes summed over the ranks). A configuration error raised in any process is raised here. The processes are
    spawned, so a script calling this needs the usual `if __name__ == "__main__":` guard."""
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
    actions = {"overwrite": overwrite, "repair": repair, "prune": prune}
    if num_processes == 1 or dry_run:
        return extract(source, cache, config, dry_run=dry_run, inherit=inherit, **actions)
    config, taken = settings_for(cache_location(cache), config, inherit, overwrite)  # once, for every process
    if ranks.launched():
        raise ConfigError("--num-processes starts processes itself; under accelerate launch or torchrun leave it at 1")
    if config.world_size != 1:
        raise ConfigError("--num-processes and a manual --rank/--world-size split cannot be combined")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    args = (num_processes, _free_port(), os.fspath(source), os.fspath(cache), config, actions, results)
    crash: mp.ProcessExitedException | None = None
    # a process that stopped with a configuration error reported it below; one that crashed reported nothing
    with _quiet_spawn_log():
        context = mp.start_processes(_child, args=args, nprocs=num_processes, start_method="spawn", join=False)
        try:
            while not context.join(grace_period=STOP_GRACE_S):  # the others get time to stop on their own
                pass
        except mp.ProcessExitedException as e:
            crash = e
        except BaseException:  # Ctrl-C or SIGTERM here: the processes stop too (their locks released), then raise
            _stop(context.processes)
            raise
    reported = []
    while not results.empty():
        reported.append(results.get())
    outcome = run_outcome(reported, crash)
    if isinstance(outcome, BaseException):
        raise outcome
    return replace(outcome, inherited=taken)


def run_outcome(reported: list[tuple[int, Any]], crash: BaseException | None) -> Any:
    """What the run ends in, from what its processes reported ((rank, summary or error) each) and the exception of
    one that crashed without reporting: the error that says why (not a rank that only saw its peer stop, whose
    collective broke), else rank 0's summary, else an error naming the crash."""
    errors = [e for _, e in sorted(reported, key=lambda r: r[0]) if isinstance(e, BaseException)]
    why = [e for e in errors if not isinstance(e, PeerStoppedError)]
    if why or (errors and crash is None):
        return (why or errors)[0]
    summary = [s for rank, s in reported if rank == 0 and not isinstance(s, BaseException)]
    if summary and crash is None:
        return summary[0]
    return DinofeatError(f"a precompute process failed ({crash}); finished shards are kept, rerun to resume")


STOP_GRACE_S = 10.0  # how long processes get to stop on their own (one failed, or Ctrl-C) before SIGTERM


@contextlib.contextmanager
def _quiet_spawn_log():
    """torch logs a warning for each process it terminates after another failed; the failure is reported in one
    line, so those warnings are noise."""
    log = logging.getLogger("torch.multiprocessing.spawn")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _stop(processes: list[Any]) -> None:
    """Interrupt every live process as Ctrl-C would (each releases its lock and keeps its finished shards), then
    terminate any that has not stopped within the grace period."""
    for p in processes:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGINT)
    for p in processes:
        p.join(STOP_GRACE_S)
        if p.is_alive():
            p.terminate()
            p.join()


def _child(index: int, world: int, port: int, source: str, cache: str, config: ExtractConfig, actions: dict, out: Any):
    os.environ.update(
        RANK=str(index),
        LOCAL_RANK=str(index),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        summary = extract(source, cache, replace(config, progress=config.progress and index == 0), **actions)
    except DinofeatError as e:
        out.put((index, e))
        raise SystemExit(1) from e
    out.put((index, summary))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
