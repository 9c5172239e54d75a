"""Images replaced by one of other dimensions (same name) after planning (issue 32, item 2): never stored in the
bucket planned for the old image. A decode worker that finds other dimensions than the plan's fails the image for
that shard ("changed since planned"); the next run plans it again into the bucket of its new size (its old row
stays vacant), and --repair does the same for done images. Each test fails on the code before the fix."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dinofeat.buckets import BucketSpec
from dinofeat.cache import metafile
from dinofeat.cache.layout import VACANT_ROWS_VERSION, extend_plan
from dinofeat.cache.store import Store
from dinofeat.cli import app, render
from dinofeat.errors import CHANGED_SINCE_PLANNED, CacheFormatError
from dinofeat.extraction import loader
from dinofeat.extraction import run as run_module
from dinofeat.extraction.plan import make_plan
from dinofeat.extraction.run import extract
from dinofeat.images.probe import Probe
from dinofeat.inspection.validate import validate
from dinofeat.read.reader import FeatureCache
from tests.helpers import FAST, add_member, make_shards, noise_image, png_bytes, write_images

runner = CliRunner()
LANDSCAPE, PORTRAIT = (64, 48), (48, 64)  # buckets 80x64 and 64x80 at area 64


def kw(model: Path, **more) -> dict:
    return {**FAST, "model": str(model), "area": 64, "shard_mb": 0.001, **more}  # 2 images a shard


def unfinish(cache: Path, keep: int) -> set[str]:
    """An interrupted run: every done marker but the first `keep` is gone (with its shard files). Returns the keys
    of the shards still to do."""
    st = Store(cache, mode="r+")
    st.metafile.update(state="planned")
    plan, pending = st.index.plan(), set()
    for k, (b, u) in enumerate(sorted(st.markers.read())):
        if k >= keep:
            st.files.delete(st.markers.path(b, u))
            for f in st.shards.files(b, u):
                st.files.delete(f)
            pending.add((b, u))
    return {key for i, key in enumerate(plan.keys) if plan.shard_of(i) in pending}


def replace_file(path: Path, size: tuple[int, int], seed: int) -> None:
    """The same name, another image of other dimensions."""
    noise_image(*size, seed).save(path, format="PNG")


def replace_member(shard: Path, name: str, data: bytes) -> None:
    """The tar shard written again with member `name` holding `data` (the other members as they were)."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        for m, old in members:
            m.size = len(data if m.name == name else old)
            tf.addfile(m, io.BytesIO(data if m.name == name else old))


def index_facts(cache: Path) -> dict[str, tuple[int, int, float, tuple[int, int]]]:
    """key -> (src_w, src_h, distortion, size of its bucket) as the index records them."""
    plan = Store(cache).index.plan()
    out = {}
    for i, k in enumerate(plan.keys):
        b = plan.buckets[int(plan.bucket[i])] if plan.bucket[i] >= 0 else None
        size = (b.width, b.height) if b else (0, 0)
        out[k] = (int(plan.src_w[i]), int(plan.src_h[i]), float(plan.distortion[i]), size)
    return out


def assert_like_a_fresh_build(cache: Path, source: str | Path, model: Path, fresh: Path) -> None:
    """The cache serves what a cache built now from `source` serves: the same keys, each in a bucket of the same size
    with the same features, and the index's width, height and distortion of every image are the fresh ones."""
    extract(source, fresh, **kw(model))
    a, b = FeatureCache(cache), FeatureCache(fresh)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in b.keys():  # noqa: SIM118 (iterating yields Features)
        fa, fb = a[k], b[k]
        assert fa.bucket == fb.bucket, k
        np.testing.assert_allclose(fa.patches, fb.patches, rtol=1e-3, atol=1e-3, err_msg=k)
        np.testing.assert_allclose(fa.cls, fb.cls, rtol=1e-3, atol=1e-3, err_msg=k)
    got, want = index_facts(cache), index_facts(fresh)
    assert {k: got[k] for k in b.keys()} == {k: want[k] for k in b.keys()}  # noqa: SIM118
    for name, stats in b.meta["channel_stats"].items():  # the old image's features are in no statistics
        assert a.meta["channel_stats"][name]["count"] == stats["count"]
        np.testing.assert_allclose(a.meta["channel_stats"][name]["mean"], stats["mean"], rtol=1e-4, atol=1e-4)


def assert_failed_as_changed(cache: Path, keys: set[str]) -> None:
    fc = FeatureCache(cache)
    for k in keys:
        assert k not in fc and fc.failures[k].startswith(CHANGED_SINCE_PLANNED), (k, fc.failures.get(k))


