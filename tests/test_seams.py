"""What a hostile tester found at the seams of repair, prune, --limit, a moved source, --overwrite, validate and the
lock (issue 22, second round). Each test fails on the code before its fix."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest

from dinofeat.cache.index import SOURCE_NAMES
from dinofeat.cache.lock import CacheLock
from dinofeat.cache.objects import LocalFiles
from dinofeat.cache.store import Store
from dinofeat.errors import CacheFormatError, CacheLockedError, CacheMismatchError, ConfigError, DinofeatError
from dinofeat.extraction.run import extract
from dinofeat.inspection.validate import validate
from dinofeat.read.reader import FeatureCache
from tests.helpers import FAST, edit_metadata, write_images


def kw(model: Path, **more) -> dict:
    return {**FAST, "model": str(model), "area": 64, "shard_mb": 0.004, **more}  # 2 images a shard


@pytest.fixture
def sealed(tmp_path, dinov3_path) -> tuple[Path, Path]:
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 6 + [(48, 64)] * 4)
    cache = tmp_path / "c"
    assert extract(imgs, cache, **kw(dinov3_path)).sealed
    return imgs, cache


def shard_keys(cache: Path, bucket: str, shard: int) -> list[str]:
    plan = Store(cache).index.plan()
    b = next(k for k, x in enumerate(plan.buckets) if x.name == bucket)
    rows = plan.buckets[b].shard_rows
    return [k for k, bb, r in zip(plan.keys, plan.bucket, plan.row, strict=True) if bb == b and r // rows == shard]


def flip_a_bit(cache: Path, bucket: str, shard: int) -> None:
    f = sorted((cache / "buckets" / bucket / "patches" / "c" / str(shard)).rglob("*"))[-1]
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))


def state(cache: Path) -> tuple[str, list[str]]:
    """The cache's state and its done markers: what a refusal must leave as it was."""
    return Store(cache).meta["state"], sorted(str(p) for p in (cache / "_dinofeat" / "done").rglob("*.json"))


# ---- repair and prune together ---------------------------------------------------------------------------------
def test_repair_refuses_before_any_change_when_a_damaged_shard_lost_its_images(sealed, dinov3_path):
    imgs, cache = sealed
    flip_a_bit(cache, "80x64", 1)
    gone = shard_keys(cache, "80x64", 1)[0]
    (imgs / gone).unlink()
    before = state(cache)
    with pytest.raises(ConfigError, match="--repair --prune"):
        extract(imgs, cache, repair=True, **kw(dinov3_path))
    assert state(cache) == before  # not reopened, no marker removed: the refusal changed nothing
    s = extract(imgs, cache, repair=True, prune=True, **kw(dinov3_path))
    assert s.sealed and s.pruned_now == 1 and [d.split(":")[0] for d in s.repaired] == ["80x64 shard 1"]
    assert gone not in FeatureCache(cache)
    r = validate(cache, images=imgs, progress=False)
    assert r.ok, r.problems


def test_prune_extracts_again_a_damaged_shard_that_held_pruned_images(sealed, dinov3_path):
    imgs, cache = sealed
    flip_a_bit(cache, "80x64", 0)
    kept, gone = shard_keys(cache, "80x64", 0)[:2]
    (imgs / gone).unlink()
    s = extract(imgs, cache, prune=True, **kw(dinov3_path))  # its statistics cannot be recomputed from bad rows
    assert s.sealed and s.pruned_now == 1 and s.processed == len(shard_keys(cache, "80x64", 0))
    r = validate(cache, images=imgs, progress=False)
    assert r.ok, r.problems
    assert kept in FeatureCache(cache) and gone not in FeatureCache(cache)


