"""FeatureCache, the fast shard reader, FeatureDataset, BucketBatchSampler and collate, on real caches."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from dinofeat.cache.markers import Markers
from dinofeat.cache.metadata import stamp
from dinofeat.cache.shardfile import ShardReader, read_layout
from dinofeat.cache.store import Store
from dinofeat.errors import CacheFormatError
from dinofeat.extraction.run import extract
from dinofeat.read.collate import collate_features
from dinofeat.read.dataset import FeatureDataset
from dinofeat.read.reader import FeatureCache
from dinofeat.read.sampler import BucketBatchSampler, plan_batches
from tests.helpers import FAST, bad_files, write_images


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("reader")
    imgs = root / "imgs"
    write_images(imgs, [(64, 48)] * 9 + [(48, 64)] * 7 + [(96, 32)] * 5 + [(64, 64)] * 3)
    bad_files(imgs / "bad")
    cache = root / "cache"
    s = extract(imgs, cache, model=str(tiny_models["dinov3"]), area=64, shard_mb=0.004, keep_registers=True, **FAST)
    assert s.done == 24 and s.failed == 5 and s.sealed
    return cache


def test_fast_path_equals_zarr_python(cache_dir):
    st = Store(cache_dir)
    assert max(b.num_shards for b in st.index.bucket_plans()) >= 3, "the test needs multi-shard arrays"
    for b in st.index.bucket_plans():
        for name in ("cls", "patches", "registers"):
            arr = zarr.open_array(str(cache_dir / "buckets" / b.name / name), mode="r")
            rd = ShardReader(read_layout(cache_dir / "buckets" / b.name / name))
            for r in range(b.rows):
                got = rd.read_row(r)
                assert got.dtype == arr.dtype
                np.testing.assert_array_equal(got, arr[r])


def test_feature_cache_access(cache_dir):
    fc = FeatureCache(cache_dir)
    assert len(fc) == 24 and len(fc.keys()) == 24
    assert fc.hidden_size == 32 and fc.patch_size == 16 and fc.num_register_tokens == 4
    assert fc.bucket_spec.area == 64
    assert all(k.startswith("bad/") for k in fc.failures)
    st = Store(cache_dir)
    names = [b.name for b in st.index.bucket_plans()]
    ix = st.index.read()
    for i, key in enumerate(fc.keys()):
        f = fc[i]
        g = fc[key]
        assert f.key == g.key == key
        np.testing.assert_array_equal(f.patches, g.patches)
        j = [str(k) for k in ix["key"]].index(key)
        bucket, row = names[ix["bucket"][j]], ix["row"][j]
        np.testing.assert_array_equal(f.patches, st.shards.read_rows(bucket, "patches", row, row + 1)[0])
        np.testing.assert_array_equal(f.cls, st.shards.read_rows(bucket, "cls", row, row + 1)[0])
        assert f.patches.shape == (f.bucket[1] // 16, f.bucket[0] // 16, 32)
        assert f.registers.shape == (4, 32)
    with pytest.raises(KeyError, match="failed during precompute"):
        fc["bad/zero.jpg"]
    with pytest.raises(KeyError, match="not in the cache"):
        fc["nope.png"]


def test_refuses_unsealed_unknown_version_and_unmarked(tmp_path, cache_dir):
    import shutil

    c = tmp_path / "c"
    shutil.copytree(cache_dir, c)
    meta_path = c / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["dinofeat"]["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheFormatError, match="format version 99"):
        FeatureCache(c)
    meta["attributes"]["dinofeat"]["format_version"] = 1
    meta["attributes"]["dinofeat"]["state"] = "planned"
    del meta["attributes"]["dinofeat"]["last_sealed"]  # never sealed: nothing to serve
    meta["attributes"]["dinofeat"] = stamp(meta["attributes"]["dinofeat"])  # as a writer would leave it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheFormatError, match="not sealed"):
        FeatureCache(c)
    meta["attributes"]["dinofeat"]["state"] = "sealed"
    meta["attributes"]["dinofeat"] = stamp(meta["attributes"]["dinofeat"])
    meta_path.write_text(json.dumps(meta))
    next((c / "_dinofeat" / "done").rglob("*.json")).unlink()
    # the reader opens from the marker summary written at seal (its rows still checked against their crcs), and
    # validate reports the lost marker; without the summary the reader itself refuses the unmarked shard
    from dinofeat.inspection.validate import validate

    assert any(p.check == "complete" for p in validate(c, progress=False).problems)
    (c / meta["attributes"]["dinofeat"]["marker_summary"]["path"]).unlink()
    with pytest.raises(CacheFormatError, match="no done marker"):
        FeatureCache(c)


def test_missing_or_truncated_shard_raises_not_zeros(tmp_path, cache_dir):
    import shutil

    c = tmp_path / "c"
    shutil.copytree(cache_dir, c)
    fc = FeatureCache(c)
    shard = next((c / "buckets").glob("*/patches/c/0/0/0/0"))
    data = shard.read_bytes()
    shard.write_bytes(data[:10])
    bucket = shard.parts[-7]
    victims = [k for k in range(len(fc)) if "{}x{}".format(*fc.buckets[fc.bucket_ids[k]]) == bucket]
    victims = [k for k in victims if fc._row[k] < Store(c).index.bucket_plans()[fc.bucket_ids[k]].shard_rows]
    with pytest.raises(CacheFormatError, match="truncated"):
        FeatureCache(c).read(victims[0], "patches")
    shard.unlink()
    with pytest.raises(CacheFormatError, match="missing"):
        FeatureCache(c).read(victims[0], "patches")


def test_dataset_with_extra_and_dataloader_workers(cache_dir):
    fc = FeatureCache(cache_dir)
    extra = {k: {"caption": k.upper(), "latent": torch.full((4,), float(i))} for i, k in enumerate(fc.keys()) if i % 3}
    ds = FeatureDataset(cache_dir, extra=extra, registers=True)
    assert len(ds) == len(extra)
    sampler = BucketBatchSampler(ds.bucket_ids, 4, seed=1)
    dl = DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=collate_features, persistent_workers=True)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = []
        for batch in dl:
            B = len(batch["key"])
            h, w = batch["grid"]
            assert batch["patches"].shape == (B, h * w, 32) and batch["cls"].shape == (B, 1, 32)
            assert batch["registers"].shape == (B, 4, 32)
            assert len(set(batch["bucket"])) == 1
            assert batch["extra"]["caption"] == [k.upper() for k in batch["key"]]
            for k, p in zip(batch["key"], batch["patches"], strict=True):
                np.testing.assert_array_equal(p.numpy(), fc[k].patches.reshape(h * w, 32))
            seen += batch["key"]
        assert set(seen) == set(extra)
    with pytest.raises(KeyError):
        FeatureDataset(cache_dir, extra=extra, missing="error")


def test_collate_mixed_shapes_pads_with_mask(cache_dir):
    ds = FeatureDataset(cache_dir)
    by_grid = {}
    for i in range(len(ds)):
        by_grid.setdefault(tuple(ds[i]["patches"].shape[:2]), i)
    samples = [ds[i] for i in by_grid.values()]
    with pytest.raises(ValueError, match="mixes grid shapes"):
        collate_features(samples)
    out = collate_features(samples, pad=True)
    lengths = [g[0] * g[1] for g in by_grid]
    assert out["patches"].shape == (len(samples), max(lengths), 32)
    assert out["mask"].sum(1).tolist() == lengths
    assert torch.equal(out["key_padding_mask"], ~out["mask"])
    for i, s in enumerate(samples):
        assert torch.equal(out["patches"][i, : lengths[i]], s["patches"].flatten(0, 1))
        assert not out["patches"][i, lengths[i] :].any()
    # the mask drops straight into attention: padded keys get no weight
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    q = torch.randn(len(samples), 3, 32)
    kv = out["patches"].float()
    _, attn = mha(q, kv, kv, key_padding_mask=out["key_padding_mask"])
    assert torch.all(attn[~out["mask"][:, None, :].expand_as(attn)] == 0)
    flat = collate_features([ds[0], ds[0]], flatten=False)
    assert flat["patches"].dim() == 4


BUCKETS = [0] * 10 + [1] * 7 + [2] * 3 + [3] * 1


@pytest.mark.parametrize(("world", "bs", "drop_last"), list(itertools.product([1, 2, 3], [1, 2, 4], [True, False])))
def test_sampler_ranks_disjoint_equal_and_covering(world, bs, drop_last):
    plans = [
        plan_batches(BUCKETS, bs, seed=7, epoch=3, drop_last=drop_last, rank=r, world_size=world) for r in range(world)
    ]
    assert len({len(p) for p in plans}) == 1, "unequal batch counts hang DDP"
    every = [i for p in plans for b in p for i in b]
    for p in plans:
        for b in p:
            assert len(b) == bs and len({BUCKETS[i] for i in b}) == 1
    if drop_last:
        assert len(every) == len(set(every)), "drop_last must never repeat an index"
    else:
        assert set(every) == set(range(len(BUCKETS)))
    assert plans == [
        plan_batches(BUCKETS, bs, seed=7, epoch=3, drop_last=drop_last, rank=r, world_size=world) for r in range(world)
    ]


def test_sampler_two_ranks_disjoint_without_padding():
    ids = [0] * 8 + [1] * 8
    r0 = plan_batches(ids, 4, seed=0, rank=0, world_size=2)
    r1 = plan_batches(ids, 4, seed=0, rank=1, world_size=2)
    assert len(r0) == len(r1) == 2
    a, b = {i for x in r0 for i in x}, {i for x in r1 for i in x}
    assert not a & b and a | b == set(range(16))


def test_sampler_epochs_and_seed():
    s = BucketBatchSampler(BUCKETS, 2, seed=0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0
    s.set_epoch(0)
    assert list(s) == e0 and len(s) == len(e0)
    assert list(BucketBatchSampler(BUCKETS, 2, seed=1)) != e0
    assert sorted(map(sorted, BucketBatchSampler(BUCKETS, 2, shuffle=False).plan())) == sorted(
        map(sorted, BucketBatchSampler(BUCKETS, 2, shuffle=False).plan())
    )
    with pytest.raises(ValueError):
        BucketBatchSampler(BUCKETS, 2, rank=2, world_size=2)


def _open_fds_under(path) -> int:
    import contextlib
    import os

    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used is gone by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            n += target.startswith(str(path)) and target != str(path)  # shard files, not a reader's cache dir fd
    return n


@pytest.mark.parametrize("max_open", [1, 3])
def test_one_fd_budget_across_buckets_and_arrays(cache_dir, max_open):
    """Every bucket and array shares one LRU of open shard files, so millions of shards never exhaust ulimit -n;
    eviction under a tiny budget changes no value."""
    ref = FeatureCache(cache_dir)
    fc = FeatureCache(cache_dir, max_open_files=max_open)
    assert sum(b.num_shards for b in Store(cache_dir).index.bucket_plans()) > 3 * max_open
    for i in [*range(len(fc)), *reversed(range(len(fc)))]:
        f, g = fc[i], ref[i]
        np.testing.assert_array_equal(f.patches, g.patches)
        np.testing.assert_array_equal(f.registers, g.registers)
        assert _open_fds_under(cache_dir) - len(ref._pool) <= max_open
    fc.close()
    assert len(fc._pool) == 0


def test_rows_are_writable_fresh_arrays(cache_dir):
    fc = FeatureCache(cache_dir)
    a, b = fc.read(0, "patches"), fc.read(0, "patches")
    assert a.flags.writeable and not np.shares_memory(a, b)
    a[:] = 0
    assert b.any()


def test_version_1_caches_still_read(tmp_path, cache_dir):
    """Format 2 only added incremental parts and metadata.index_group; a version 1 cache reads unchanged."""
    import shutil

    c = tmp_path / "v1"
    shutil.copytree(cache_dir, c)
    meta_path = c / "zarr.json"
    meta = json.loads(meta_path.read_text())
    attrs = meta["attributes"]["dinofeat"]
    attrs["format_version"] = 1
    attrs.pop("index_group")
    for b in attrs["buckets"]:
        b.pop("part")
    meta["attributes"]["dinofeat"] = stamp(attrs)
    meta_path.write_text(json.dumps(meta))
    old, new = FeatureCache(c), FeatureCache(cache_dir)
    assert old.keys() == new.keys() and old.buckets == new.buckets
    for i in range(len(new)):
        np.testing.assert_array_equal(old[i].patches, new[i].patches)


# ---- the marker summary: one read opens a sealed cache ----------------------------------------------------------
def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_sealed_cache_opens_without_reading_any_marker(cache_dir, monkeypatch):
    from dinofeat.cache.checksum import expected_checksums

    st = Store(cache_dir)
    summary = st.markers.summary(st.meta["marker_summary"])
    assert summary is not None
    marked, expected = summary
    markers = st.markers.read()
    assert marked == set(markers) and len(marked) > 1
    want = expected_checksums(markers, st.index.bucket_plans())
    assert expected.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(expected[k].values, want[k].values)
        np.testing.assert_array_equal(expected[k].missing, want[k].missing)
        assert expected[k].values.dtype == np.uint32

    def no_listing(self):
        raise AssertionError("a sealed cache must open from its marker summary")

    monkeypatch.setattr(Markers, "read", no_listing)
    fc = FeatureCache(cache_dir)
    assert all(fc.read(i, "patches").size for i in range(len(fc)))


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_or_missing_marker_summary_falls_back_to_the_markers(cache_dir, tmp_path, monkeypatch, damage):
    cache = _copy(cache_dir, tmp_path / "c")
    rel = Store(cache).meta["marker_summary"]["path"]
    if damage == "flip":
        data = bytearray((cache / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (cache / rel).write_bytes(bytes(data))
    else:
        (cache / rel).unlink()
    listed = []
    real = Markers.read
    monkeypatch.setattr(Markers, "read", lambda self: listed.append(1) or real(self))
    fc = FeatureCache(cache)
    assert listed, "the damaged summary was trusted"
    ref = FeatureCache(cache_dir)
    for i in range(len(fc)):
        np.testing.assert_array_equal(fc.read(i, "patches"), ref.read(i, "patches"))


@pytest.mark.parametrize(
    ("rows", "shard_rows", "marked", "want"),
    [
        # every shard recorded its rows' crcs
        (5, 2, {0: [7, 8], 1: [9, 2**32 - 1], 2: [0]}, [7, 8, 9, 2**32 - 1, 0]),
        # shard 1 recorded none (a format 1-2 marker): its rows are unknown (-1), the others are kept
        (5, 2, {0: [7, 8], 2: [5]}, [7, 8, -1, -1, 5]),
        # a chunk that was empty when written (an all-zero row) has -1 inside a shard that recorded the others
        (4, 4, {0: [3, -1, 4, -1]}, [3, -1, 4, -1]),
        # one shard only
        (3, 3, {0: [1, 2, 3]}, [1, 2, 3]),
    ],
)
def test_row_crcs_are_uint32_plus_the_rows_without_one(rows, shard_rows, marked, want):
    """What a reader holds for every row it serves: 4 bytes a row plus the rows with no crc, and it round-trips
    through the marker summary's int64 form (-1 unknown)."""
    from dinofeat.cache.checksum import RowCrcs, expected_checksums
    from dinofeat.cache.layout import BucketPlan

    bp = BucketPlan(32, 32, 16, rows, shard_rows)
    markers = {(bp.name, u): {"crc32c": {"patches": crcs}} for u, crcs in marked.items()}
    got = expected_checksums(markers, [bp])[(bp.name, "patches")]
    assert [got[r] for r in range(rows)] == want
    assert got.values.dtype == np.uint32 and got.values.nbytes == 4 * rows
    assert got.missing.tolist() == [r for r, w in enumerate(want) if w == -1]
    back = RowCrcs.from_int64(got.to_int64())
    assert [back[r] for r in range(rows)] == want
    assert got.to_int64().tolist() == want
