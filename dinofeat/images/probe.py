"""Header-only size probing: what the planner calls on millions of files, so it never decodes pixels."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dinofeat.errors import ImageError
from dinofeat.images.decode import DEFAULT_MAX_PIXELS, open_image, oriented_size
from dinofeat.sources.archive import Member, read_member


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
            with open_image(path, max_pixels, header_only=True) as im:
                w, h = oriented_size(im)
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
        with open_image(path, max_pixels) as im:
            w, h = oriented_size(im)
    except ImageError as e:
        return Probe(path, 0, 0, st.st_size, st.st_mtime_ns, str(e))
    return Probe(path, w, h, st.st_size, st.st_mtime_ns)


def probe_many(
    paths: Iterable[str | Member],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 16,
    on_done: Callable[[int], None] | None = None,
) -> list[Probe]:
    """Probe in parallel threads (the work is file I/O and small header parses); order follows `paths`."""
    paths = list(paths)
    out: list[Probe] = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for p in pool.map(lambda x: probe(x, max_pixels), paths, chunksize=64):
            out.append(p)
            if on_done is not None:
                on_done(1)
    return out
