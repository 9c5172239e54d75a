"""Trust at the seams (issue 22): the faults real datasets and clusters produce end in a correct cache or a one-line
refusal. Each test fails on the code before the fix it names."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dinofeat.cache.lock import CacheLock, lock_path
from dinofeat.cli import app
from dinofeat.errors import CacheFormatError, CacheLockedError, ConfigError, SourceChangedError
from dinofeat.extraction.run import extract
from dinofeat.inspection.validate import validate
from dinofeat.read.reader import FeatureCache
from dinofeat.sources.archive import Member, header_mismatch
from tests.helpers import (
    FAST,
    assert_same_pairs,
    edit_metadata,
    make_parquet,
    make_shards,
    make_tiny,
    write_images,
)

runner = CliRunner()


def kw(model: Path, **more) -> dict:
    return {**FAST, "model": str(model), "area": 64, "shard_mb": 0.004, **more}


def truncated_jpeg(path: Path, w: int, h: int) -> None:
    """A JPEG whose header is intact (the probe reads its size) but whose data stops half way (decoding fails)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


# ---- 1. a shard whose every row failed, and rows that are legitimately all zeros --------------------------------
def test_a_bucket_of_only_corrupt_images_seals_validates_and_serves_the_rest(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 4)
    truncated_jpeg(imgs / "panorama.jpg", 256, 64)  # aspect 4: alone in its bucket, and it cannot be decoded
    cache = tmp_path / "c"
    s = extract(imgs, cache, **kw(dinov3_path))
    assert s.sealed and s.done == 4 and s.failed == 1, s
    assert validate(cache, images=imgs, progress=False).ok
    fc = FeatureCache(cache)
    assert len(fc) == 4 and "panorama.jpg" in fc.failures and "panorama.jpg" not in fc
    assert extract(imgs, cache, **kw(dinov3_path)).processed == 0  # a rerun resumes: nothing to do


def test_features_that_are_all_zeros_are_stored_checksummed_and_served(tmp_path):
    """A model whose every weight is zero outputs zeros: zarr's writer would store no chunk and no shard at all."""
    from safetensors.torch import load_file, save_file

    model = make_tiny("dinov3", tmp_path / "zero")
    save_file({k: v * 0 for k, v in load_file(model / "model.safetensors").items()}, model / "model.safetensors")
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 3 + [(64, 48)] * 2)
    cache = tmp_path / "c"
    assert extract(imgs, cache, **kw(model)).sealed
    fc = FeatureCache(cache)
    for i in range(len(fc)):
        assert not fc[i].patches.any() and not fc[i].cls.any()
    shard = next((cache / "buckets").glob("*/patches/c/0/0/0/0"))
    index = np.frombuffer(shard.read_bytes()[-4 - 16 * 3 : -4], "<u8")
    assert (index != 2**64 - 1).any()  # rows stored, not left as empty entries
    r = validate(cache, progress=False)
    assert r.ok, r.problems
    assert {p.check for p in r.warnings} == {"zero"}  # worth a look, but written and checksummed as such


# ---- 3. one lock per cache, whatever the spelling ------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["link", "sub/../real", "real/", "./real"])
def test_every_spelling_of_a_cache_meets_the_same_lock(tmp_path, dinov3_path, monkeypatch, spelling):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 3)
    real = tmp_path / "real"
    assert extract(imgs, real, **kw(dinov3_path)).sealed
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert lock_path(Path(spelling)) == lock_path(real)
    in_flight = real / "buckets" / "64x64" / "patches" / "c" / "0" / "0" / "0" / "0.123.partial"
    in_flight.write_bytes(b"a shard the first run is writing")
    with CacheLock(real), pytest.raises(CacheLockedError):
        extract(imgs, spelling, overwrite=True, **kw(dinov3_path))
    assert in_flight.exists() and (real / "zarr.json").exists()  # refused before deleting anything