# ---- the plan: a moved key keeps its place in the index, its old row becomes vacant -----------------------------
def plan_of(keys: list[str], sizes: list[tuple[int, int] | None], part: int):
    probes = [Probe(k, *wh, 1, 1) if wh else Probe(k, 0, 0, 1, 1, "corrupt or truncated: x") for k, wh in
              zip(keys, sizes, strict=True)]  # fmt: skip
    return make_plan(keys, probes, BucketSpec(64, 16, 0.25, 4.0, 9), 16, 8, "fp16", 10**6, 0, part)


@pytest.mark.parametrize(
    ("old_sizes", "moved", "added"),
    [
        ([LANDSCAPE] * 3 + [PORTRAIT], {1: PORTRAIT}, []),  # row 1 of the landscape bucket becomes vacant
        ([LANDSCAPE, PORTRAIT, LANDSCAPE], {0: PORTRAIT, 1: LANDSCAPE}, [LANDSCAPE]),  # two swap; a new image too
        ([LANDSCAPE, LANDSCAPE], {1: None}, []),  # its new header cannot be read: a failed probe now
    ],
)
def test_extend_plan_moves_keys_and_leaves_their_old_rows_vacant(old_sizes, moved, added):
    old = plan_of([f"a{i}" for i in range(len(old_sizes))], old_sizes, 0)
    keys = [f"a{i}" for i in moved] + [f"b{i}" for i in range(len(added))]
    new = plan_of(keys, [*moved.values(), *added], 1)
    with pytest.raises(ValueError, match="only add keys"):
        extend_plan(old, new)
    ext = extend_plan(old, new, {f"a{i}" for i in moved})
    assert ext.keys == old.keys + [f"b{i}" for i in range(len(added))] and ext.vacant_rows() == len(moved)
    for i in range(len(old)):
        j = keys.index(old.keys[i]) if old.keys[i] in keys else None
        if j is None:  # untouched
            assert (ext.bucket[i], ext.row[i], ext.src_w[i]) == (old.bucket[i], old.row[i], old.src_w[i])
        elif new.bucket[j] < 0:
            assert ext.bucket[i] == -1 and ext.probe_errors == {i: new.probe_errors[j]}
        else:
            b = ext.buckets[ext.bucket[i]]
            assert b.part == 1 and (b.width, b.height) == new.buckets[new.bucket[j]].size
            assert (ext.row[i], ext.src_w[i], ext.src_h[i]) == (new.row[j], new.src_w[j], new.src_h[j])
            assert ext.distortion[i] == new.distortion[j]
    held = ext.rows_to_keys()
    vacant = {(old.buckets[old.bucket[i]].name, int(old.row[i])) for i in moved}
    assert {(b.name, int(r)) for b in ext.buckets for r in np.flatnonzero(held[b.name] < 0)} == vacant


# ---- a folder ----------------------------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path: Path) -> Path:
    imgs = tmp_path / "imgs"
    write_images(imgs, [LANDSCAPE] * 6 + [PORTRAIT] * 2)
    return imgs


def test_replaced_before_a_resume_is_planned_again_into_its_bucket(folder, tmp_path, dinov3_path, capsys, monkeypatch):
    cache = tmp_path / "c"
    extract(folder, cache, **kw(dinov3_path))
    key = sorted(k for k in unfinish(cache, keep=1) if k < "im_006")[0]  # a landscape image of a shard to do
    replace_file(folder / key, PORTRAIT, seed=50)
    s = extract(folder, cache, **kw(dinov3_path))  # the resume: never stored in the landscape bucket
    assert s.sealed and s.failures_by_reason == {CHANGED_SINCE_PLANNED: 1}
    assert_failed_as_changed(cache, {key})
    render.summary(s, repair_asked=False)
    assert "rerun the same command to plan them again" in capsys.readouterr().out
    out = runner.invoke(app, ["validate", str(cache), "--images", str(folder)]).output
    assert f"replaced   {key}: not stored: {CHANGED_SINCE_PLANNED}" in out and "rerun the same precompute" in out, out
    again = extract(folder, cache, **kw(dinov3_path))  # the next run plans it again, into a new part
    assert again.sealed and again.processed == 1 and again.failed == 0
    r = validate(cache, images=folder, recompute=3, progress=False)
    assert r.ok, r.problems
    assert_like_a_fresh_build(cache, folder, dinov3_path, tmp_path / "fresh")
    assert Store(cache).format_version == VACANT_ROWS_VERSION  # what dinofeat 0.6.1 read (1 to 4) refuses it
    monkeypatch.setattr(metafile, "READABLE_VERSIONS", (1, 2, 3, 4))
    with pytest.raises(CacheFormatError, match="version 5"):
        FeatureCache(cache)
    monkeypatch.undo()
    for marker in (cache / "_dinofeat" / "done" / "80x64").glob("*.json"):  # as if the vacant row were stored
        body = json.loads(marker.read_text())
        if body["failed"]:
            marker.write_text(json.dumps({**body, "failed": {}}))
    found = {p.where: p.reason for p in validate(cache, progress=False).problems if p.check == "index"}
    assert list(found.values()) == ["held by no image, yet its done marker says it was stored"], found


