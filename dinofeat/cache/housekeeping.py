"""What a cache keeps clean: the files a crash leaves (partial shard objects, temp files, groups no metadata points
to), the index groups readers may still hold, and whole caches (exists, occupied, remove; --overwrite's retire and
purge). The state machine that decides when each runs is dinofeat.cache.lifecycle."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from dinofeat.cache.layout import META_KEY
from dinofeat.cache.objects import Files, open_files
from dinofeat.cache.store import Store
from dinofeat.errors import ConfigError

# a local write's temp file (dinofeat.cache.objects.LocalFiles.write): `.<name>.<pid>.tmp` beside `<name>`
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp$")


def cleanup(st: Store, shards: set[tuple[str, int]], orphans: bool = True, exclusive: bool = True) -> int:
    """Remove what a crash left in `shards` (pending shards this process owns): their shard objects (they may be
    half-written) and the temp files of their shard, marker and statistics writes (a disk-full stop leaves them).
    Other processes' shards are never touched. With `orphans`, also groups no metadata points to and, when
    `exclusive` (no other process writes the cache now: not a manual split), every temp file left in the cache.
    Returns the number of files removed."""
    removed = 0
    names = {b.name for b in st.index.bucket_plans()}
    for bucket, u in sorted(shards):
        if bucket not in names:
            continue
        for f in st.shards.files(bucket, u):
            removed += st.shards.remove_written(f)
        if not st.files.remote:  # an object store has no temp files: a PUT is whole or absent
            own = [*st.shards.files(bucket, u), st.markers.path(bucket, u), st.stats.path(bucket, u)]
            removed += _unlink_all(p for f in own for p in temps_of(Path(st.path) / f))
    if orphans:
        for d in orphan_groups(st):
            removed += st.files.delete_tree(d)
        if not st.files.remote:
            # temp files of metadata writes (zarr.json, index, failures) that a crash cut short
            for pattern in ("*.partial", f"{st.index.group}/**/*.partial", "_dinofeat/.*.tmp"):
                removed += _unlink_all(Path(st.path).glob(pattern))
            if exclusive:
                removed += _unlink_all(Path(st.path) / rel for rel in temp_files(st.files))
            in_force = Path(st.path) / st.index.pruned_path() if st.meta.get("pruned") else None
            removed += _unlink_all(p for p in Path(st.path).glob("_dinofeat/pruned*.json") if p != in_force)
    return removed


def temps_of(path: Path) -> list[Path]:
    """The temp files that writes of `path` left beside it (any process's)."""
    try:
        entries = list(os.scandir(path.parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [path.parent / e.name for e in entries if (m := TEMP_NAME.match(e.name)) and m["name"] == path.name]


def temp_files(files: Files) -> list[str]:
    """Every temp file under a local cache, relative to its root (an object store has none): what `validate` names
    and what a run that has the cache to itself removes."""
    if files.remote:
        return []
    root = Path(files.root)  # type: ignore[attr-defined]
    out = []
    for dirpath, _, names in os.walk(root):
        out += [(Path(dirpath) / n).relative_to(root).as_posix() for n in names if TEMP_NAME.match(n)]
    return sorted(out)


def _unlink_all(paths: Iterable[Path]) -> int:
    removed = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed += 1
    return removed


def kept_index_groups(st: Store) -> set[str]:
    """Index groups a reader may still load: the current one, the one it replaced (a reader that read the
    metadata just before a switch), the last sealed one (what new readers get while a run works) and the one
    that was last sealed before it (a reader that read the metadata just before this seal)."""
    meta = st.meta
    keep = {meta.get("index_group", "index"), meta.get("previous_index_group"), meta.get("previous_sealed_group")}
    keep.add((meta.get("last_sealed") or {}).get("index_group"))
    return {g for g in keep if g}


def drop_stale_index_groups(st: Store) -> None:
    """Readers load an index once, at open: older groups than those kept are deleted (at most four stay)."""
    keep = kept_index_groups(st)
    for d in st.files.children(""):
        if d.startswith("index") and d not in keep:
            st.files.delete_tree(d)


def orphan_groups(st: Store) -> list[str]:
    """Bucket and index groups no metadata points to (paths relative to the root): what an incremental run
    that crashed before its metadata switch leaves behind."""
    planned = {b.name for b in st.index.bucket_plans()}
    out = [f"buckets/{d}" for d in st.files.children("buckets") if d not in planned]
    keep = kept_index_groups(st)
    out += [d for d in st.files.children("") if d.startswith("index") and d not in keep]
    return out


# ---- whole caches ------------------------------------------------------------------------------------------------
def exists(path: str | os.PathLike[str]) -> bool:
    return open_files(path).exists("zarr.json")


def is_dinofeat_cache(files: Files) -> bool:
    """A dinofeat cache, or what is left of one (its own folders, though zarr.json is lost or damaged): what
    --overwrite may delete."""
    try:
        attrs = json.loads(files.read("zarr.json")).get("attributes", {})
        if isinstance(attrs, dict) and isinstance(attrs.get(META_KEY), dict):
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return bool(files.children("_dinofeat")) and bool(files.children("buckets") or files.list("_dinofeat"))


def occupied(path: str | os.PathLike[str]) -> bool:
    """Something (a cache or anything else) is at `path`."""
    files = open_files(path)
    if files.remote:
        return bool(files.children("")) or bool(files.list(""))
    p = Path(path)
    return p.exists() and any(p.iterdir())


def check_removable(path: str | os.PathLike[str]) -> None:
    """ConfigError unless what is at `path` is a dinofeat cache, or nothing: checked before --overwrite plans."""
    files = open_files(path)
    if occupied(path) and not is_dinofeat_cache(files):
        raise ConfigError(f"refusing to delete {files.location}: it is not empty and not a dinofeat cache")


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a cache (only if it is one, or is empty)."""
    check_removable(path)
    files = open_files(path)
    if files.remote:
        files.delete_tree("")
        return
    p = Path(path)
    if p.exists():
        shutil.rmtree(p)


def retire(path: str | os.PathLike[str]) -> Path | None:
    """--overwrite: move a dinofeat cache aside (one rename) so that readers still holding it keep a consistent
    old generation; `purge_retired` deletes it once the new cache is sealed. Refuses anything that is not a
    dinofeat cache (a zarr store of someone else's, a folder of files) unless it is empty. An object store has no
    rename: a remote cache is deleted, and readers still holding it fail loudly (missing objects, or rows that fail
    the checksums their markers recorded) instead of keeping their generation (docs/format.md)."""
    files = open_files(path)
    if files.remote:
        remove(path)
        return None
    p = Path(path)
    if not p.exists():
        return None
    if not is_dinofeat_cache(files):
        remove(p)  # empty: fine; anything else: refused
        return None
    aside = p.with_name(f".{p.name}.retired-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(p, aside)
    except OSError as e:  # a mount point (EBUSY), another filesystem: it cannot be moved aside
        raise ConfigError(
            f"--overwrite cannot move {p} aside ({e.strerror}: a mount point?); delete what it holds yourself, then "
            "rerun without --overwrite"
        ) from None
    return aside


def purge_retired(path: str | os.PathLike[str]) -> int:
    """Delete the generations `retire` moved aside. Returns how many."""
    if open_files(path).remote:
        return 0
    p = Path(path)
    old = list(p.parent.glob(f".{p.name}.retired-*"))
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return len(old)
