"""Tar shard sources (webdataset / img2dataset layout): brace patterns, keys, streaming reads by byte range, bad
members recorded, features bit-identical to the same images in a folder."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from dinofeat.errors import ConfigError
from dinofeat.extraction.run import extract
from dinofeat.images.probe import probe
from dinofeat.inspection.validate import validate
from dinofeat.read.reader import FeatureCache
from dinofeat.sources import archive
from dinofeat.sources.archive import Member, expand_braces, sample_key
from dinofeat.sources.discover import discover
from tests.helpers import (
    FAST,
    add_member,
    assert_same_pairs,
    bad_files,
    make_parquet,
    make_shards,
    noise_image,
    png_bytes,
)


@pytest.mark.parametrize(
    ("pattern", "want"),
    [
        ("a.tar", ["a.tar"]),
        ("s/{000..002}.tar", ["s/000.tar", "s/001.tar", "s/002.tar"]),
        ("s/{8..10}.tar", ["s/8.tar", "s/9.tar", "s/10.tar"]),
        ("{a,b}/{0..1}.tar", ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]),
        ("s/shard-{000009..000010}.tar", ["s/shard-000009.tar", "s/shard-000010.tar"]),
    ],
)
def test_expand_braces(pattern, want):
    assert expand_braces(pattern) == want


@pytest.mark.parametrize("pattern", ["s/{3..1}.tar", "s/{x}.tar"])
def test_expand_braces_refuses(pattern):
    with pytest.raises(ConfigError):
        expand_braces(pattern)


@pytest.mark.parametrize(
    ("name", "key"),
    [("000123.jpg", "000123"), ("dir/000123.jpg", "dir/000123"), ("a.b.c.png", "a"), ("x/y.z/w.q.jpg", "x/y.z/w")],
)
def test_sample_key_is_webdatasets(name, key):
    assert sample_key(name) == key


@pytest.mark.parametrize(
    "name",
    ["a.jpg", "d/a.jpg", "./a.jpg", "././d/a.jpg", "d//a.jpg", "d/./a.jpg", "/abs.jpg", "/d/abs.jpg", "d/a.jpg/",
     ".hidden/a.jpg", "d/.x.jpg", "a..jpg", "ü/ä.b.jpg", "d/", "noext", "x/.", "../up.jpg"],
)  # fmt: skip
def test_sample_keys_fast_path_agrees_with_pure_posix_path(name):
    """The listing's string fast path gives the key PurePosixPath's rule gives (0.7.0's keys: a rerun finds them)."""
    from pathlib import PurePosixPath

    p = PurePosixPath(name)
    stem = p.name.split(".", 1)[0]
    assert sample_key(name) == ((p.parent / stem).as_posix() if str(p.parent) != "." else stem)


def test_tar_shards_give_the_same_features_as_a_folder(tmp_path, dinov3_path):
    pairs = make_shards(tmp_path / "shards", tmp_path / "folder")
    pattern = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    src = discover(pattern)
    assert set(src.keys) == {*pairs, "shard-000000/000099"}  # captions and json skipped
    s = extract(pattern, tmp_path / "from-tar", model=str(dinov3_path), area=64, store_dtype="fp32", **FAST)
    assert (s.done, s.failed) == (8, 1)
    extract(tmp_path / "folder", tmp_path / "from-dir", model=str(dinov3_path), area=64, store_dtype="fp32", **FAST)
    a, b = FeatureCache(tmp_path / "from-tar"), FeatureCache(tmp_path / "from-dir")
    assert_same_pairs(a, b, pairs)
    assert (
        a.failures["shard-000000/000099"].startswith("not an image") or "corrupt" in a.failures["shard-000000/000099"]
    )
    assert not list((tmp_path / "from-tar").rglob("*.png"))  # nothing was unpacked
    report = validate(tmp_path / "from-tar", images=pattern, recompute=2)
    assert report.ok, report.problems


def test_a_new_shard_is_an_incremental_run(tmp_path, dinov3_path):
    make_shards(tmp_path / "shards", tmp_path / "folder", shards=3)
    one = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    extract(one, tmp_path / "c", model=str(dinov3_path), area=64, **FAST)
    s = extract(
        str(tmp_path / "shards" / "shard-{000000..000002}.tar"), tmp_path / "c", model=str(dinov3_path), area=64, **FAST
    )
    assert s.appended == 4 and s.sealed
    assert "shard-000002/000003" in FeatureCache(tmp_path / "c")


def test_probe_reads_only_the_header(tmp_path, monkeypatch):
    big = png_bytes(1500, 1000, 0)
    assert len(big) > 500_000
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        add_member(tf, "x.png", big)
    (m,) = archive.list_images(str(tmp_path / "a.tar"), frozenset({".png"})).values()
    read = []
    real = archive.os.pread

    def counting(fd, n, offset):
        data = real(fd, n, offset)
        read.append(len(data))
        return data

    monkeypatch.setattr(archive.os, "pread", counting)
    p = probe(m)
    assert (p.width, p.height, p.error) == (1500, 1000, None)
    assert 0 < sum(read) <= 16384, read


def test_bad_sources_are_refused_before_any_work(tmp_path):
    make_shards(tmp_path / "shards", tmp_path / "folder", shards=1)
    with pytest.raises(ConfigError, match="1 of 2 tar shards do not exist"):
        discover(str(tmp_path / "shards" / "shard-{000000..000001}.tar"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shard-000000.tar").write_bytes((tmp_path / "shards" / "shard-000000.tar").read_bytes())
    with pytest.raises(ConfigError, match="share file names"):
        discover(str(tmp_path / "{shards,other}" / "shard-000000.tar"))
    (tmp_path / "broken.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ConfigError, match="cannot read the tar shard"):
        discover(str(tmp_path / "broken.tar"))


def test_every_kind_of_bad_member_is_recorded(tmp_path, dinov3_path):
    reasons = bad_files(tmp_path / "bad")
    with tarfile.open(tmp_path / "bad.tar", "w") as tf:
        for f in sorted((tmp_path / "bad").iterdir()):
            add_member(tf, f.name, f.read_bytes())
        add_member(tf, "good.png", png_bytes(64, 48, 1))
    s = extract(str(tmp_path / "bad.tar"), tmp_path / "c", model=str(dinov3_path), area=64, **FAST)
    assert (s.done, s.failed) == (1, len(reasons))
    failures = FeatureCache(tmp_path / "c").failures
    for name, prefix in reasons.items():
        assert failures[f"bad/{sample_key(name)}"].startswith(prefix), (name, failures)


def test_member_is_picklable_and_small():
    import pickle

    m = Member("/data/shard.tar", "000001.jpg", 1536, 1000, 0)
    assert pickle.loads(pickle.dumps(m)) == m and str(m) == "/data/shard.tar:000001.jpg"


def test_png_probe_parses_the_header_only(tmp_path, monkeypatch):
    """PIL's PNG getexif() decodes the whole image looking for a late eXIf chunk: a probe must not decode pixels.
    An eXIf rotation before the pixel data (where encoders put it) is still applied."""
    from PIL import Image, ImageFile

    loads = []
    real = ImageFile.ImageFile.load

    def counting(self):
        loads.append(self.format)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    (tmp_path / "big.png").write_bytes(png_bytes(300, 200, 3))
    p = probe(str(tmp_path / "big.png"))
    assert (p.width, p.height, p.error) == (300, 200, None)
    assert loads == []
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed 200 x 300
    noise_image(300, 200, 4).save(tmp_path / "rot.png", exif=exif)
    p = probe(str(tmp_path / "rot.png"))
    assert (p.width, p.height) == (200, 300) and loads == []


class _Rank1Of2(__import__("dinofeat.extraction.ranks", fromlist=["Group"]).Group):
    """Rank 1 of a connected group of 2 whose rank 0 has already planned: collectives are no-ops here, and each
    broadcast returns what rank 0 would send, in order: the images it found moved (none), then its counts of the
    finished cache (which a rank holding only its part of the plan cannot count)."""

    def barrier(self) -> None:
        pass

    def broadcast(self, obj):
        from dinofeat.extraction import run

        sent = _RANK0_SENDS.pop(0)
        return run._Counts(0, 0, 0, 0, 0, False, {}) if sent == "counts" else sent

    def gather(self, obj):
        return [obj, obj]


_RANK0_SENDS: list = []


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_only_rank_0_lists_the_source(tmp_path, dinov3_path, monkeypatch, kind):
    """Rank 1 of a process group reads every image's location (tar member byte ranges, parquet rows) from the plan
    rank 0 wrote: with discovery made to fail, it still extracts its shards, and the finished cache equals a
    one-process cache bit for bit."""
    from dinofeat.cache.store import Store
    from dinofeat.extraction import ranks
    from dinofeat.extraction import run as precompute
    from dinofeat.extraction.locate import source_from_plan

    if kind == "tar":
        make_shards(tmp_path / "shards", tmp_path / "folder", shards=3)
        pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    else:
        pytest.importorskip("pyarrow", reason="parquet sources need pyarrow (the test extra installs it)")
        make_parquet(tmp_path / "shards", tmp_path / "folder", "hf", files=3)
        pattern = str(tmp_path / "shards" / "part-{00000..00002}.parquet")
    opts = {"model": str(dinov3_path), "area": 64, "store_dtype": "fp32", "shard_mb": 0.001, **FAST}
    extract(pattern, tmp_path / "one", **opts)
    extract(pattern, tmp_path / "split", rank=0, world_size=2, **opts)  # rank 0 plans and does its shards
    st = Store(tmp_path / "split")
    plan = st.index.plan()
    assert plan.archive is not None and len(plan.archives) == 3
    listed = discover(pattern)
    rebuilt = source_from_plan(plan, st.meta["source_root"], st.index.source_names())
    for key in listed.keys:
        a, b = listed.path(key), rebuilt.path(key)
        assert (a.archive, a.offset, a.mtime_ns) == (b.archive, b.offset, b.mtime_ns)
        assert a.size == b.size or (kind == "parquet" and a.size == -1)  # a parquet row's size is known once probed

    def no_listing(*args, **kwargs):
        raise AssertionError("rank 1 listed the source")

    monkeypatch.setattr(precompute, "discover", no_listing)
    monkeypatch.setattr(ranks, "join", lambda *a: _Rank1Of2(rank=1, world_size=2, connected=True))
    _RANK0_SENDS[:] = [{}, "counts"]
    s = extract(pattern, tmp_path / "split", **opts)
    assert s.processed > 0 and Store(tmp_path / "split").metafile.disk_state() == "planned"  # sealing is rank 0's
    assert _RANK0_SENDS == []
    monkeypatch.undo()
    assert extract(pattern, tmp_path / "split", **opts).sealed
    a, b = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "split")
    assert a.keys() == b.keys()
    for i in range(len(a)):
        np.testing.assert_array_equal(a.read(i, "patches"), b.read(i, "patches"))


@pytest.mark.parametrize(
    ("old", "new", "want_archives", "want_new"),
    [
        # each side: archive of every image (None: a file); want_new: the new images' union indices
        (["a", "a"], ["a", "b"], ("a", "b"), [0, 1]),
        (["b"], ["a", None], ("b", "a"), [1, -1]),
        ([None, None], ["c"], ("c",), [0]),
        (["a"], [None], ("a",), [-1]),
    ],
)
def test_extended_plans_keep_every_images_location(old, new, want_archives, want_new):
    from dinofeat.buckets import BucketSpec
    from dinofeat.extraction.plan import extend_plan, make_plan
    from dinofeat.images.probe import Probe

    def plan(archives, prefix, part):
        probes = [
            Probe(Member(a, f"{i}.jpg", 1000 * i + 512, 10, 0) if a else f"/f/{prefix}{i}.jpg", 64, 64, 10, 0)
            for i, a in enumerate(archives)
        ]
        keys = [f"{prefix}{i}" for i in range(len(archives))]
        return make_plan(keys, probes, BucketSpec(64, 16), 16, 8, "fp16", 2**20, part=part)

    a, b = plan(old, "old", 0), plan(new, "new", 1)
    ext = extend_plan(a, b)
    assert ext.archives == want_archives
    old_want = [want_archives.index(x) if x else -1 for x in old]
    assert ext.archive.tolist() == old_want + want_new
    offsets = [1000 * i + 512 if x else -1 for side in (old, new) for i, x in enumerate(side)]
    assert ext.offset.tolist() == offsets