def test_a_lost_array_description_is_refused_by_repair_and_overwritten_by_overwrite(sealed, dinov3_path):
    imgs, cache = sealed
    (cache / "buckets" / "80x64" / "cls" / "zarr.json").unlink()
    before = state(cache)
    with pytest.raises(CacheFormatError, match="restore the file from a copy"):
        extract(imgs, cache, repair=True, **kw(dinov3_path))
    assert state(cache) == before
    r = validate(cache, progress=False)
    assert not r.ok and not any("--repair" in a for a in r.advice()) and any("restore" in a for a in r.advice())
    (cache / "zarr.json").unlink()  # what is left of a cache is still one: --overwrite may replace it
    assert extract(imgs, cache, overwrite=True, **kw(dinov3_path)).sealed
    assert validate(cache, images=imgs, progress=False).ok


# ---- --limit ---------------------------------------------------------------------------------------------------
def test_a_limited_cache_is_measured_against_the_whole_listing(tmp_path, dinov3_path):
    imgs, cache = tmp_path / "imgs", tmp_path / "c"
    write_images(imgs, [(64, 48)] * 4)  # im_000 .. im_003
    assert extract(imgs, cache, limit=3, **kw(dinov3_path)).done == 3
    for i in range(2):  # new files whose names sort first: the first 3 of the listing are other images now
        shutil.copy(imgs / "im_003.png", imgs / f"a_{i}.png")
    s = extract(imgs, cache, **kw(dinov3_path))  # --limit 3 comes from the cache
    assert (s.removed_files, s.processed, s.appended, s.total) == (0, 0, 0, 3)
    assert extract(imgs, cache, prune=True, **kw(dinov3_path)).pruned_now == 0
    assert sorted(FeatureCache(cache).keys()) == ["im_000.png", "im_001.png", "im_002.png"]


# ---- a source under another name ---------------------------------------------------------------------------------
def test_a_moved_source_is_recorded_and_another_source_is_refused(sealed, dinov3_path, tmp_path):
    imgs, cache = sealed
    moved = tmp_path / "moved"
    imgs.rename(moved)
    s = extract(moved, cache, **kw(dinov3_path))
    assert s.processed == 0 and s.removed_files == 0 and s.appended == 0
    assert Store(cache).meta["source_root"] == str(moved.resolve())  # validate --recompute and show look there
    assert validate(cache, recompute=2, progress=False).ok
    other = tmp_path / "other"
    write_images(other, [(64, 48)] * 3, start_seed=50)
    before = state(cache)
    with pytest.raises(CacheMismatchError, match="holds only 3 of its 10 images"):
        extract(other, cache, **kw(dinov3_path))
    assert state(cache) == before and len(FeatureCache(cache)) == 10


