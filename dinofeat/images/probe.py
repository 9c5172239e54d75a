"""Header-only size probing: what the planner calls on millions of files, so it never decodes pixels."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import overload

import numpy as np

from dinofeat.errors import ImageError
from dinofeat.images.decode import DEFAULT_MAX_PIXELS, ROTATING, open_header, open_image, oriented_size
from dinofeat.images.jpeghead import HEAD_BYTES, JPEG, jpeg_size
from dinofeat.sources.archive import Member, header_reader, read_member


@dataclass(frozen=True)
class Probe:
    """What the header says about one file. `error` is set (and width/height are 0) when it is unusable."""

    path: str | Member
    width: int
    height: int
    file_size: int
    mtime_ns: int
    error: str | None = None


def probe(path: str | Member, max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe:
    """Displayed size (EXIF rotation applied) from the header; failures come back as data. A tar member is read only
    as far as its header parser asks; a parquet row whole (then its size is known)."""
    if isinstance(path, Member):
        try:
            w, h = _header_size(path, max_pixels) if path.size != 0 else _by_pil(path, max_pixels, True)
            size = path.size if path.size >= 0 else len(read_member(path))  # a parquet row: read once, cached
        except (ImageError, OSError) as e:
            return Probe(path, 0, 0, path.size, path.mtime_ns, str(e))
        return Probe(path, w, h, size, path.mtime_ns)
    try:
        st = os.stat(path)
    except OSError as e:
        return Probe(path, 0, 0, 0, 0, f"unreadable: {e}")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device named *.jpg would block the open forever
        return Probe(path, 0, 0, 0, st.st_mtime_ns, "unreadable: not a regular file")
    try:
        w, h = _header_size(path, max_pixels) if st.st_size else _by_pil(path, max_pixels)
    except ImageError as e:
        return Probe(path, 0, 0, st.st_size, st.st_mtime_ns, str(e))
    return Probe(path, w, h, st.st_size, st.st_mtime_ns)


def _header_size(path: str | Member, max_pixels: int) -> tuple[int, int]:
    """The displayed size from the first bytes: a plain JPEG's by images/jpeghead.py, anything else by PIL from the
    same open file (its first block is read once). A file that cannot be opened goes to open_image, which words
    the error as it always has."""
    try:
        f = header_reader(path) if isinstance(path, Member) else open(path, "rb", buffering=FIRST_BYTES)  # noqa: SIM115 (closed by the with below)
    except OSError:
        return _by_pil(path, max_pixels)
    with f:
        # peek: one read of the first block, the position left at 0, so PIL parses from the same buffer
        head = f.peek(FIRST_BYTES)[:FIRST_BYTES] if hasattr(f, "peek") else f.read(FIRST_BYTES)
        if not head:
            return _by_pil(path, max_pixels, header_only=True)  # empty: open_image says so
        found = jpeg_size(head, max_pixels)
        if found is None and head.startswith(JPEG) and len(head) == FIRST_BYTES:  # a header past the first block
            f.seek(0)
            found = jpeg_size(f.read(HEAD_BYTES), max_pixels)
        if found is not None:
            w, h, turn = found
            return (h, w) if turn in ROTATING else (w, h)
        f.seek(0)
        with open_header(f, max_pixels) as im:
            return oriented_size(im)


def _by_pil(path: str | Member, max_pixels: int, header_only: bool = False) -> tuple[int, int]:
    with open_image(path, max_pixels, header_only=header_only) as im:
        return oriented_size(im)


@dataclass(frozen=True, eq=False)
class Probes(Sequence[Probe]):
    """The probes of n images as columns (what planning keeps: 24 bytes an image, not a Probe object each), and
    the errors by position. Indexing gives a Probe (without its path) for code that reads one at a time."""

    width: np.ndarray  # int32, 0 where the probe failed
    height: np.ndarray  # int32
    file_size: np.ndarray  # int64
    mtime_ns: np.ndarray  # int64
    errors: dict[int, str]

    def __len__(self) -> int:
        return len(self.width)

    @overload
    def __getitem__(self, i: int) -> Probe: ...
    @overload
    def __getitem__(self, i: slice) -> list[Probe]: ...
    def __getitem__(self, i: int | slice) -> Probe | list[Probe]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        w, h, size, mtime = int(self.width[i]), int(self.height[i]), int(self.file_size[i]), int(self.mtime_ns[i])
        return Probe("", w, h, size, mtime, self.errors.get(i))

    @staticmethod
    def empty(n: int) -> Probes:
        i32, i64 = (np.zeros(n, np.int32) for _ in range(2)), (np.zeros(n, np.int64) for _ in range(2))
        return Probes(*i32, *i64, {})

    @staticmethod
    def of(probes: Sequence[Probe]) -> Probes:
        """Columns of a list of Probe objects."""
        out = Probes.empty(len(probes))
        for i, p in enumerate(probes):
            out.put(i, p)
        return out

    def put(self, i: int, p: Probe) -> None:
        """Record probe i (threads fill disjoint positions)."""
        self.width[i], self.height[i], self.file_size[i], self.mtime_ns[i] = p.width, p.height, p.file_size, p.mtime_ns
        if p.error is not None:
            self.errors[i] = p.error


FIRST_BYTES = 16384  # the first read of a header: what PIL's own reads would have fetched (a tar member's buffer)
CHUNK = 256  # images a probe thread takes at a time: a future per image cost more than a JPEG header's parse


def probe_many(
    paths: Sequence[str | Member],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 16,
    on_done: Callable[[int], None] | None = None,
) -> Probes:
    """Probe in parallel threads (the work is file I/O and small header parses, so threads hide a network mount's
    latency), a chunk of consecutive images per task; results in the order of `paths`, as columns. `paths` may be
    a lazy sequence (`Source.locations()`): each location is made by the thread that probes it, and dropped."""
    n = len(paths)
    out = Probes.empty(n)
    chunk = max(1, min(CHUNK, n // (4 * max(1, threads))))  # a few chunks a thread: a small folder still spreads

    def run(start: int) -> int:
        stop = min(n, start + chunk)
        for i in range(start, stop):
            out.put(i, probe(paths[i], max_pixels))
        return stop - start

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done in pool.map(run, range(0, n, chunk)):
            if on_done is not None:
                on_done(done)
    return out
