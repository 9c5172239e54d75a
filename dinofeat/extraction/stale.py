"""Which done images changed in the source since their features were made: what `validate --images` reports as
stale and what `precompute --repair` extracts again. Compared with the facts the index records of the bytes each
image was read from (size and mtime; for an archive member also its archive's file name and its offset)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from dinofeat.cache.layout import STATUS_DONE, Plan
from dinofeat.cache.markers import MarkerMap, read_changed
from dinofeat.images.probe import probe_many
from dinofeat.sources.discover import Source, is_stale, size_and_mtime


def changed_images(plan: Plan, status: np.ndarray, src: Source) -> dict[str, str]:
    """key -> how it changed, for every done image of `plan` found in `src` whose source is not what it was read
    from. Failed images have no features to be stale; images still to do are read when their shard runs."""
    found = set(src.keys)
    out: dict[str, str] = {}
    for i in np.flatnonzero(status == STATUS_DONE):
        key = plan.keys[i]
        if key not in found:
            continue
        now = src.path(key)
        if is_stale(size_and_mtime(now), (int(plan.file_size[i]), int(plan.mtime_ns[i]))):
            out[key] = "file changed since extraction (size or mtime)"
        elif plan.archive is not None and plan.offset is not None and int(plan.archive[i]) >= 0:
            a = int(plan.archive[i])
            was = (file_name(plan.archives[a]) if a < len(plan.archives) else None, int(plan.offset[i]))
            if (file_name(getattr(now, "archive", "")), getattr(now, "offset", None)) != was:
                out[key] = f"moved within its source since extraction (now {now}): the archive was rewritten"
    return out


def file_name(archive: str) -> str:
    """An archive by its file name: a source moved as a whole (accepted by precompute) keeps every member in place."""
    return archive.rstrip("/").rsplit("/", 1)[-1]


Size = tuple[int, int]  # (width, height) as displayed


def resized_done_images(
    plan: Plan, markers: MarkerMap, status: np.ndarray, src: Source, changed: Iterable[str], max_pixels: int
) -> dict[str, tuple[Size, Size]]:
    """Done images whose source now has other dimensions than the index records (key -> (size now, size recorded)),
    among those that changed since extraction (`changed`) and those whose bytes were not the planned ones when read
    (dinofeat 0.6.1 stored those without comparing dimensions). Only their headers are read."""
    done = {plan.keys[i] for i in np.flatnonzero(status == STATUS_DONE)}
    return resized_images(plan, src, (set(changed) | read_changed(plan, markers)) & done, max_pixels)


def resized_reason(now: Size, recorded: Size) -> str:
    """What validate and --repair say of an image whose dimensions are not the ones its bucket was chosen for."""
    return f"its size is now {now[0]}x{now[1]}, the index says {recorded[0]}x{recorded[1]} (its bucket's choice)"


def resized_images(plan: Plan, src: Source, keys: Iterable[str], max_pixels: int) -> dict[str, tuple[Size, Size]]:
    """key -> (displayed size now, size the plan recorded), for those of `keys` whose header gives another size than
    the plan's: their bucket was chosen for another image, so --repair plans them again instead of re-extracting them
    in place. Only these headers are read. One that cannot be read is left out (its shard is extracted again, and
    the image fails there with its reason)."""
    keys = set(keys)
    if not keys:
        return {}
    pos = {k: i for i, k in enumerate(plan.keys)}
    wanted = sorted(keys & set(pos) & set(src.keys))
    out: dict[str, tuple[Size, Size]] = {}
    for k, p in zip(wanted, probe_many([src.path(k) for k in wanted], max_pixels), strict=True):
        recorded = (int(plan.src_w[pos[k]]), int(plan.src_h[pos[k]]))
        if p.error is None and (p.width, p.height) != recorded:
            out[k] = ((p.width, p.height), recorded)
    return out
