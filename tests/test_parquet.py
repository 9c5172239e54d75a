"""Parquet sources (img2dataset and Hugging Face datasets layouts, and parquet lists of paths): columns found from the
schema, stable keys, rows read by row group without unpacking, bad rows recorded, features bit-identical to the same
images in a folder."""

from __future__ import annotations

import os

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="parquet sources need pyarrow (the test extra installs it)")
pq = pytest.importorskip("pyarrow.parquet")

from dinofeat.errors import ConfigError, ImageError, SourceChangedError  # noqa: E402
from dinofeat.extraction.run import extract  # noqa: E402
from dinofeat.images.probe import probe  # noqa: E402
from dinofeat.inspection.validate import validate  # noqa: E402
from dinofeat.read.reader import FeatureCache  # noqa: E402
from dinofeat.sources import parquet  # noqa: E402
from dinofeat.sources.archive import Member, read_member  # noqa: E402
from dinofeat.sources.discover import discover  # noqa: E402
from dinofeat.sources.parquet import ImageColumn, image_column, row_keys, split_column  # noqa: E402
from tests.helpers import FAST, PARQUET_LAYOUTS, assert_same_pairs, make_parquet, png_bytes  # noqa: E402

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.mark.parametrize(
    ("fields", "wanted", "want"),
    [
        # img2dataset: key, the format-named bytes column, caption, sizes
        (
            [("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string()), ("width", pa.int64())],
            None,
            ImageColumn("jpg", "bytes"),
        ),
        ([("key", pa.string()), ("webp", pa.large_binary())], None, ImageColumn("webp", "bytes")),
        # Hugging Face datasets: Image feature as a struct
        ([("image", IMAGE), ("label", pa.int64())], None, ImageColumn("image", "struct")),
        ([("label", pa.int64()), ("picture", IMAGE)], None, ImageColumn("picture", "struct")),
        # a known name wins over another binary column; the only binary column is taken whatever its name
        ([("thumb_blob", pa.binary()), ("png", pa.binary())], None, ImageColumn("png", "bytes")),
        ([("blob", pa.binary()), ("caption", pa.string())], None, ImageColumn("blob", "bytes")),
        # path columns only when no bytes exist
        ([("file_name", pa.string()), ("caption", pa.string())], None, ImageColumn("file_name", "path")),
        ([("path", pa.string()), ("jpg", pa.binary())], None, ImageColumn("jpg", "bytes")),
        # ?column= picks
        ([("a", pa.binary()), ("b", pa.binary())], "b", ImageColumn("b", "bytes")),
        ([("path", pa.string()), ("jpg", pa.binary())], "path", ImageColumn("path", "path")),
    ],
)
def test_image_column(fields, wanted, want):
    assert image_column(fields, wanted) == want


@pytest.mark.parametrize(
    ("fields", "wanted", "match"),
    [
        ([("a", pa.binary()), ("b", pa.binary())], None, "several image columns"),
        ([("caption", pa.int64()), ("score", pa.float32())], None, "no column of image bytes"),
        ([("jpg", pa.binary())], "nope", "'nope' is not an image"),
        ([("jpg", pa.binary()), ("n", pa.int64())], "n", "'n' is not an image"),
    ],
)
def test_image_column_refuses(fields, wanted, match):
    with pytest.raises(ConfigError, match=match):
        image_column(fields, wanted)


@pytest.mark.parametrize(
    ("values", "n", "want"),
    [
        (["b", "a"], 2, ["b", "a"]),  # img2dataset's keys, kept in row order
        (None, 3, ["000000", "000001", "000002"]),  # no key column
        (["a", "a"], 2, ["000000", "000001"]),  # duplicates: row numbers
        (["a", None], 2, ["000000", "000001"]),  # a null key
        (["a/b", "c"], 2, ["000000", "000001"]),  # a slash would nest the key
        (["a", ""], 2, ["000000", "000001"]),
    ],
)
def test_row_keys(values, n, want):
    assert row_keys(values, n) == want


@pytest.mark.parametrize(
    ("location", "want"),
    [
        ("d/x.parquet", ("d/x.parquet", None)),
        ("d/{0..3}.parquet?column=jpg", ("d/{0..3}.parquet", "jpg")),
        ("s3://b/p/*.parquet?column=image", ("s3://b/p/*.parquet", "image")),
    ],
)
def test_split_column(location, want):
    assert split_column(location) == want


@pytest.mark.parametrize("layout", PARQUET_LAYOUTS)
def test_parquet_gives_the_same_features_as_a_folder(tmp_path, dinov3_path, layout):
    folder = tmp_path / "pq" / "images" if layout == "paths" else tmp_path / "folder"
    pairs = make_parquet(tmp_path / "pq", folder, layout)
    pattern = str(tmp_path / "pq" / "part-{00000..00001}.parquet")
    bad = 0 if layout == "paths" else 2
    src = discover(pattern)
    assert set(pairs) <= set(src.keys) and len(src.keys) == len(pairs) + bad
    kw = {"model": str(dinov3_path), "area": 64, "store_dtype": "fp32", **FAST}
    s = extract(pattern, tmp_path / "from-pq", **kw)
    assert (s.done, s.failed) == (len(pairs), bad)
    extract(folder, tmp_path / "from-dir", **kw)
    a, b = FeatureCache(tmp_path / "from-pq"), FeatureCache(tmp_path / "from-dir")
    assert_same_pairs(a, b, pairs)
    reasons = sorted(a.failures.values())
    assert len(reasons) == bad
    if bad:
        assert "null" in reasons[0] and "not an image" in reasons[1]
    assert not list((tmp_path / "from-pq").rglob("*.png"))  # nothing was unpacked
    report = validate(tmp_path / "from-pq", images=pattern, recompute=2)
    assert report.ok, report.problems


def test_parquet_decoded_by_forked_workers(tmp_path, dinov3_path):
    """The parent probes through pyarrow, then DataLoader forks decode workers: each starts with a fresh reader."""
    make_parquet(tmp_path / "pq", tmp_path / "folder", "img2dataset", files=3)
    pattern = str(tmp_path / "pq" / "*.parquet")
    kw = {"model": str(dinov3_path), "area": 64, "store_dtype": "fp32", **FAST}
    one = extract(pattern, tmp_path / "inline", **kw)
    two = extract(pattern, tmp_path / "workers", **{**kw, "num_workers": 2, "batch_size": 2})
    assert (two.done, two.failed) == (one.done, one.failed) == (12, 2)
    a, b = FeatureCache(tmp_path / "inline"), FeatureCache(tmp_path / "workers")
    assert a.keys() == b.keys()
    for k in a.keys():  # noqa: SIM118 (iterating a FeatureCache yields features)
        np.testing.assert_array_equal(a[k].patches, b[k].patches)


def test_rows_of_one_row_group_cost_one_read(tmp_path):
    """The reader keeps row groups: the rows a batch takes from one group read it once, and nothing else is read."""
    data = [png_bytes(16, 16, i) for i in range(10)]
    pq.write_table(pa.table({"png": pa.array(data, pa.binary())}), tmp_path / "a.parquet", row_group_size=4)
    src = discover(str(tmp_path / "a.parquet"))
    parquet._reset_after_fork()
    for k in src.keys[:4]:
        assert read_member(src.path(k)) == data[int(k.split("/")[1])]
    assert parquet.reader_stats()[0] == 1
    assert read_member(src.path(src.keys[9])) == data[9]
    reads, nbytes = parquet.reader_stats()
    assert reads == 2 and nbytes < sum(map(len, data))  # groups 0 and 2, never group 1


def test_probing_reads_each_row_group_once(tmp_path):
    """The probe threads walk the rows in order; a row group another thread is reading is waited for, not read
    again."""
    from concurrent.futures import ThreadPoolExecutor

    from dinofeat.images.probe import Probes, probe_many

    make_parquet(tmp_path / "pq", tmp_path / "folder", "img2dataset", files=3, group_rows=4)
    src = discover(str(tmp_path / "pq" / "*.parquet"))
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in (tmp_path / "pq").glob("*.parquet"))
    members = [src.path(k) for k in src.keys]
    parquet._reset_after_fork()
    probes = probe_many(members, threads=8)
    assert sum(p.error is None for p in probes) == 12
    assert parquet.reader_stats()[0] == groups
    for _ in range(5):  # one row per thread: the threads ask for the same row groups at once
        parquet._reset_after_fork()
        with ThreadPoolExecutor(8) as pool:
            assert Probes.of(list(pool.map(probe, members)))[:] == probes[:]  # the same, row by row
        assert parquet.reader_stats()[0] == groups


@pytest.mark.parametrize("struct", [False, True])
def test_one_file_is_never_read_by_two_threads_at_once(tmp_path, monkeypatch, struct):
    """pyarrow's ParquetFile is not safe for concurrent reads: under load two threads reading row groups of one file
    sometimes got "ReadRangeCache did not find matching cache entry", and a good image was recorded as failed (seen
    in CI). Each read here waits a moment for a second one to start; reads of one file must still take turns, while
    reads of two files may overlap."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    layout = "hf" if struct else "img2dataset"
    make_parquet(tmp_path / "pq", tmp_path / "folder", layout, files=2, group_rows=1)
    src = discover(str(tmp_path / "pq" / "*.parquet"))
    inside: dict[str, int] = {}
    most = {"one file": 0, "all": 0}
    cond = threading.Condition()
    real = pq.ParquetFile.read_row_group

    def read_row_group(self, *args, **kwargs):  # the real read, with a window for another thread to enter
        name = str(id(self))  # the reader opens each file once
        with cond:
            inside[name] = inside.get(name, 0) + 1
            most["one file"] = max(most["one file"], inside[name])
            most["all"] = max(most["all"], sum(inside.values()))
            cond.notify_all()
            cond.wait_for(lambda: sum(inside.values()) > 1, timeout=0.1)
        try:
            return real(self, *args, **kwargs)
        finally:
            with cond:
                inside[name] -= 1

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    parquet._reset_after_fork()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda k: _read_or_none(src.path(k)), src.keys))
    rows = [p.read_bytes() for p in (tmp_path / "folder").glob("*.png")] + [b"\x00not an image" * 10]
    assert sorted(g for g in got if g is not None) == sorted(rows)  # every row read right, the null one refused
    assert most == {"one file": 1, "all": 2}


def _read_or_none(member: Member) -> bytes | None:
    try:
        return read_member(member)
    except ImageError:
        return None


def test_probe_records_the_row_size(tmp_path):
    data = png_bytes(20, 12, 0)
    pq.write_table(pa.table({"jpg": pa.array([data], pa.binary())}), tmp_path / "a.parquet")
    (key,) = discover(str(tmp_path / "a.parquet")).keys
    m = discover(str(tmp_path / "a.parquet")).path(key)
    assert isinstance(m, Member) and m.size == -1  # unknown until read
    p = probe(m)
    assert (p.width, p.height, p.file_size, p.error) == (20, 12, len(data), None)
    with pytest.raises(OSError, match="changed"):  # a planned size that no longer matches
        read_member(Member(m.archive, m.name, 0, len(data) + 1, m.mtime_ns))
    with pytest.raises(OSError, match="past the end"):
        read_member(Member(m.archive, m.name, 5, -1, m.mtime_ns))


def test_bad_parquet_sources_are_refused_before_any_work(tmp_path, dinov3_path):
    make_parquet(tmp_path / "pq", tmp_path / "folder", "img2dataset")
    with pytest.raises(ConfigError, match="1 of 3 parquet files do not exist"):
        discover(str(tmp_path / "pq" / "part-{00000..00002}.parquet"))
    with pytest.raises(ConfigError, match="no parquet files match"):
        discover(str(tmp_path / "pq" / "nothing-*.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet" * 100)
    with pytest.raises(ConfigError, match="cannot read the parquet file"):
        discover(str(tmp_path / "broken.parquet"))
    two = pa.table({"a": pa.array([b"x"], pa.binary()), "b": pa.array([b"y"], pa.binary())})
    pq.write_table(two, tmp_path / "two.parquet")
    with pytest.raises(ConfigError, match="several image columns"):
        extract(str(tmp_path / "two.parquet"), tmp_path / "c", model=str(dinov3_path), area=64, **FAST)
    assert not (tmp_path / "c").exists()
    assert len(discover(str(tmp_path / "two.parquet") + "?column=b").keys) == 1
    pq.write_table(pa.table({"path": ["../../elsewhere.png"]}), tmp_path / "pq" / "list.parquet")
    with pytest.raises(ConfigError, match="outside the root"):
        discover(str(tmp_path / "pq" / "list.parquet"))


def test_a_null_image_struct_is_a_recorded_failure(tmp_path):
    """A Hugging Face Image row that is null as a whole (not just its bytes) is recorded with a reason."""
    values = pa.array([{"bytes": png_bytes(16, 16, 0), "path": "a"}, None], IMAGE)
    pq.write_table(pa.table({"image": values}), tmp_path / "hf.parquet")
    src = discover(str(tmp_path / "hf.parquet"))
    assert probe(src.path(src.keys[0])).error is None
    assert "null" in probe(src.path(src.keys[1])).error
    with pytest.raises(ImageError, match="null"):
        read_member(src.path(src.keys[1]))


def test_a_file_rewritten_while_this_process_holds_it_is_read_again(tmp_path):
    """Open files and row groups are kept per process: a file rewritten since (rows reordered between two runs in
    one process) is read again, never served from what was held; a file that differs from its listing is refused."""
    import pyarrow.parquet as pq

    make_parquet(tmp_path / "p", tmp_path / "folder", "img2dataset", files=1)
    path = str(tmp_path / "p" / "part-00000.parquet")
    before = discover(path)
    key = before.keys[0]
    first = read_member(before.path(key))
    table = pq.read_table(path)
    pq.write_table(table.take(list(range(table.num_rows - 1, -1, -1))), path)
    os.utime(path, ns=(1, 1_000_000_000_000))  # a modification time of its own, whatever the clock's resolution
    after = discover(path)
    assert after.path(key).offset != before.path(key).offset
    assert read_member(after.path(key)) == first  # the same image at its new row, not the old file's row
    with pytest.raises(SourceChangedError, match="changed since it was listed"):
        read_member(before.path(key))