def test_a_run_through_a_symlink_writes_into_its_target(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 3)
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target", target_is_directory=True)
    assert extract(imgs, tmp_path / "link", **kw(dinov3_path)).sealed
    assert extract(imgs, tmp_path / "link", overwrite=True, **kw(dinov3_path)).sealed  # --overwrite too
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "zarr.json").is_file()
    assert len(FeatureCache(tmp_path / "target")) == 3


# ---- 4 and 5. metadata checksums; validate names every damage -------------------------------------------------
@pytest.fixture(scope="module")
def sealed(tmp_path_factory, tiny_models) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    imgs = root / "imgs"
    write_images(imgs, [(64, 48)] * 5 + [(48, 64)] * 4)
    cache = root / "cache"
    extract(imgs, cache, **kw(tiny_models["dinov3"]))
    return imgs, cache


@pytest.fixture
def damaged(tmp_path, sealed) -> Path:
    shutil.copytree(sealed[1], tmp_path / "cache")
    return tmp_path / "cache"


def first_bucket(cache: Path) -> str:
    return json.loads((cache / "zarr.json").read_text())["attributes"]["dinofeat"]["buckets"][0]["name"]


def _set(path: str, value):
    def change(m: dict) -> None:
        *head, last = path.split(".")
        for p in head:
            m = m[int(p)] if isinstance(m, list) else m[p]
        if value is _DROP:
            m.pop(last)
        elif isinstance(m, list):
            m[int(last)] = value
        else:
            m[last] = value

    return change


_DROP = object()
META_DAMAGE = {  # what is edited -> the field the refusal must name
    "store dtype fp16 -> bf16": (_set("dtypes.store", "bf16"), "dtypes"),
    "hidden size": (_set("hidden_size", 64), "hidden_size"),
    "a bucket's shard_rows": (_set("buckets.0.shard_rows", 1), "buckets"),
    "buckets reordered": (lambda m: m["buckets"].reverse(), "buckets"),
    "index checksums dropped": (_set("index_checksums", _DROP), "index_checksums"),
    "a channel mean": (lambda m: m["channel_stats"]["patches"]["mean"].__setitem__(0, 9.0), "channel_stats"),
    "the checksums themselves dropped": (_set("meta_checksums", _DROP), "meta_checksums"),
    "array names": (_set("arrays.names", ["cls"]), "arrays"),
    "marker summary": (_set("marker_summary.crc32c", 1), "marker_summary"),
    "state": (_set("state", "planned"), "state"),
    "patch size": (_set("patch_size", 8), "patch_size"),
}


@pytest.mark.parametrize("what", list(META_DAMAGE))
def test_damaged_metadata_is_refused_by_name_and_validate_reports_it(damaged, what):
    change, field = META_DAMAGE[what]
    edit_metadata(damaged, change)
    with pytest.raises(CacheFormatError, match=rf"metadata field\(s\) .*\b{field}\b"):
        FeatureCache(damaged)
    r = validate(damaged, progress=False)
    assert any(p.check == "metadata" and p.where == field for p in r.problems), r.problems
    res = runner.invoke(app, ["validate", str(damaged)])
    assert res.exit_code == 1 and "Traceback" not in res.output and field in res.output


def test_a_rerun_without_options_on_damaged_metadata_names_the_damage(sealed, damaged):
    """The settings a rerun does not give come from the cache's record: a damaged record is refused by name, not
    replaced by the defaults (which would name another model, or load it first)."""
    edit_metadata(damaged, META_DAMAGE["a channel mean"][0])
    res = runner.invoke(app, ["precompute", str(sealed[0]), str(damaged)])
    assert res.exit_code == 1 and "channel_stats" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("record", ["failures.json", "probe_failures.json"])