# ---- --overwrite and --dry-run -----------------------------------------------------------------------------------
def test_an_overwrite_interrupted_while_planning_keeps_the_old_cache(sealed, dinov3_path, monkeypatch):
    imgs, cache = sealed
    cache_id = FeatureCache(cache).meta["cache_id"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C while 100M headers are being probed

    monkeypatch.setattr("dinofeat.extraction.prepare.build_plan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(imgs, cache, overwrite=True, **kw(dinov3_path))
    assert FeatureCache(cache).meta["cache_id"] == cache_id
    assert not [p for p in cache.parent.iterdir() if "retired" in p.name]


def test_a_dry_run_refuses_a_cache_made_otherwise(sealed, dinov3_path):
    imgs, cache = sealed
    with pytest.raises(CacheMismatchError, match=r"bucket_spec\.area"):
        extract(imgs, cache, dry_run=True, **kw(dinov3_path, area=96))
    assert extract(imgs, cache, dry_run=True, overwrite=True, **kw(dinov3_path, area=96)).total == 10


# ---- validate names what it cannot read ----------------------------------------------------------------------------
def test_validate_names_a_lost_prune_record_and_a_shard_it_cannot_open(sealed, dinov3_path):
    imgs, cache = sealed
    (imgs / "im_000.png").unlink()
    extract(imgs, cache, prune=True, **kw(dinov3_path))
    (cache / "_dinofeat" / "pruned.json").unlink()
    f = sorted((cache / "buckets" / "64x80" / "cls" / "c" / "1").rglob("*"))[-1]
    f.unlink()
    f.mkdir()  # an OSError that is not FileNotFoundError
    r = validate(cache, progress=False)
    where = {(p.check, p.where) for p in r.problems}
    assert ("index", "_dinofeat/pruned.json") in where and ("shard", "64x80/cls shard 1") in where, r.problems


# ---- one lock per folder -----------------------------------------------------------------------------------------
def test_a_run_that_reached_the_folder_by_another_path_holds_it(sealed):
    _, cache = sealed
    fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY)  # as a run through a bind mount holds it: its own lock file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CacheLockedError, match="another path"), CacheLock(cache):
            pass
    finally:
        os.close(fd)
    with CacheLock(cache):  # released: the lock is free again, and its file is gone after
        pass
    assert not list(cache.parent.glob(".c.dinofeat-lock"))


# ---- issue 32.6: temp files of a stopped run --------------------------------------------------------------------
_KILLED_AT_SHARD_WRITE = """
import os, sys
from pathlib import Path
from dinofeat.extraction.run import extract
real, seen = os.fsync, []
def fsync(fd):
    name = os.readlink(f"/proc/self/fd/{fd}")
    if "/buckets/" in name and name.endswith(".tmp"):
        seen.append(name)
        if len(seen) == 3:  # the third shard file's temp copy is written, not yet renamed: killed here
            print(name, flush=True)
            os._exit(137)
    real(fd)
os.fsync = fsync
extract(Path(sys.argv[1]), Path(sys.argv[2]), **eval(sys.argv[3]))
"""


def test_a_run_killed_mid_write_leaves_a_temp_file_that_validate_names_and_the_next_run_removes(tmp_path, dinov3_path):
    """A process killed while a shard's temp copy is on disk (kill -9, an OOM kill, a lost node) cannot clean up:
    validate names the file and the next run removes it (issue 32.6)."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 6 + [(48, 64)] * 4)
    cache = tmp_path / "c"
    run = subprocess.run(
        [sys.executable, "-c", _KILLED_AT_SHARD_WRITE, str(imgs), str(cache), repr(kw(dinov3_path))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 137, run.stderr
    temp = Path(run.stdout.strip())
    assert temp.is_file() and temp.name.endswith(".tmp") and cache in temp.parents
    r = validate(cache, progress=False)
    named = [p for p in r.problems if p.check == "orphan"]
    left = sorted(p.relative_to(cache).as_posix() for p in cache.rglob(".*.tmp"))  # the other writer thread's too
    assert temp.relative_to(cache).as_posix() in left and sorted(p.where for p in named) == left, r.problems
    assert all("rerun the same precompute command" in p.reason for p in named)
    assert extract(imgs, cache, **kw(dinov3_path)).sealed
    assert not temp.exists() and not list(cache.rglob("*.tmp"))
    assert validate(cache, progress=False).ok


def test_a_disk_full_stop_leaves_no_temp_file_and_a_rerun_finishes(tmp_path, dinov3_path, monkeypatch):
    """The disk fills while a shard's temp copy is made durable (its fsync fails with ENOSPC, as a full disk's
    delayed allocation does): the run stops in one line and removes the temp copy itself; a rerun finishes."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 6 + [(48, 64)] * 4)
    cache = tmp_path / "c"
    real, seen = os.fsync, []

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "/buckets/" in name and name.endswith(".tmp"):
            seen.append(name)
            if len(seen) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DinofeatError, match="No space left on device"):
        extract(imgs, cache, **kw(dinov3_path))
    assert len(seen) >= 3 and not Path(seen[2]).exists() and not list(cache.rglob("*.tmp"))
    monkeypatch.undo()
    assert extract(imgs, cache, **kw(dinov3_path)).sealed
    assert validate(cache, progress=False).ok