def test_replaced_during_a_run_is_never_stored_in_the_old_bucket(folder, tmp_path, dinov3_path, monkeypatch):
    real = run_module.run_shards
    changed = {"im_002.png": PORTRAIT, "im_007.png": LANDSCAPE}

    def replaced_after_planning(*args, **kwargs):
        for key, size in changed.items():
            replace_file(folder / key, size, seed=60)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "run_shards", replaced_after_planning)
    cache = tmp_path / "c"
    assert extract(folder, cache, **kw(dinov3_path)).sealed
    monkeypatch.setattr(run_module, "run_shards", real)
    assert_failed_as_changed(cache, set(changed))
    again = extract(folder, cache, **kw(dinov3_path))
    assert again.sealed and again.processed == 2 and again.failed == 0
    assert validate(cache, images=folder, progress=False).ok
    assert_like_a_fresh_build(cache, folder, dinov3_path, tmp_path / "fresh")


def test_replaced_before_a_repair_is_moved_to_its_bucket(folder, tmp_path, dinov3_path):
    cache = tmp_path / "c"
    extract(folder, cache, **kw(dinov3_path))
    reader = FeatureCache(cache)  # open across the repair, its shard too: it keeps serving what it opened
    before = reader["im_003.png"]
    replace_file(folder / "im_003.png", PORTRAIT, seed=70)
    stale = {p.where: p.reason for p in validate(cache, images=folder, progress=False).problems}
    assert "now 48x64" in stale["im_003.png"] and "--repair" in stale["im_003.png"]
    s = extract(folder, cache, repair=True, **kw(dinov3_path))
    assert s.sealed and s.failed == 0 and any("im_003.png" in d for d in s.repaired)
    r = validate(cache, images=folder, recompute=8, progress=False)
    assert r.ok, r.problems
    assert_like_a_fresh_build(cache, folder, dinov3_path, tmp_path / "fresh")
    kept = reader["im_003.png"]  # the generation it opened
    assert kept.bucket == before.bucket == (80, 64) and np.array_equal(kept.cls, before.cls)
    assert extract(folder, cache, repair=True, **kw(dinov3_path)).processed == 0  # nothing left to repair


def test_an_image_a_past_run_stored_in_the_old_bucket_is_found_and_moved(folder, tmp_path, dinov3_path, monkeypatch):
    """What dinofeat 0.6.1 left after a resume (or a repair) that read a replaced image: its features made in the
    old image's bucket, the index recording the new bytes' size and time (not stale by them) and the old dimensions.
    validate --images and --recompute name it; --repair moves it into its bucket."""
    cache = tmp_path / "c"
    extract(folder, cache, **kw(dinov3_path))
    key = sorted(k for k in unfinish(cache, keep=1) if k < "im_006")[0]
    replace_file(folder / key, PORTRAIT, seed=50)
    real = loader.load_resized
    monkeypatch.setattr(loader, "load_resized", lambda path, size, recipe, planned=None: real(path, size, recipe))
    extract(folder, cache, **kw(dinov3_path))  # 0.6.1's decode worker: no dimension check
    monkeypatch.undo()
    assert FeatureCache(cache)[key].bucket == (80, 64)
    found = {(p.check, p.where): p.reason for p in validate(cache, folder, recompute=8, progress=False).problems}
    assert "now 48x64" in found[("stale", key)] and "now 48x64" in found[("recompute", key)], found
    assert extract(folder, cache, repair=True, **kw(dinov3_path)).sealed
    r = validate(cache, images=folder, recompute=8, progress=False)
    assert r.ok, r.problems
    assert_like_a_fresh_build(cache, folder, dinov3_path, tmp_path / "fresh")


# ---- tar shards --------------------------------------------------------------------------------------------------
@pytest.fixture
def shards(tmp_path: Path) -> str:
    make_shards(tmp_path / "shards", tmp_path / "folder", shards=2)
    return str(tmp_path / "shards" / "shard-{000000..000001}.tar")


def test_a_tar_member_replaced_before_a_resume_is_planned_again(shards, tmp_path, dinov3_path):
    cache = tmp_path / "c"
    extract(shards, cache, **kw(dinov3_path))
    key = "shard-000001/000003"  # 80x60, bucket 80x64; the shard's last image (no other image member moves)
    assert key in unfinish(cache, keep=1)
    replace_member(tmp_path / "shards" / "shard-000001.tar", "000003.png", png_bytes(*PORTRAIT, 80))
    assert extract(shards, cache, **kw(dinov3_path)).sealed
    assert_failed_as_changed(cache, {key})
    assert extract(shards, cache, **kw(dinov3_path)).processed == 1
    r = validate(cache, images=shards, progress=False)
    assert r.ok, r.problems
    assert_like_a_fresh_build(cache, shards, dinov3_path, tmp_path / "fresh")


