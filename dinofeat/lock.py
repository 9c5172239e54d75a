"""One writer per cache: an advisory `flock` on a file beside the cache, held for the whole run.

The lock file is `<parent>/.<name>.dinofeat-lock`, beside the cache rather than in it, so that `--overwrite`
(which moves the old cache aside) never moves or deletes a lock someone holds. The kernel drops the lock when the
holder dies, so a crashed run never leaves a stale lock. A normal run (one process, or rank 0 of a process group
whose other ranks start only after it holds the lock) takes it exclusively; the ranks of a manual `--rank` split
take it shared, which keeps normal runs out while the split works (docs/format.md says what they rely on).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from dinofeat.errors import CacheLockedError


def lock_path(cache: Path) -> Path:
    cache = Path(os.path.abspath(cache))
    return cache.parent / f".{cache.name}.dinofeat-lock"


class CacheLock:
    """Hold with `with CacheLock(cache): ...`. Raises CacheLockedError at once, naming the holder, if another run
    holds the lock (or, `shared`, if a normal run holds it exclusively)."""

    def __init__(self, cache: Path, shared: bool = False, what: str = "precompute") -> None:
        self.path = lock_path(cache)
        self.cache = cache
        self.shared = shared
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> CacheLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise CacheLockedError(
                f"{self.cache} is in use by another dinofeat run ({holder}); nothing was changed. Wait for it to "
                f"finish (or stop it), then rerun: finished shards are kept"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if not self.shared:  # shared holders leave the exclusive holder's record alone
            body = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({**body, "what": self.what}).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return "a manual --rank/--world-size split, or a run that just started"
    return f"{h.get('what', 'a run')}: pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}"
