"""One writer per cache: an advisory `flock` on a file beside the cache, held for the whole run; on object storage,
a lock object beside the cache that only one run can create (`ObjectLock`).

The lock file is `<parent>/.<name>.dinofeat-lock`, beside the cache rather than in it, so that `--overwrite`
(which moves the old cache aside) never moves or deletes a lock someone holds. The kernel drops the lock when the
holder dies, so a crashed run never leaves a stale lock; a run that ends removes the file. A normal run (one
process, or rank 0 of a process group whose other ranks start only after it holds the lock) takes it exclusively;
the ranks of a manual `--rank` split take it shared, which keeps normal runs out while the split works
(docs/format.md says what they rely on).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from dinofeat.cache.objects import Files, LocalFiles, open_files
from dinofeat.errors import CacheLockedError, ConfigError, DinofeatError, StoreError
from dinofeat.storeerrors import describe, is_store_failure


def lock_path(cache: Path) -> Path:
    """Beside the cache's real path: every spelling of one cache (a symlink, `..`, a trailing slash) meets one lock."""
    cache = Path(os.path.realpath(cache))
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
        self._dir_fd: int | None = None

    def _lock_folder(self) -> int | None:
        """The cache folder itself is locked too (when it exists): a folder reached through two real paths (a bind
        mount) has two lock files beside it, but one inode."""
        try:
            fd = os.open(self.cache, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None  # not created yet (or not a folder, which opening the cache refuses)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLockedError(
                f"{self.cache} is in use by another dinofeat run that reached it through another path (a bind mount "
                "or a second mount of its filesystem); nothing was changed. Wait for it to finish, then rerun"
            ) from None
        return fd

    def __enter__(self) -> CacheLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # a holder that just finished may unlink the file between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise CacheLockedError(
                    f"{self.cache} is in use by another dinofeat run ({holder}); nothing was changed. Wait for it "
                    "to finish (or stop it), then rerun: finished shards are kept"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # we locked a file its holder had already unlinked: lock the one at the path now
        else:
            raise CacheLockedError(f"{self.cache}: its lock file keeps being replaced; is another run starting?")
        self._fd = fd
        try:
            self._dir_fd = self._lock_folder()
        except BaseException:
            self.__exit__()
            raise
        if not self.shared:  # shared holders leave the exclusive holder's record alone
            body = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({**body, "what": self.what}).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        """An exclusive holder removes the lock file before it lets go, so no run leaves one behind; a run that
        opened the old file meanwhile notices (`_same_file`) and locks the new one instead."""
        if self._fd is not None:
            if not self.shared and _same_file(self._fd, self.path):
                with contextlib.suppress(OSError):
                    self.path.unlink()
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # closing drops its flock
            self._dir_fd = None


