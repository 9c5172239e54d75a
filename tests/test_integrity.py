"""Integrity end to end (issue 12, format 3): a crc32c per stored chunk (zarr's codec inside the shard) recorded in
the done markers, a crc32c per index column in the metadata, the reader checking each row it reads, `validate`
checking every byte and naming each damaged row, and new readers served the last sealed generation while an
incremental run works. Each damage test fails on format 2, which served the damaged bytes and validated OK."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from dinofeat.cache.shardfile import read_layout
from dinofeat.cache.store import Store
from dinofeat.cli import app
from dinofeat.errors import CacheFormatError, CacheMismatchError, ChecksumError
from dinofeat.extraction.run import extract
from dinofeat.extraction.writer import ShardWriter
from dinofeat.inspection.validate import validate
from dinofeat.read.reader import FeatureCache
from tests.helpers import FAST, write_images

V2_CACHE = Path(__file__).parent / "data" / "cache-v2"  # written by dinofeat 0.2.0 (format 2), 8 images + 1 bad


@pytest.fixture(scope="module")
def sealed(tmp_path_factory, tiny_models) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    imgs = root / "imgs"
    write_images(imgs, [(64, 48)] * 12 + [(48, 64)] * 3)
    cache = root / "cache"
    s = extract(imgs, cache, model=str(tiny_models["dinov3"]), area=64, shard_mb=0.004, keep_registers=True, **FAST)
    assert s.done == 15 and s.sealed
    return cache


@pytest.fixture
def cache(tmp_path, sealed) -> Path:
    """A private copy to damage."""
    c = tmp_path / "cache"
    shutil.copytree(sealed, c)
    return c


def row_location(cache: Path, key: str, name: str) -> tuple[Path, int, int]:
    """(shard file, byte offset of the row's stored chunk, its stored length incl. the crc32c trailer)."""
    fc = FeatureCache(cache)
    i = fc.index_of(key)
    bucket, row = fc._bucket_plans[int(fc._bucket[i])].name, int(fc._row[i])
    fc.close()
    array_dir = cache / "buckets" / bucket / name
    lay = read_layout(array_dir)
    s = lay.shard_shape[0]
    f = array_dir / "c" / str(row // s) / Path(*(["0"] * (len(lay.shape) - 1)))
    raw = f.read_bytes()
    index = np.frombuffer(raw[-lay.index_bytes : -4], "<u8").reshape(-1, 2)
    offset, nbytes = (int(v) for v in index[row % s])
    return f, offset, nbytes


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def features(c: Path) -> dict[str, tuple[np.ndarray, ...]]:
    fc = FeatureCache(c)
    keys = fc.keys()
    out = {k: (fc[k].cls, fc[k].patches, fc[k].registers) for k in keys}
    fc.close()
    return out


def damaged_keys(report) -> set[str]:
    return {p.where for p in report.problems if p.check == "checksum"}


def test_chunks_carry_zarrs_own_crc32c(cache):
    """Any zarr v3 reader checks the chunks too: the crc32c codec sits inside the shard."""
    key = FeatureCache(cache).keys()[0]
    f, offset, _ = row_location(cache, key, "patches")
    bucket = f.relative_to(cache).parts[1]
    arr = zarr.open_array(str(cache / "buckets" / bucket / "patches"), mode="r")
    assert [c.to_dict()["name"] for c in arr.metadata.codecs[0].codecs] == ["bytes", "crc32c"]
    flip_bit(f, offset + 7, 3)
    row = FeatureCache(cache)._row[FeatureCache(cache).index_of(key)]
    with pytest.raises(ValueError, match="checksum"):
        arr[int(row)]


@pytest.mark.parametrize("name", ["cls", "patches", "registers"])
@pytest.mark.parametrize("where", ["first", "middle", "last", "trailer"])
def test_one_flipped_bit_is_caught_by_the_reader_and_validate(cache, name, where):
    before = features(cache)
    key = sorted(before)[5]
    f, offset, nbytes = row_location(cache, key, name)
    at = {"first": 0, "middle": (nbytes - 4) // 2, "last": nbytes - 5, "trailer": nbytes - 2}[where]
    flip_bit(f, offset + at, 6)
    fc = FeatureCache(cache)
    with pytest.raises(ChecksumError, match=rf"'{key}' \({name}\).*fails its crc32c"):
        fc[key]
    for k in before:  # every other row still reads, unchanged
        if k != key:
            np.testing.assert_array_equal(fc[k].patches, before[k][1])
    unchecked = FeatureCache(cache, verify=False)[key]  # what format 2 did: serve the bytes as they are
    served = {"cls": unchecked.cls, "patches": unchecked.patches, "registers": unchecked.registers}[name]
    original = dict(zip(("cls", "patches", "registers"), before[key], strict=True))[name]
    assert np.array_equal(served, original) == (where == "trailer")  # a flipped trailer leaves the values intact
    report = validate(cache, progress=False)
    assert not report.ok and damaged_keys(report) == {key}, report.problems


def test_a_zeroed_page_names_exactly_the_rows_it_hit(cache):
    """A 4 KiB page of a shard file reads back as zeros (a lost write): every row it touches is named."""
    keys = sorted(features(cache))
    where = {k: row_location(cache, k, "patches") for k in keys}
    f, offset, nbytes = where[keys[2]]
    data = bytearray(f.read_bytes())
    data_end = len(data) - read_layout(f.parents[4]).index_bytes  # the page, clipped to the chunks' bytes
    lo = (offset + nbytes // 2) // 4096 * 4096
    hi = min(lo + 4096, data_end)
    data[lo:hi] = bytes(hi - lo)
    f.write_bytes(bytes(data))
    hit = {k for k, (g, off, n) in where.items() if g == f and off < hi and lo < off + n}
    assert keys[2] in hit
    report = validate(cache, progress=False)
    assert damaged_keys(report) == hit, report.problems
    fc = FeatureCache(cache)
    for k in keys:
        if k in hit:
            with pytest.raises(ChecksumError):
                fc[k]
        else:
            fc[k]


def test_two_swapped_shard_files_are_refused(cache):
    """Each chunk is intact, so only the crc recorded in the marker tells that it is not the row written there."""

    def shard(bucket: Path, u: int) -> Path:
        return bucket / "patches" / "c" / str(u) / "0" / "0" / "0"

    lay_dir = next(
        d / "patches"
        for d in (cache / "buckets").iterdir()
        if shard(d, 1).exists() and shard(d, 0).stat().st_size == shard(d, 1).stat().st_size
    )
    a, b = shard(lay_dir.parent, 0), shard(lay_dir.parent, 1)
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    fc = FeatureCache(cache)
    bucket = lay_dir.parent.name
    keys = fc.keys()
    in_swapped = [k for k in keys if row_location(cache, k, "patches")[0] in (a, b)]
    for k in in_swapped:
        with pytest.raises(ChecksumError, match="not the chunk written there"):
            fc[k]
    report = validate(cache, progress=False)
    assert damaged_keys(report) == set(in_swapped) and bucket in str(report.problems)


def index_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "index").rglob("*") if p.is_file() and p.name != "zarr.json")


def test_index_chunk_bit_flips_never_serve_wrong_rows(cache, tmp_path):
    """Every index column, bits flipped at several places: the reader refuses with one clear error and validate
    reports it (format 2 served wrong rows or renamed keys for 14 of 40 flips and crashed validate on 23)."""
    files = index_files(cache)
    assert {p.relative_to(cache / "index").parts[0] for p in files} >= {"key", "bucket", "row", "status", "src_w"}
    trials = 0
    for f in files:
        original = f.read_bytes()
        for pos in sorted({0, len(original) // 3, len(original) // 2, len(original) - 5, len(original) - 1}):
            for bit in (0, 5):
                flip_bit(f, pos, bit)
                trials += 1
                with pytest.raises(CacheFormatError):
                    FeatureCache(cache)
                report = validate(cache, progress=False)
                assert not report.ok and report.problems[0].check == "index", (f, pos, report.problems)
                f.write_bytes(original)
    assert trials >= 60
    result = CliRunner().invoke(app, ["validate", str(cache)])  # restored: fine again
    assert result.exit_code == 0, result.output


def test_validate_cli_reports_a_damaged_index_in_one_line(cache):
    f = cache / "index" / "row" / "c" / "0"
    flip_bit(f, 3, 1)
    result = CliRunner().invoke(app, ["validate", str(cache)])
    assert result.exit_code == 1
    assert "index" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("what", ["chunk", "array"])
def test_a_deleted_status_column_is_not_an_empty_cache(cache, what):
    target = cache / "index" / "status"
    if what == "chunk":
        (target / "c" / "0").unlink()  # zarr would read fill values: every image 'pending'
    else:
        shutil.rmtree(target)
    with pytest.raises(CacheFormatError, match=r"status|missing"):
        FeatureCache(cache)
    assert not validate(cache, progress=False).ok


def test_format_2_caches_still_read_unverified_and_are_not_extended(tmp_path, dinov3_path):
    c = tmp_path / "v2"
    shutil.copytree(V2_CACHE, c)
    assert json.loads((c / "zarr.json").read_text())["attributes"]["dinofeat"]["format_version"] == 2
    fc = FeatureCache(c)
    assert len(fc) == 8 and set(fc.failures) == {"broken.jpg"}
    st = Store(c)
    keys = fc.keys()
    for k in keys:  # the fast reader agrees with zarr-python on every row
        i = fc.index_of(k)
        b = fc._bucket_plans[int(fc._bucket[i])].name
        np.testing.assert_array_equal(fc[k].patches, st.shards.read_rows(b, "patches", fc._row[i], fc._row[i] + 1)[0])
    report = validate(c, progress=False)
    assert report.ok, report.problems
    assert any("no checksums" in w.reason for w in report.warnings)
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 2)
    with pytest.raises(CacheMismatchError, match="format 2 cache"):
        extract(imgs, c, **{**FAST, "model": str(dinov3_path), "area": 64})


def _crash_after_the_switch(monkeypatch, imgs: Path, cache: Path, model: Path) -> None:
    """An incremental run that dies after its metadata switch, before any shard of it is written."""

    def killed(self, result):
        raise RuntimeError("killed")

    monkeypatch.setattr(ShardWriter, "submit", killed)
    with pytest.raises(RuntimeError, match="killed"):
        extract(imgs, cache, **{**FAST, "model": str(model), "area": 64, "shard_mb": 0.004, "keep_registers": True})
    monkeypatch.undo()
    assert Store(cache).meta["state"] == "planned"


def test_new_readers_get_the_last_sealed_generation_during_an_incremental_run(tmp_path, dinov3_path, monkeypatch):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 6 + [(48, 64)] * 2)
    cache = tmp_path / "cache"
    kw = {**FAST, "model": str(dinov3_path), "area": 64, "shard_mb": 0.004, "keep_registers": True}
    extract(imgs, cache, **kw)
    before = features(cache)
    write_images(imgs / "more", [(64, 48)] * 3, start_seed=50)
    _crash_after_the_switch(monkeypatch, imgs, cache, dinov3_path)
    write_images(imgs / "even_more", [(48, 64)] * 2, start_seed=80)  # a second attempt extends again, and dies
    _crash_after_the_switch(monkeypatch, imgs, cache, dinov3_path)
    fc = FeatureCache(cache)  # opened mid-run: the last sealed generation, not a refusal
    assert fc.serving_last_sealed and sorted(fc.keys()) == sorted(before)
    for k, (cls, patches, _) in before.items():
        np.testing.assert_array_equal(fc[k].cls, cls)
        np.testing.assert_array_equal(fc[k].patches, patches)
    s = extract(imgs, cache, **kw)
    assert s.sealed and s.processed == 5
    after = FeatureCache(cache)
    assert not after.serving_last_sealed and len(after) == 13
    assert validate(cache, imgs, progress=False).ok


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_a_ranks_share_of_the_index_is_exactly_its_shards_images(sealed, world):
    """Issue 29.3: a rank of a process group reads only the images of its shards (ordinal % world == rank) from the
    index, every column checked whole as it is read and then cut; together the ranks hold every planned image."""
    st = Store(sealed)
    full = st.index.plan()
    ordinal = {(r.bucket, r.shard): r.ordinal for r in full.shards()}
    seen: list[str] = []
    for rank in range(world):
        part = st.index.plan(share=(rank, world))
        want = [i for i in range(len(full)) if full.bucket[i] >= 0 and ordinal[full.shard_of(i)] % world == rank]
        assert list(part.keys) == [full.keys[i] for i in want]
        for col in ("bucket", "row", "src_w", "src_h", "distortion", "file_size", "mtime_ns"):
            np.testing.assert_array_equal(getattr(part, col), getattr(full, col)[want], err_msg=col)
        assert part.buckets == full.buckets and part.probe_errors == {}
        for b in part.buckets:  # each of its shards' rows names the same image as in the whole plan
            held, whole = part.rows_to_keys()[b.name], full.rows_to_keys()[b.name]
            mine = [r for r in range(b.rows) if ordinal[(b.name, r // b.shard_rows)] % world == rank]
            assert [part.keys[int(held[r])] for r in mine] == [full.keys[int(whole[r])] for r in mine]
        seen += list(part.keys)
    assert sorted(seen) == sorted(full.keys[i] for i in range(len(full)) if full.bucket[i] >= 0)


@pytest.mark.parametrize("column", ["key", "row", "mtime_ns"])
def test_a_damaged_column_is_refused_when_a_rank_reads_its_share(cache, column):
    f = cache / "index" / column / "c" / "0"
    flip_bit(f, len(f.read_bytes()) // 2, 3)
    for share in (None, (1, 2)):
        with pytest.raises(CacheFormatError, match="index"):
            Store(cache).index.plan(share=share)


def test_a_key_column_of_many_chunks_reads_back_and_is_checked(tmp_path, tiny_models, monkeypatch):
    """New caches write the key column in chunks (a reader decodes one at a time): keys in their planned order,
    unsorted ones included (parquet rows), found by the reader, checked against the column's crc32c."""
    from dinofeat.cache import index as index_module

    monkeypatch.setattr(index_module, "KEY_CHUNK", 4)
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 7 + [(48, 64)] * 4)
    cache = tmp_path / "cache"
    s = extract(imgs, cache, model=str(tiny_models["dinov3"]), area=64, shard_mb=0.004, **FAST)
    assert s.done == 11 and s.sealed
    key_array = Store(cache).root[Store(cache).index.group]["key"]
    assert key_array.chunks == (4,) and key_array.shape == (11,)
    fc = FeatureCache(cache)
    assert fc.keys() == sorted(p.name for p in imgs.iterdir()) and all(fc.index_of(k) >= 0 for k in fc.keys())  # noqa: SIM118 (a FeatureCache yields features)
    unsorted = index_module.read_keys(_column(tmp_path / "u", ["d", "b", "日本", "a", "c", "a/b", "e"]))
    assert list(unsorted) == ["d", "b", "日本", "a", "c", "a/b", "e"] and unsorted.find("a/b") == 5
    flip_bit(cache / "index" / "key" / "c" / "1", 5, 2)  # the second chunk
    with pytest.raises(CacheFormatError):
        FeatureCache(cache)


def _column(path: Path, keys: list[str]):
    import zarr

    a = zarr.open_group(path, mode="w").create_array("key", shape=(len(keys),), dtype=str, chunks=(2,))
    a[:] = np.array(keys, dtype=str)
    return a
