"""Incremental runs: new images get arrays of their own (a new part); finished shards are never touched."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dinofeat.buckets import BucketSpec
from dinofeat.cache import housekeeping
from dinofeat.cache.metafile import MetaFile
from dinofeat.cache.store import Store
from dinofeat.extraction.plan import extend_plan, make_plan
from dinofeat.extraction.run import extract
from dinofeat.images.probe import Probe
from dinofeat.inspection.validate import validate
from dinofeat.read.reader import FeatureCache
from tests.helpers import FAST, write_images

SPEC = BucketSpec(64, 16, 0.25, 4.0, 9)


def _plan(sizes: list[tuple[int, int] | None], part: int, prefix: str):
    keys = [f"{prefix}{i}.png" for i in range(len(sizes))]
    probes = [
        Probe(k, *wh, 1, 1) if wh else Probe(k, 0, 0, 1, 1, "corrupt or truncated: x")
        for k, wh in zip(keys, sizes, strict=True)
    ]
    return make_plan(keys, probes, SPEC, 16, 8, "fp16", 3 * (4 * 4 + 1) * 8 * 2, 0, part)


@pytest.mark.parametrize(
    ("old_sizes", "new_sizes"),
    [
        ([(64, 64)] * 4, [(64, 64)] * 2),  # same bucket: a second array group of that size
        ([(64, 64)] * 4 + [(96, 48)], [(48, 96), None, (64, 64)]),  # new size, a failed probe, an old size
        ([None], [(64, 64)]),  # everything failed before
        ([(64, 64)] * 2, []),  # nothing new
    ],
)
def test_extend_plan_keeps_old_rows_and_offsets_new_buckets(old_sizes, new_sizes):
    old, new = _plan(old_sizes, 0, "a"), _plan(new_sizes, 1, "b")
    ext = extend_plan(old, new)
    assert ext.keys == old.keys + new.keys
    np.testing.assert_array_equal(ext.bucket[: len(old)], old.bucket)
    np.testing.assert_array_equal(ext.row, np.concatenate([old.row, new.row]))
    assert ext.buckets[: len(old.buckets)] == old.buckets
    assert [s for s in ext.shards() if s.bucket in {b.name for b in old.buckets}] == old.shards()
    for i in range(len(new)):
        j = len(old) + i
        if new.bucket[i] < 0:
            assert ext.bucket[j] == -1 and ext.probe_errors[j] == new.probe_errors[i]
        else:
            assert ext.buckets[ext.bucket[j]] == new.buckets[new.bucket[i]]
            assert ext.buckets[ext.bucket[j]].name.endswith("_1")
    with pytest.raises(ValueError, match="only add keys"):
        extend_plan(old, old)
    if old.buckets and new.buckets:
        with pytest.raises(ValueError, match="part number"):
            extend_plan(old, _plan(new_sizes, 0, "c"))


def _mtimes(cache: Path) -> dict[str, int]:
    roots = [cache / "buckets", cache / "_dinofeat" / "done"]
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for r in roots for p in r.rglob("*") if p.is_file()}


def _features(cache: Path) -> dict[str, tuple]:
    fc = FeatureCache(cache)
    return {k: (fc[k].bucket, fc[k].cls, fc[k].patches) for k in fc.keys()}  # noqa: SIM118


OLD = [(64, 64)] * 5 + [(96, 48)] * 3
NEW = [(64, 64)] * 3 + [(48, 96)] * 2


def test_incremental_run_touches_no_finished_shard_and_equals_fresh_union(tmp_path, dinov3_path):
    imgs, union = tmp_path / "imgs", tmp_path / "union"
    write_images(imgs, OLD)
    kw = {**FAST, "model": str(dinov3_path), "area": 64, "shard_mb": 0.002, "batch_size": 1}
    cache = tmp_path / "inc"
    assert extract(imgs, cache, **kw).sealed
    before = _mtimes(cache)
    assert sum(1 for k in before if k.startswith("buckets/") and "/c/" in k) >= 4
    write_images(imgs / "later", NEW, start_seed=50)
    s = extract(imgs, cache, **kw)
    assert s.appended == len(NEW) and s.processed == len(NEW) and s.sealed and s.done == len(OLD) + len(NEW)
    after = _mtimes(cache)
    assert {k: after[k] for k in before} == before, "a finished shard or marker was rewritten"
    st = Store(cache)
    assert {b.part for b in st.index.bucket_plans()} == {0, 1}
    # the previous index stays one generation, for readers that opened the metadata just before the switch
    assert not housekeeping.orphan_groups(st) and sorted(p.name for p in cache.glob("index*")) == ["index", "index_1"]

    shutil.copytree(imgs, union)
    fresh = tmp_path / "fresh"
    extract(union, fresh, **kw)
    got, want = _features(cache), _features(fresh)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][0] == want[k][0], k
        np.testing.assert_array_equal(got[k][1], want[k][1], err_msg=k)
        np.testing.assert_array_equal(got[k][2], want[k][2], err_msg=k)
    fc = FeatureCache(cache)
    assert len(fc.buckets) == len(set(fc.buckets)), "bucket ids group by size across parts"
    for i in range(len(fc)):
        assert fc.buckets[fc.bucket_ids[i]] == fc[i].bucket
    rep = validate(cache, imgs, progress=False)
    assert rep.ok, rep.problems

    again = extract(imgs, cache, **kw)
    assert again.appended == 0 and again.processed == 0


def test_removed_images_are_reported_and_kept(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, OLD)
    kw = {**FAST, "model": str(dinov3_path), "area": 64}
    cache = tmp_path / "c"
    extract(imgs, cache, **kw)
    paths[0].unlink()
    s = extract(imgs, cache, **kw)
    assert s.removed_files == 1 and s.removed_examples == [paths[0].name] and s.processed == 0 and s.sealed
    assert paths[0].name in FeatureCache(cache)


def test_crash_before_the_metadata_switch_leaves_the_old_cache_intact(tmp_path, dinov3_path, monkeypatch):
    imgs = tmp_path / "imgs"
    write_images(imgs, OLD)
    kw = {**FAST, "model": str(dinov3_path), "area": 64}
    cache = tmp_path / "c"
    extract(imgs, cache, **kw)
    keys = FeatureCache(cache).keys()
    write_images(imgs / "later", NEW, start_seed=50)

    def boom(self, **changes):
        raise OSError("disk full")

    monkeypatch.setattr(MetaFile, "update", boom)
    with pytest.raises(OSError, match="disk full"):
        extract(imgs, cache, **kw)
    monkeypatch.undo()
    st = Store(cache)
    assert st.meta["state"] == "sealed" and FeatureCache(cache).keys() == keys  # still the old, complete cache
    assert housekeeping.orphan_groups(st), "the crashed extension left groups behind (the test must exercise cleanup)"
    rep = validate(cache, progress=False)
    assert {p.check for p in rep.problems} == {"orphan"} and len(rep.problems) == len(housekeeping.orphan_groups(st))
    s = extract(imgs, cache, **kw)
    assert s.appended == len(NEW) and s.sealed
    assert not housekeeping.orphan_groups(Store(cache))
    assert validate(cache, imgs, progress=False).ok


def test_manual_split_rank_waits_for_rank_0s_extension(tmp_path, dinov3_path):
    """Without a process group, a rank that sees a sealed cache while its folder holds new images waits until
    rank 0 has extended the plan, instead of treating the old plan as final."""
    import threading

    from dinofeat.cache.lifecycle import join, open_or_create
    from dinofeat.extraction.config import ExtractConfig
    from dinofeat.extraction.prepare import prepare, request_for
    from dinofeat.extraction.ranks import wait_until
    from dinofeat.sources.discover import discover

    imgs = tmp_path / "imgs"
    write_images(imgs, OLD)
    cfg = ExtractConfig(model=str(dinov3_path), area=64, **FAST)
    cache = tmp_path / "c"
    extract(imgs, cache, cfg)
    write_images(imgs / "later", NEW, start_seed=50)
    prep, src = prepare(cfg), discover(imgs)
    request = request_for(src, prep, progress=False)
    got: dict = {}

    def wait(ready, what):
        wait_until(ready, what, 120)

    rank1 = threading.Thread(target=lambda: got.update(plan=join(cache, request, wait)[1]))
    rank1.start()
    rank1.join(timeout=3)
    assert rank1.is_alive(), "rank 1 took the sealed, not yet extended plan as final"
    _, plan, appended = open_or_create(cache, request, overwrite=False)  # rank 0 extends
    rank1.join(timeout=60)
    assert appended == len(NEW) and not rank1.is_alive()
    assert got["plan"].keys == plan.keys and len(plan) == len(OLD) + len(NEW)


def test_a_store_opened_before_an_extension_reads_the_new_index(tmp_path, dinov3_path):
    import shutil as sh

    imgs = tmp_path / "imgs"
    write_images(imgs, OLD)
    kw = {**FAST, "model": str(dinov3_path), "area": 64}
    cache = tmp_path / "c"
    extract(imgs, cache, **kw)
    early = Store(cache)  # metadata read now, index not yet
    write_images(imgs / "later", NEW, start_seed=50)
    extract(imgs, cache, **kw)
    sh.rmtree(cache / "index")  # as a second extension would
    ix = early.index.read()
    assert len(ix["key"]) == len(OLD) + len(NEW) and early.meta["index_group"] == "index_1"
    assert len(early.index.plan()) == len(OLD) + len(NEW)