@pytest.mark.parametrize("beside", ["shard", "statistics", "marker summary", "metadata"])
def test_temp_files_beside_finished_files_are_named_and_removed_by_a_plain_rerun(sealed, dinov3_path, beside):
    """A write cut short where no shard is pending (prune rewriting a finished shard's statistics, a seal, a
    metadata write): validate names it, and a rerun of the sealed cache, with nothing to extract, removes it."""
    imgs, cache = sealed
    target = {
        "shard": next((cache / "buckets").glob("*/patches/c/0/0/0/0")),
        "statistics": next((cache / "_dinofeat" / "stats").rglob("0.npz")),
        "marker summary": next((cache / "_dinofeat" / "sealed").glob("*.npz")),
        "metadata": cache / "zarr.json",
    }[beside]
    temp = target.with_name(f".{target.name}.4242.tmp")
    temp.write_bytes(b"x" * 100)
    assert [p.where for p in validate(cache, progress=False).problems] == [temp.relative_to(cache).as_posix()]
    s = extract(imgs, cache, **kw(dinov3_path))
    assert s.processed == 0 and s.cleaned_files == 1 and not temp.exists()
    assert validate(cache, progress=False).ok


# ---- issue 32.4: every record the cache reads is checksummed ------------------------------------------------------
@pytest.fixture
def odd_name(tmp_path, dinov3_path) -> tuple[Path, Path]:
    """A sealed cache whose source holds a file whose name is not UTF-8: its source_names.json maps a key."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 4)
    (imgs / "im_000.png").rename(os.fsdecode(os.path.join(os.fsencode(imgs), b"caf\xe9.png")))
    (tmp_path / "secret.png").write_bytes((imgs / "im_001.png").read_bytes())  # outside the source root
    cache = tmp_path / "c"
    assert extract(imgs, cache, **kw(dinov3_path)).sealed
    assert json.loads((cache / SOURCE_NAMES).read_text()) == {"caf\\xe9.png": os.fsdecode(b"caf\xe9.png")}
    return imgs, cache


def _point_outside(cache: Path) -> None:
    (cache / SOURCE_NAMES).write_text(json.dumps({"caf\\xe9.png": "../secret.png"}))


def test_an_edited_source_name_map_is_refused_by_name_and_never_recomputed_from(odd_name, dinov3_path):
    imgs, cache = odd_name
    _point_outside(cache)
    r = validate(cache, recompute=4, progress=False)
    assert [(p.check, p.where) for p in r.problems] == [("index", SOURCE_NAMES)], r.problems
    assert "fails its checksum" in r.problems[0].reason and "recompute" not in {p.check for p in r.problems}
    for how in ({}, {"repair": True}):  # runs that do not follow the map refuse it too: every run, not only some
        with pytest.raises(CacheFormatError, match=r"source_names\.json fails its checksum"):
            extract(imgs, cache, **kw(dinov3_path), **how)
    write_images(imgs, [(64, 48)], start_seed=9)  # a new image: the rerun extends the plan and its map
    (imgs / "im_000.png").rename(imgs / "new.png")
    with pytest.raises(CacheFormatError, match=r"source_names\.json fails its checksum"):
        extract(imgs, cache, **kw(dinov3_path))


def test_a_source_name_outside_the_source_is_refused_in_a_cache_without_record_checksums(odd_name):
    """A cache written before record checksums (or a map edited along with them): the name itself is refused."""
    _, cache = odd_name
    edit_metadata(cache, lambda m: m.pop("record_checksums"), restamp=True)
    assert validate(cache, recompute=1, progress=False).ok  # old caches without the checksums still open
    _point_outside(cache)
    with pytest.raises(CacheFormatError, match="not that key's file under the source root"):
        Store(cache).index.source_names()
    r = validate(cache, recompute=4, progress=False)
    assert [(p.check, p.where) for p in r.problems] == [("index", SOURCE_NAMES)], r.problems


@pytest.mark.parametrize("record", ["failures.json", "probe_failures.json"])
def test_an_edited_failure_record_fails_its_checksum(sealed, record):
    _, cache = sealed
    (cache / "_dinofeat" / record).write_text(json.dumps({"im_000.png": "invented"}))
    with pytest.raises(CacheFormatError, match=re.escape(f"{record} fails its checksum")):
        FeatureCache(cache) if record == "failures.json" else Store(cache).index.plan()
    assert ("index", f"_dinofeat/{record}") in {(p.check, p.where) for p in validate(cache, progress=False).problems}


def test_a_prune_cut_short_between_its_record_and_the_metadata_resumes(sealed, dinov3_path, monkeypatch):
    """A crash after pruned.json is rewritten but before the metadata that vouches for it: the metadata accepted
    the old bytes and the new ones before the write, so the rerun finds no damage and finishes the prune."""
    imgs, cache = sealed
    (imgs / "im_000.png").unlink()
    assert extract(imgs, cache, prune=True, **kw(dinov3_path)).pruned_now == 1
    (imgs / "im_001.png").unlink()
    write = LocalFiles.write

    def crash_after(self, rel, data):
        write(self, rel, data)
        if rel.startswith("_dinofeat/pruned"):
            raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(LocalFiles, "write", crash_after)
    with pytest.raises(KeyboardInterrupt):
        extract(imgs, cache, prune=True, **kw(dinov3_path))
    monkeypatch.undo()
    s = extract(imgs, cache, prune=True, **kw(dinov3_path))
    assert s.sealed and s.pruned == 2 and validate(cache, progress=False).ok
    assert sorted(set(Store(cache).index.pruned())) == ["im_000.png", "im_001.png"]


def test_an_incremental_run_cut_short_after_rewriting_its_records_still_opens_and_resumes(
    sealed, dinov3_path, monkeypatch
):
    """The records an incremental run rewrites before its metadata switch (probe failures, source names) match a
    crc32c the metadata accepts at every moment: a crash right after the rewrite leaves a cache that opens, serves
    what it served, and that the rerun finishes."""
    imgs, cache = sealed
    write_images(imgs, [(64, 48)], start_seed=20)  # no im_010 yet: a new image
    (imgs / "im_000.png").rename(imgs / "im_010.png")
    shutil.copy(imgs / "im_010.png", imgs / "im_000.png")
    (imgs / "bad.png").write_bytes(b"not an image")  # a probe failure: the record's bytes change
    write = LocalFiles.write

    def crash_after(self, rel, data):
        write(self, rel, data)
        if rel == "_dinofeat/probe_failures.json":
            raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(LocalFiles, "write", crash_after)
    with pytest.raises(KeyboardInterrupt):
        extract(imgs, cache, **kw(dinov3_path))
    monkeypatch.undo()
    assert len(FeatureCache(cache)) == 10 and Store(cache).index.probe_failures() == {"bad.png": ANY}
    s = extract(imgs, cache, **kw(dinov3_path))
    assert s.sealed and s.appended == 2 and validate(cache, progress=False).ok


def test_a_rank_removes_the_temp_files_of_its_own_pending_shards_only(sealed):
    """What each process does at the start of a run, a rank of a manual split included (which never sweeps the
    whole cache: another rank may be writing): the temp files of the shard, marker and statistics writes of the
    shards it owns go; another shard's stay."""
    from dinofeat.cache import housekeeping

    _, cache = sealed
    st = Store(cache, mode="r+")
    bucket = st.index.bucket_plans()[0].name

    def temps(u: int) -> list[Path]:
        own = [*st.shards.files(bucket, u), st.markers.path(bucket, u), st.stats.path(bucket, u)]
        out = [(cache / f).with_name(f".{Path(f).name}.{4242 + u}.tmp") for f in own]
        for p in out:
            p.write_bytes(b"cut short")
        return out

    mine, other = temps(0), temps(1)
    assert housekeeping.cleanup(st, {(bucket, 0)}, orphans=False) >= len(mine)
    assert not any(p.exists() for p in mine) and all(p.exists() for p in other)