def test_a_tar_member_replaced_before_a_repair_is_moved_to_its_bucket(shards, tmp_path, dinov3_path):
    cache = tmp_path / "c"
    extract(shards, cache, **kw(dinov3_path))
    replace_member(tmp_path / "shards" / "shard-000001.tar", "000003.png", png_bytes(*PORTRAIT, 90))
    stale = {p.where: p.reason for p in validate(cache, images=shards, progress=False).problems}
    assert "now 48x64" in stale["shard-000001/000003"]
    assert extract(shards, cache, repair=True, **kw(dinov3_path)).sealed
    r = validate(cache, images=shards, progress=False)
    assert r.ok, r.problems
    assert_like_a_fresh_build(cache, shards, dinov3_path, tmp_path / "fresh")


def _bmp(size: tuple[int, int], seed: int) -> bytes:
    out = io.BytesIO()
    noise_image(*size, seed).save(out, format="BMP")  # uncompressed: 64x48 and 48x64 are the same number of bytes
    return out.getvalue()


def test_a_member_rewritten_with_its_size_and_time_kept_gets_advice_that_works(tmp_path, dinov3_path):
    """A tar written with fixed member times (reproducible tars, `add_member`) whose uncompressed image is replaced
    by one of other dimensions and the same byte count: neither stat nor the tar header shows a change, so
    `--repair` (which compares size and mtime) cannot see it; `validate --recompute` does, and its advice must be
    the one that fixes it (before: "rerun precompute --repair", which changed nothing, for ever)."""
    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        add_member(tf, "000000.bmp", _bmp(LANDSCAPE, 1))
        add_member(tf, "000001.bmp", _bmp((64, 64), 2))
    cache, key = tmp_path / "c", "shard-000000/000000"
    assert extract(str(shard), cache, **kw(dinov3_path)).sealed
    portrait = _bmp(PORTRAIT, 3)
    assert len(portrait) == len(_bmp(LANDSCAPE, 1))
    replace_member(shard, "000000.bmp", portrait)  # same name, size, mtime and offset
    assert validate(cache, images=str(shard), progress=False).ok  # what stat and the header show: nothing
    found = {p.where: p.reason for p in validate(cache, images=str(shard), recompute=2, progress=False).problems}
    assert "now 48x64" in found[key] and "write it with a new modification time" in found[key], found
    assert "rerun precompute --repair" not in found[key].split("which is all")[0], found
    with tarfile.open(shard) as tf:  # doing what it says: the member written again with the time of writing
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            m.mtime = m.mtime + 60 if m.name == "000000.bmp" else m.mtime
            tf.addfile(m, io.BytesIO(data))
    assert extract(str(shard), cache, repair=True, **kw(dinov3_path)).sealed
    assert validate(cache, images=str(shard), recompute=2, progress=False).ok
    assert_like_a_fresh_build(cache, str(shard), dinov3_path, tmp_path / "fresh")


@pytest.mark.slow
def test_two_processes_plan_replaced_members_again(shards, tmp_path, dinov3_path):
    """Rank 1 reads image locations from the plan: a member planned again is read where the new plan says."""
    from dinofeat.extraction.config import ExtractConfig
    from dinofeat.extraction.launch import extract_processes

    config = ExtractConfig(**kw(dinov3_path))
    cache = tmp_path / "c"
    extract_processes(shards, cache, config, 2)
    pending = unfinish(cache, keep=4)  # shards of 1 image; buckets 64x64 and 64x80 done, 80x64 to do
    done = sorted(k for k in index_facts(cache) if k not in pending and k.endswith(("000000", "000001")))[0]
    todo = "shard-000001/000003"
    assert todo in pending
    replace_member(tmp_path / "shards" / "shard-000001.tar", "000003.png", png_bytes(*PORTRAIT, 80))
    stem, name = done.split("/")
    size = PORTRAIT if name == "000000" else LANDSCAPE  # SHARD_SIZES: 000000 is 64x48, 000001 is 48x64
    replace_member(tmp_path / "shards" / f"{stem}.tar", f"{name}.png", png_bytes(*size, 81))
    assert extract_processes(shards, cache, config, 2).sealed
    assert_failed_as_changed(cache, {todo})
    assert extract_processes(shards, cache, config, 2, repair=True).sealed
    r = validate(cache, images=shards, progress=False)
    assert r.ok, r.problems
    assert_like_a_fresh_build(cache, shards, dinov3_path, tmp_path / "fresh")