def _same_file(fd: int, path: Path) -> bool:
    """The open lock file is still the one at `path` (not unlinked or replaced since it was opened)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _read_holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return "a manual --rank/--world-size split, or a run that just started"
    return f"{h.get('what', 'a run')}: pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}"


class ObjectLock:
    """The lock of a cache on object storage: the object `<cache name>.dinofeat-lock` beside it, created with a
    conditional PUT (If-None-Match), so of two runs that start at once exactly one gets it. Nothing drops it when
    its holder dies, so the holder renews it every `beat_s` seconds (If-Match on its own version) and a lock not
    renewed for `ttl_s` seconds is taken over (also If-Match, so two runs cannot both take over a stale lock).
    The expiry is the holder's clock: hosts whose clocks differ by more than ttl_s - beat_s must not share a cache.
    A holder that loses the lock (it stalled past the ttl) stops renewing; its metadata writes are still refused
    by the metadata's own compare-and-swap if the new holder changed it. A renewal the store does not answer is
    tried again at the next beat; the release on the way out is retried for `release_s` seconds, so a store outage
    shorter than that never locks the next run out for the ttl."""

    def __init__(
        self,
        files: Files,
        what: str = "precompute",
        ttl_s: float = 300.0,
        beat_s: float = 60.0,
        release_s: float = 60.0,
    ) -> None:
        self.files, self.name = files.sibling(".dinofeat-lock")
        self.cache = files.location
        self.url = f"{self.files.location.rstrip('/')}/{self.name}"
        self.what, self.ttl_s, self.beat_s, self.release_s = what, ttl_s, beat_s, release_s
        self._version: Any = None
        self._renewed = 0.0  # when the object we hold was last written (what its expiry counts from)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _body(self, now: float) -> bytes:
        return json.dumps(
            {
                "what": self.what,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "renewed": now,
                "expires": now + self.ttl_s,
            }
        ).encode()

    def __enter__(self) -> ObjectLock:
        now = time.time()
        self._version = self.files.create(self.name, self._body(now))
        if self._version is None:
            try:
                raw, version = self.files.read_versioned(self.name)
                holder = json.loads(raw)
            except FileNotFoundError:  # released between our create and this read: try once more
                holder, version = {"expires": 0}, None
            except ValueError:
                holder, version = {"expires": 0}, None
            if float(holder.get("expires", 0)) > time.time():
                raise CacheLockedError(
                    f"{self.cache} is in use by another dinofeat run ({holder.get('what', 'a run')}: pid "
                    f"{holder.get('pid')} on host {holder.get('host')}, lock renewed "
                    f"{time.time() - float(holder.get('renewed', 0)):.0f}s ago); nothing was changed. Wait for it to "
                    f"finish (or stop it; its lock expires {self.ttl_s:.0f}s after its last renewal), then rerun"
                )
            now = time.time()
            self._version = (
                self.files.replace(self.name, self._body(now), version)
                if version is not None
                else self.files.create(self.name, self._body(now))
            )
            if self._version is None:
                raise CacheLockedError(f"{self.cache}: another run took over its stale lock first; nothing was changed")
        self._renewed = now
        self._thread = threading.Thread(target=self._renew, name="dinofeat-lock", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.beat_s):
            now = time.time()
            try:
                version = self.files.replace(self.name, self._body(now), self._version)
            except Exception as e:
                if is_store_failure(e) or isinstance(e, OSError):  # s3fs raises botocore's and aiohttp's errors too
                    continue  # a blip or an outage: the next beat tries again, well before the ttl
                raise
            if version is None:
                self.lost = True
                return
            self._version, self._renewed = version, now

    def _release(self) -> BaseException | None:
        """Delete the lock object if it is still ours, trying again with backoff for `release_s` seconds while the
        store does not answer. Returns the last failure, or None once released (or no longer ours)."""
        deadline, delay = time.monotonic() + self.release_s, 0.5
        while True:
            try:
                _, version = self.files.read_versioned(self.name)
                if version == self._version:  # still ours
                    self.files.delete(self.name)
                return None
            except FileNotFoundError:  # gone already (a DELETE whose answer was lost, or taken over and released)
                return None
            except Exception as e:
                if not (is_store_failure(e) or isinstance(e, OSError)) or time.monotonic() + delay > deadline:
                    return e
            time.sleep(delay)  # backing off while the store is unreachable
            delay = min(2 * delay, 8.0)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """Release the lock, or say in the run's one error line that it could not be, when it expires, and how to
        take over sooner. Our own errors keep their type (the line is added to their message)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            return
        failure = self._release()
        if failure is None:
            return
        expires = self._renewed + self.ttl_s
        note = (
            f"the lock object {self.url} could not be released ({describe(failure)}): it expires at "
            f"{time.strftime('%H:%M:%S', time.localtime(expires))} ({self.ttl_s:.0f} s after its last renewal, in "
            f"{max(0.0, expires - time.time()):.0f} s); to rerun sooner, delete that object once the store answers"
        )
        if exc is None:
            raise StoreError(f"{self.cache}: the run finished, but {note}") from failure
        if isinstance(exc, DinofeatError):
            exc.args = (f"{exc}\n{note}", *exc.args[1:])
        else:  # a bug or an interrupt keeps its own traceback; the note says what it left behind
            exc.add_note(note)


def cache_lock(cache: str | os.PathLike[str], shared: bool = False, what: str = "precompute") -> Any:
    """The lock for a cache wherever it lives: a flock beside a local cache, a lock object beside a remote one."""
    files = open_files(cache)
    if isinstance(files, LocalFiles):
        return CacheLock(files.root, shared, what)
    if shared:
        raise ConfigError(
            f"{files.location}: a manual --rank/--world-size split shares a lock, which object storage cannot hold; "
            "run the ranks as one process group (accelerate launch / torchrun), where rank 0 holds the lock"
        )
    return ObjectLock(files, what)