def test_a_damaged_json_record_is_refused_by_name(damaged, record):
    (damaged / "_dinofeat" / record).write_text("{")
    for args in (["info", str(damaged)], ["validate", str(damaged)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and record in res.output and "Traceback" not in res.output, (args, res.output)


def _edit_array(cache: Path, name: str, change) -> Path:
    path = cache / "buckets" / first_bucket(cache) / name / "zarr.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


ARRAY_DAMAGE = {
    "patches shape": ("patches", lambda d: d["shape"].__setitem__(1, d["shape"][1] // 2)),
    "cls data type": ("cls", lambda d: d.update(data_type="float32")),
    "patches shard shape": ("patches", lambda d: d["chunk_grid"]["configuration"]["chunk_shape"].__setitem__(0, 1)),
    "cls codecs": ("cls", lambda d: d["codecs"][0]["configuration"]["codecs"].pop()),
    "cls fill value": ("cls", lambda d: d.update(fill_value=1.0)),
}


@pytest.mark.parametrize("what", list(ARRAY_DAMAGE))
def test_an_edited_array_zarr_json_is_refused_and_named(damaged, what):
    name, change = ARRAY_DAMAGE[what]
    _edit_array(damaged, name, change)
    fc = FeatureCache(damaged)
    i = next(i for i in range(len(fc)) if fc.size(i) == tuple(int(x) for x in first_bucket(damaged).split("x")))
    with pytest.raises(CacheFormatError, match=r"zarr\.json fails its checksum"):
        fc.read(i, name)
    r = validate(damaged, progress=False)
    where = f"{first_bucket(damaged)}/{name}"
    assert any(p.where.startswith(where) and "checksum" in p.reason for p in r.problems), r.problems


LEGACY_DAMAGE = {  # caches written before 0.6 have no field checksums: validate still names the damage
    "shard_rows": (_set("buckets.0.shard_rows", 2), "chunks"),
    "buckets reordered": (lambda m: m["buckets"].reverse(), "index"),
    "an array's zarr.json deleted": (None, "arrays"),
    "rows": (_set("buckets.0.rows", 3), "index"),
}


@pytest.mark.parametrize("what", list(LEGACY_DAMAGE))
def test_validate_names_damage_to_a_cache_without_metadata_checksums(damaged, what):
    change, check = LEGACY_DAMAGE[what]

    def legacy(m: dict) -> None:
        m.pop("meta_checksums")
        m.pop("array_checksums")
        m["dinofeat_version"] = "0.5.0"
        if change is not None:
            change(m)

    edit_metadata(damaged, legacy)
    if change is None:
        (damaged / "buckets" / first_bucket(damaged) / "patches" / "zarr.json").unlink()
    res = runner.invoke(app, ["validate", str(damaged)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    r = validate(damaged, progress=False)
    assert check in {p.check for p in r.problems}, r.problems


def test_a_format_3_cache_without_index_checksums_is_damaged_not_unverified(damaged):
    def drop(m: dict) -> None:
        m.pop("index_checksums")
        m.pop("meta_checksums")
        m["dinofeat_version"] = "0.5.0"  # even without metadata checksums: format 3 always had them

    edit_metadata(damaged, drop)
    with pytest.raises(CacheFormatError, match="index_checksums"):
        FeatureCache(damaged)


def test_a_writer_refuses_to_restamp_damaged_metadata(damaged, sealed, tiny_models):
    edit_metadata(damaged, _set("dtypes.store", "bf16"))
    with pytest.raises(CacheFormatError, match="dtypes"):
        extract(sealed[0], damaged, **kw(tiny_models["dinov3"]))
    assert "bf16" in (damaged / "zarr.json").read_text()  # nothing rewritten under new checksums


def test_damaged_shard_statistics_are_caught(damaged):
    stats = next((damaged / "_dinofeat" / "stats").rglob("*.npz"))
    data = bytearray(stats.read_bytes())
    data[-40] ^= 0xFF
    stats.write_bytes(bytes(data))
    r = validate(damaged, progress=False)
    assert "stats" in {p.check for p in r.problems}


def test_os_independent_symlinked_parent(tmp_path, dinov3_path):
    """A cache whose parent folder is reached through a symlink keeps one lock file (beside the real folder)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "data", target_is_directory=True)
    assert lock_path(tmp_path / "alias" / "c") == lock_path(tmp_path / "data" / "c")
    assert lock_path(tmp_path / "alias" / "c").parent == Path(os.path.realpath(tmp_path / "data"))


# ---- 2. sources that change between runs ------------------------------------------------------------------------
def rewrite_reversed(shard: Path) -> None:
    """The same members (names, sizes, times) in reverse order: the file keeps its name and size, every offset
    changes: what regenerating a webdataset shard with another writer order does."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    size = shard.stat().st_size
    with tarfile.open(shard, "w") as tf:
        for m, data in reversed(members):
            tf.addfile(m, io.BytesIO(data))
    assert shard.stat().st_size == size


def unfinish(cache: Path, keep: int) -> set[tuple[str, int]]:
    """An interrupted run: every done marker but the first `keep` is gone (with its shard files). Returns the
    shards kept."""
    from dinofeat.cache.store import Store

    st = Store(cache, mode="r+")
    st.metafile.update(state="planned")
    kept = set()
    for k, (b, u) in enumerate(sorted(st.markers.read())):
        if k >= keep:
            st.files.delete(st.markers.path(b, u))
            for f in st.shards.files(b, u):
                st.files.delete(f)
        else:
            kept.add((b, u))
    return kept


def rewrite_parquet_reversed(path: Path) -> None:
    """The same rows (keys, bytes) in reverse order: every key's row number changes."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(table.take(list(range(table.num_rows - 1, -1, -1))), path, row_group_size=3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_sources_rewritten_between_runs_never_give_another_images_features(tmp_path, dinov3_path, kind):
    """Resumed with two processes after the tar shards (or parquet files) were rewritten in another order: rank 1
    reads locations from the plan, which rank 0 corrects from its fresh listing; every image ends with its own
    features."""
    from dinofeat.extraction.config import ExtractConfig
    from dinofeat.extraction.launch import extract_processes

    if kind == "tar":
        pairs = make_shards(tmp_path / "shards", tmp_path / "folder", shards=3)
        pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    else:
        pytest.importorskip("pyarrow", reason="parquet sources need pyarrow (the test extra installs it)")
        pairs = make_parquet(tmp_path / "shards", tmp_path / "folder", "img2dataset", files=3)
        pattern = str(tmp_path / "shards" / "part-{00000..00002}.parquet")
    opts = {"model": str(dinov3_path), "area": 64, "store_dtype": "fp32", "shard_mb": 0.001, **FAST}
    extract(tmp_path / "folder", tmp_path / "reference", **opts)
    cache = tmp_path / "c"
    extract(pattern, cache, **opts)
    kept = keys_of_shards(cache, unfinish(cache, keep=2))
    for f in (tmp_path / "shards").glob("*.tar" if kind == "tar" else "*.parquet"):
        rewrite_reversed(f) if kind == "tar" else rewrite_parquet_reversed(f)
    s = extract_processes(pattern, cache, ExtractConfig(**opts), 2)
    assert s.sealed and s.processed > 0
    assert_same_pairs(FeatureCache(cache), FeatureCache(tmp_path / "reference"), pairs)
    # the index records where each image was read from: images re-extracted after the rewrite are not stale,
    # images of the shards finished before it are (their features came from bytes that have moved)
    stale = {p.where for p in validate(cache, images=pattern, progress=False).problems if p.check == "stale"}
    assert stale and stale <= kept
    s = extract(pattern, cache, **opts, repair=True)
    assert s.sealed and 0 < s.processed <= len(stale) + 4 and validate(cache, images=pattern, progress=False).ok
    assert_same_pairs(FeatureCache(cache), FeatureCache(tmp_path / "reference"), pairs)


def keys_of_shards(cache: Path, shards: set[tuple[str, int]]) -> set[str]:
    """The keys whose rows lie in `shards` ((bucket, shard) pairs)."""
    from dinofeat.cache.store import Store

    plan = Store(cache).index.plan()
    by_bucket = plan.rows_to_keys()
    out = set()
    for b in plan.buckets:
        for u in range(b.num_shards):
            if (b.name, u) in shards:
                s0, s1 = b.shard_range(u)
                out |= {plan.keys[i] for i in by_bucket[b.name][s0:s1]}
    return out


def test_a_tar_source_moved_as_a_whole_is_not_stale(tmp_path, dinov3_path):
    """Shards moved to another folder (a rerun accepts the source as moved): every member is where it was within its
    shard, so validate --images passes; a rewritten shard in the moved source is still found."""
    make_shards(tmp_path / "a", tmp_path / "folder", shards=2)
    cache = tmp_path / "c"
    extract(str(tmp_path / "a" / "shard-{000000..000001}.tar"), cache, **kw(dinov3_path))
    shutil.move(tmp_path / "a", tmp_path / "b")
    pattern = str(tmp_path / "b" / "shard-{000000..000001}.tar")
    assert extract(pattern, cache, **kw(dinov3_path)).processed == 0
    assert validate(cache, images=pattern, progress=False).ok
    rewrite_reversed(tmp_path / "b" / "shard-000001.tar")
    moved = {p.where for p in validate(cache, images=pattern, progress=False).problems if p.check == "stale"}
    assert moved and all(k.startswith("shard-000001/") for k in moved)


@pytest.mark.parametrize("finished", [False, True])
def test_a_file_changed_before_its_shard_is_extracted_is_not_stale(tmp_path, dinov3_path, finished):
    """A folder image rewritten between an interrupted run and its rerun: if its shard was still to do, the rerun
    reads the new bytes and the index says so (validate --images passes); if its shard was finished, its features
    are of the old bytes and validate says stale."""
    images = tmp_path / "images"
    write_images(images, [(64, 48)] * 6)
    opts = kw(dinov3_path, shard_mb=0.001)
    cache = tmp_path / "c"
    extract(images, cache, **opts)
    kept = keys_of_shards(cache, unfinish(cache, keep=1))
    key = sorted(kept)[0] if finished else sorted(set(FeatureCache(cache).keys()) - kept)[0]
    path = images / key
    write_images(tmp_path / "other", [(64, 48)], start_seed=99)
    path.write_bytes(next((tmp_path / "other").iterdir()).read_bytes())
    assert extract(images, cache, **opts).sealed
    stale = {p.where for p in validate(cache, images=images, progress=False).problems if p.check == "stale"}
    assert stale == ({key} if finished else set())
    s = extract(images, cache, **opts, repair=True)  # re-extracts the shard of a changed image, nothing else
    assert s.processed == (1 if finished else 0) and validate(cache, images=images, progress=False).ok
    fresh = tmp_path / "fresh"
    extract(images, fresh, **opts)
    a, b = FeatureCache(cache), FeatureCache(fresh)
    np.testing.assert_array_equal(a.read(a.index_of(key), "patches"), b.read(b.index_of(key), "patches"))


def test_a_read_at_a_stale_offset_stops_the_run_instead_of_reading_another_image(tmp_path, dinov3_path):
    from dinofeat.cache.store import Store
    from dinofeat.extraction import locate
    from dinofeat.extraction import run as precompute

    pairs = make_shards(tmp_path / "shards", tmp_path / "folder", shards=2)
    pattern = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    cache = tmp_path / "c"
    extract(pattern, cache, **kw(dinov3_path, shard_mb=0.001))
    unfinish(cache, keep=1)
    for shard in (tmp_path / "shards").glob("*.tar"):
        rewrite_reversed(shard)
    real_discover = precompute.discover

    def stale_listing(*args, **kwargs):  # as if the shards were rewritten after rank 0 listed them
        src = real_discover(*args, **kwargs)
        return locate.source_from_plan(Store(cache).index.plan(), src.root, {})

    precompute.discover = stale_listing
    try:
        with pytest.raises(SourceChangedError, match="changed since it was planned"):
            extract(pattern, cache, **kw(dinov3_path, shard_mb=0.001))
    finally:
        precompute.discover = real_discover
    assert extract(pattern, cache, **kw(dinov3_path, shard_mb=0.001)).sealed  # the rerun re-lists and finishes
    extract(tmp_path / "folder", tmp_path / "reference", **kw(dinov3_path, shard_mb=0.001))
    assert_same_pairs(FeatureCache(cache), FeatureCache(tmp_path / "reference"), pairs)


def test_validate_finds_tar_members_that_moved_though_sizes_and_times_did_not(tmp_path, dinov3_path):
    make_shards(tmp_path / "shards", tmp_path / "folder", shards=2)
    pattern = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    cache = tmp_path / "c"
    extract(pattern, cache, **kw(dinov3_path))
    rewrite_reversed(tmp_path / "shards" / "shard-000001.tar")
    r = validate(cache, images=pattern, progress=False)
    moved = {p.where for p in r.problems if p.check == "stale" and "moved" in p.reason}
    assert moved and all(k.startswith("shard-000001/") for k in moved)


def _header(name: str, size: int, mtime: int = 1_700_000_000, fmt: int = tarfile.PAX_FORMAT) -> tuple[bytes, int]:
    """The header block just before a member's data, as tarfile writes it, and that data's offset."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = size, mtime
        tf.addfile(info, io.BytesIO(b"x" * size))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        offset = tf.getmembers()[0].offset_data
    return raw[offset - 512 : offset], offset


LONG = "d" * 60 + "/" + "n" * 70 + ".png"
HEADER_CASES = [  # (member written, its format, member the plan expects, expected: None = accepted)
    ("000001.png", tarfile.USTAR_FORMAT, "000001.png", None),
    ("000001.png", tarfile.USTAR_FORMAT, "000001", None),  # the plan names a member by its sample key
    ("000002.png", tarfile.USTAR_FORMAT, "000001", "is now '000002.png'"),
    (LONG, tarfile.PAX_FORMAT, LONG, None),  # pax: the header keeps a truncated name
    (LONG, tarfile.GNU_FORMAT, LONG[:-4], None),
    ("x/" + LONG, tarfile.PAX_FORMAT, LONG, "is now"),
]


@pytest.mark.parametrize(("written", "fmt", "expected", "why"), HEADER_CASES)
def test_header_check_accepts_the_planned_member_only(written, fmt, expected, why):
    header, offset = _header(written, 10, fmt=fmt)
    got = header_mismatch(header, Member("a.tar", expected, offset, 10, 1_700_000_000 * 10**9))
    assert (got is None) if why is None else (why in got)


@pytest.mark.parametrize(
    ("size", "mtime", "garbage", "why"),
    [(11, 1_700_000_000, False, "bytes, planned as"), (10, 1_700_000_001, False, "modification time"),
     (10, 1_700_000_000, True, "no longer a tar header")],
)  # fmt: skip
def test_header_check_catches_size_time_and_garbage(size, mtime, garbage, why):
    header, offset = _header("000001.png", 10)
    header = bytes(512) if garbage else header
    got = header_mismatch(header, Member("a.tar", "000001", offset, size, mtime * 10**9))
    assert got is not None and why in got


def test_moved_members_lists_only_what_moved():
    from dinofeat.extraction.locate import moved_members
    from dinofeat.sources.discover import Source

    plan = _plan_of({"s/a": ("s.tar", 512, 5), "s/b": ("s.tar", 1536, 7), "t/c": ("t.tar", 512, 9)})
    now = {
        "s/a": Member("s.tar", "a.png", 512, 5, 0),  # same place
        "s/b": Member("s.tar", "b.png", 2048, 7, 0),  # moved
        "t/c": Member("t.tar", "c.png", 512, 8, 0),  # other size
        "u/d": Member("u.tar", "d.png", 512, 1, 0),  # new: not planned, not a move
    }
    moved = moved_members(plan, Source("x", tuple(now), {}, now))
    assert set(moved) == {"s/b", "t/c"} and moved["s/b"].offset == 2048
    rows = {"p/a": Member("p.parquet", "a", 512, -1, 0)}  # a listed parquet row: its size is unknown until read
    assert moved_members(_plan_of({"p/a": ("p.parquet", 512, 5)}), Source("x", tuple(rows), {}, rows)) == {}


def _plan_of(where: dict[str, tuple[str, int, int]]):
    from dinofeat.cache.layout import Plan

    keys = list(where)
    archives = tuple(dict.fromkeys(a for a, _, _ in where.values()))
    n = len(keys)
    return Plan(
        keys=keys,
        bucket=np.zeros(n, np.int32),
        row=np.arange(n),
        src_w=np.ones(n, np.int32),
        src_h=np.ones(n, np.int32),
        distortion=np.zeros(n, np.float32),
        file_size=np.array([s for _, _, s in where.values()], np.int64),
        mtime_ns=np.zeros(n, np.int64),
        probe_errors={},
        buckets=(),
        archive=np.array([archives.index(a) for a, _, _ in where.values()], np.int32),
        offset=np.array([o for _, o, _ in where.values()], np.int64),
        archives=archives,
    )


# ---- 8. repair and prune ------------------------------------------------------------------------------------------
@pytest.fixture
def many_shards(tmp_path, dinov3_path) -> tuple[Path, Path]:
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 8 + [(48, 64)] * 6)
    cache = tmp_path / "c"
    assert extract(imgs, cache, **kw(dinov3_path, shard_mb=0.001)).sealed  # 2 images a shard
    return imgs, cache


def shard_file(cache: Path, bucket: str, u: int, name: str = "patches") -> Path:
    return next((cache / "buckets" / bucket / name / "c" / str(u)).rglob("*"), None) or Path("/nonexistent")


def all_shard_files(cache: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(cache)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in (cache / "buckets").rglob("*")
        if p.is_file() and "/c/" in str(p)
    }


def test_repair_re_extracts_only_the_damaged_shards(many_shards, dinov3_path, tmp_path):
    imgs, cache = many_shards
    fresh = tmp_path / "fresh"
    extract(imgs, fresh, **kw(dinov3_path, shard_mb=0.001))
    reader = FeatureCache(cache)  # open during the repair: it keeps serving, and its rows still check
    flipped = sorted((cache / "buckets" / "80x64" / "patches" / "c" / "1").rglob("*"))[-1]
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0x01
    flipped.write_bytes(bytes(data))
    sorted((cache / "buckets" / "80x64" / "cls" / "c" / "2").rglob("*"))[-1].unlink()  # a lost shard file
    (cache / "_dinofeat" / "done" / "64x80" / "0.json").unlink()  # a lost marker
    (cache / "_dinofeat" / "stats" / "64x80" / "1.npz").write_bytes(b"not statistics")
    from dinofeat.cache.maintenance import find_damage
    from dinofeat.cache.store import Store

    st = Store(cache)
    found = find_damage(st, st.index.plan(), st.markers.read(), sealed=True, progress=False)
    assert [f"{d.bucket}/{d.shard}" for d in found] == ["64x80/0", "64x80/1", "80x64/1", "80x64/2"]
    assert "marker is gone" in found[0].reason and "statistics" in found[1].reason
    assert "damaged" in found[2].reason and "missing" in found[3].reason
    before = all_shard_files(cache)
    plain = extract(imgs, cache, **kw(dinov3_path, shard_mb=0.001))  # redoes the unmarked shard, reports the rest
    assert len(plain.damaged) == 1 and "--repair" in runner.invoke(app, ["validate", str(cache)]).output
    s = extract(imgs, cache, repair=True, **kw(dinov3_path, shard_mb=0.001))
    assert s.sealed and sorted(d.split(":")[0] for d in s.repaired) == [
        "64x80 shard 1", "80x64 shard 1", "80x64 shard 2"
    ]  # fmt: skip
    after = all_shard_files(cache)
    untouched = {f for f in before if not any(f"/{b}/" in f and f"/c/{u}/" in f for b, u in DAMAGED)}
    assert untouched and all(after[f] == before[f] for f in untouched)  # no other shard file was rewritten
    assert validate(cache, images=imgs, progress=False).ok
    a, b = FeatureCache(cache), FeatureCache(fresh)
    assert a.keys() == b.keys() and a.meta["channel_stats"] == b.meta["channel_stats"]
    for i in range(len(a)):
        np.testing.assert_array_equal(a.read(i, "patches"), b.read(i, "patches"))
        np.testing.assert_array_equal(reader.read(i, "cls"), b.read(i, "cls"))
    again = extract(imgs, cache, repair=True, **kw(dinov3_path, shard_mb=0.001))
    assert again.repaired == [] and again.processed == 0


DAMAGED = [("80x64", 1), ("80x64", 2), ("64x80", 0), ("64x80", 1)]


def test_prune_drops_images_gone_from_the_source_and_recomputes_the_statistics(many_shards, dinov3_path, tmp_path):
    imgs, cache = many_shards
    reader = FeatureCache(cache)
    gone = ["im_003.png", "im_010.png"]
    for k in gone:
        (imgs / k).unlink()
    plain = extract(imgs, cache, **kw(dinov3_path, shard_mb=0.001))
    assert plain.removed_files == 2 and not validate(cache, images=imgs, progress=False).ok
    s = extract(imgs, cache, prune=True, **kw(dinov3_path, shard_mb=0.001))
    assert s.sealed and s.pruned_now == 2 and s.pruned == 2 and s.done == 12
    fc = FeatureCache(cache)
    assert len(fc) == 12 and not any(k in fc for k in gone)
    r = validate(cache, images=imgs, progress=False)
    assert r.ok, r.problems
    fresh = tmp_path / "fresh"
    extract(imgs, fresh, **kw(dinov3_path, shard_mb=0.001))  # the same images, never pruned
    for name, st in FeatureCache(fresh).meta["channel_stats"].items():
        got = fc.meta["channel_stats"][name]
        assert got["count"] == st["count"]
        np.testing.assert_allclose(got["mean"], st["mean"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got["std"], st["std"], rtol=1e-9, atol=1e-9)
    assert len(reader) == 14 and reader.read(reader.index_of(gone[0]), "cls").any()  # an open reader keeps its own
    assert extract(imgs, cache, prune=True, **kw(dinov3_path, shard_mb=0.001)).pruned_now == 0
    info = runner.invoke(app, ["info", str(cache), "--json"])
    assert json.loads(info.output)["pruned"] == 2


def test_prune_lets_an_unfinished_run_finish_without_the_images_that_are_gone(many_shards, dinov3_path):
    imgs, cache = many_shards
    unfinish(cache, keep=1)
    (imgs / "im_012.png").unlink()
    with pytest.raises(ConfigError, match="--prune"):
        extract(imgs, cache, **kw(dinov3_path, shard_mb=0.001))
    s = extract(imgs, cache, prune=True, **kw(dinov3_path, shard_mb=0.001))
    assert s.sealed and s.pruned == 1 and "im_012.png" not in FeatureCache(cache)
    assert validate(cache, images=imgs, progress=False).ok


def test_a_create_that_fails_before_its_metadata_leaves_nothing_behind(tmp_path, dinov3_path, monkeypatch):
    """An error while the index is written (a full disk, a key zarr refuses) used to leave a zarr group without
    dinofeat metadata, which every later run refused as "not a dinofeat cache" (found by the hostile pass): the
    failed create now removes what it wrote into the empty place, and the same command then runs."""
    import errno

    from dinofeat.cache import lifecycle
    from dinofeat.errors import DinofeatError

    write_images(tmp_path / "imgs", [(64, 48)] * 3)
    real = lifecycle.write_index

    def full_disk(*args, **kwargs):
        real(*args, **kwargs)  # the columns are written, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lifecycle, "write_index", full_disk)
    with pytest.raises(DinofeatError, match="No space left"):  # the run's one line for a disk error
        extract(tmp_path / "imgs", tmp_path / "cache", model=str(dinov3_path), area=64, **FAST)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    monkeypatch.undo()
    assert extract(tmp_path / "imgs", tmp_path / "cache", model=str(dinov3_path), area=64, **FAST).done == 3
