"""A cache that survives hostile use (issue 12): one writer at a time, metadata that no stale run can roll back,
readers pinned to one generation during --overwrite, fsync before done markers, odd file names, disk errors as one
line, pickling for spawn workers. Each test fails on the code before these fixes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from dinofeat.cache import lifecycle
from dinofeat.cache.lock import CacheLock
from dinofeat.cache.markers import Markers
from dinofeat.cache.shards import Shards
from dinofeat.cache.store import Store
from dinofeat.cli import app
from dinofeat.errors import CacheConflictError, CacheFormatError, CacheLockedError, ConfigError
from dinofeat.extraction.run import extract
from dinofeat.inspection.validate import validate
from dinofeat.read.collate import collate_features
from dinofeat.read.dataset import FeatureDataset
from dinofeat.read.reader import FeatureCache
from tests.helpers import FAST, write_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def imgs(tmp_path) -> Path:
    d = tmp_path / "imgs"
    write_images(d, [(64, 48)] * 6 + [(48, 64)] * 4)
    return d


def kw(model: Path, **more) -> dict:
    return {**FAST, "model": str(model), "area": 64, "shard_mb": 0.01, **more}


def test_second_run_stops_before_touching_anything_and_names_the_holder(tmp_path, imgs, dinov3_path):
    cache = tmp_path / "c"
    with CacheLock(cache):  # a first run that holds the cache
        with pytest.raises(CacheLockedError, match=rf"in use by another dinofeat run \(precompute: pid {os.getpid()}"):
            extract(imgs, cache, **kw(dinov3_path))
        assert not cache.exists()  # nothing planned, created or deleted
        with pytest.raises(CacheLockedError):
            extract(imgs, cache, overwrite=True, **kw(dinov3_path))
    assert extract(imgs, cache, **kw(dinov3_path)).sealed  # the lock went with its holder


@pytest.mark.slow
def test_two_runs_started_together_leave_a_correct_cache(tmp_path, imgs, dinov3_path):
    cache = tmp_path / "c"
    args = [sys.executable, "-m", "dinofeat", "precompute", str(imgs), str(cache), "--model", str(dinov3_path)]
    args += ["--area", "64", "--dtype", "fp32", "--workers", "0", "--shard-mb", "0.01", "--device", "cpu", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"]
    outs = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    assert any(rc == 0 for rc, _ in outs), outs
    for rc, err in outs:
        assert rc == 0 or "in use by another dinofeat run" in err, err
    r = validate(cache, imgs, progress=False)
    assert r.ok, r.problems
    assert len(FeatureCache(cache)) == 10


def test_stale_metadata_never_overwrites_a_newer_generation(tmp_path, imgs, dinov3_path):
    cache = tmp_path / "c"
    extract(imgs, cache, **kw(dinov3_path))
    stale, other = Store(cache, mode="r+"), Store(cache, mode="r+")
    other.metafile.update(note="written by another run", state="planned")  # e.g. an incremental run began
    with pytest.raises(CacheConflictError, match="changed by another run"):
        stale.metafile.update(state="sealed")
    with pytest.raises(CacheConflictError):
        lifecycle.seal(stale, np.ones(10, np.int8), {}, None, stale.markers.read(), stale.index.plan())
    meta = Store(cache).meta
    assert meta["note"] == "written by another run" and meta["state"] == "planned"


def test_crashed_incremental_attempt_leaves_no_done_markers_behind(tmp_path, imgs, dinov3_path):
    cache = tmp_path / "c"
    extract(imgs, cache, **kw(dinov3_path))
    # what a crashed first attempt at part 1 could leave: a marker for a shard of the part's new bucket
    st = Store(cache)
    name = st.meta["buckets"][int(st.index.read()["bucket"][0])]["name"] + "_1"  # where new 64x48 images will go
    stale = cache / "_dinofeat" / "done" / name
    stale.mkdir(parents=True)
    (stale / "0.json").write_text(f'{{"bucket": "{name}", "shard": 0, "start": 0, "stop": 1, "failed": {{}}}}')
    write_images(imgs / "more", [(64, 48)] * 2, start_seed=60)
    s = extract(imgs, cache, **kw(dinov3_path))
    assert s.appended == 2 and s.processed == 2 and s.sealed
    r = validate(cache, imgs, progress=False)
    assert r.ok, r.problems


def test_reader_keeps_its_generation_during_overwrite(tmp_path, imgs, dinov3_path, tiny_models):
    cache = tmp_path / "c"
    extract(imgs, cache, **kw(dinov3_path, shard_mb=0.002))  # one image per shard
    fc = FeatureCache(cache)
    first, later = fc.keys()[0], fc.keys()[-1]
    before = fc[first].patches.copy()
    model_before = fc.model_id
    extract(imgs, cache, overwrite=True, **kw(tiny_models["dinov2"], area=56))
    assert fc.model_id == model_before
    np.testing.assert_array_equal(fc[first].patches, before)  # its open shard: the old generation, not the new
    with pytest.raises(CacheFormatError, match="missing"):  # never opened: the old generation is gone -> loud
        fc[later]
    assert FeatureCache(cache).model_id == str(tiny_models["dinov2"])
    assert not list(tmp_path.glob(".c.retired-*"))  # the old generation is deleted once the new one is sealed


def test_overwrite_refuses_what_is_not_a_dinofeat_cache(tmp_path, imgs, dinov3_path):
    other = tmp_path / "theirs"
    zarr.open_group(str(other), mode="w").create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(ConfigError, match="not a dinofeat cache"):
        extract(imgs, other, overwrite=True, **kw(dinov3_path))
    assert (other / "x" / "zarr.json").is_file()


def test_shard_is_fsynced_before_its_marker(tmp_path, imgs, dinov3_path, monkeypatch):
    """Per shard (writer threads interleave shards): its files are fsynced, then its done marker is written."""
    calls: list[tuple[str, str, int]] = []
    sync, mark = Shards.sync, Markers.write
    monkeypatch.setattr(Shards, "sync", lambda self, b, n: (calls.append(("sync", b, n)), sync(self, b, n))[1])
    monkeypatch.setattr(
        Markers, "write", lambda self, b, n, *a: (calls.append(("marker", b, n)), mark(self, b, n, *a))[1]
    )
    s = extract(imgs, tmp_path / "c", **kw(dinov3_path))
    shards = {(b, n) for _, b, n in calls}
    assert len(shards) == s.shards_written > 1
    for shard in shards:
        assert [what for what, *at in calls if tuple(at) == shard] == ["sync", "marker"], (shard, calls)


def test_non_utf8_file_name_is_processed(tmp_path, imgs, dinov3_path):
    odd = os.path.join(os.fsencode(imgs), b"caf\xe9.png")
    (imgs / "im_000.png").rename(os.fsdecode(odd))
    s = extract(imgs, tmp_path / "c", **kw(dinov3_path))
    assert s.sealed and s.done == 10 and s.failed == 0
    assert "caf\\xe9.png" in FeatureCache(tmp_path / "c")
    assert extract(imgs, tmp_path / "c", **kw(dinov3_path)).processed == 0  # reruns resume, they do not crash


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only")])
def test_disk_errors_end_in_one_line(tmp_path, imgs, dinov3_path, monkeypatch, code, words):
    def full(self, *a, **k):
        raise OSError(code, os.strerror(code), f"{self.store.path}/buckets")

    monkeypatch.setattr(Shards, "write", full)
    args = ["precompute", str(imgs), str(tmp_path / "c"), "--model", str(dinov3_path), "--area", "64"]
    r = CliRunner().invoke(app, [*args, "--dtype", "fp32", "--workers", "0", "--device", "cpu", "--json"])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip() and not ln.startswith("Loading weights")]
    assert len(lines) == 1 and words in lines[0] and "rerun" in lines[0], r.output


def test_feature_cache_pickles_for_spawn_workers(tmp_path, imgs, dinov3_path):
    cache = tmp_path / "c"
    extract(imgs, cache, **kw(dinov3_path))
    ds = FeatureDataset(cache)
    dl = DataLoader(
        ds, batch_size=1, num_workers=2, multiprocessing_context="spawn", collate_fn=collate_features, timeout=120
    )
    got = {b["key"][0]: b["patches"][0] for b in dl}
    fc = FeatureCache(cache)
    assert sorted(got) == sorted(fc.keys())
    for k, v in got.items():
        assert torch.equal(v.reshape(-1), torch.from_numpy(fc[k].patches).reshape(-1))
