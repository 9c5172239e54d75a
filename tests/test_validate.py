"""validate / info / show on a real cache, with each kind of corruption injected."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

from dinofeat.cache.store import Store
from dinofeat.cli import app
from dinofeat.extraction.run import extract
from dinofeat.inspection.validate import (
    duplicates,
    nonfinite_rows,
    norm_outliers,
    patch_cosines,
    saturated_rows,
    zero_rows,
)
from dinofeat.inspection.validate import validate as run_validate
from tests.helpers import FAST, edit_metadata, make_tiny, write_images

runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("val")
    imgs = root / "imgs"
    write_images(imgs, [(64, 48)] * 6 + [(48, 64)] * 5 + [(64, 64)] * 4)
    cache = root / "cache"
    extract(imgs, cache, model=str(tiny_models["dinov3"]), area=64, shard_mb=0.004, **FAST)
    return imgs, cache


@pytest.fixture
def copy(tmp_path, base):
    imgs, cache = base
    shutil.copytree(imgs, tmp_path / "imgs")
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "imgs", tmp_path / "cache"


def checks(report) -> set[str]:
    return {p.check for p in report.problems}


def first_row(cache):
    st = Store(cache)
    ix = st.index.read()
    b = st.index.bucket_plans()[int(ix["bucket"][0])]
    return str(ix["key"][0]), b.name, int(ix["row"][0])


def test_clean_cache_passes_everything(copy):
    imgs, cache = copy
    r = run_validate(cache, images=imgs, recompute=3, progress=False)
    assert r.ok, r.problems
    assert r.checked["recomputed"] == 3 and 0.999 <= r.checked["recompute_min_cosine"] <= 1
    res = runner.invoke(app, ["validate", str(cache), "--images", str(imgs), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["ok"] is True


def test_deleted_shard_file(copy):
    _, cache = copy
    next((cache / "buckets").glob("*/patches/c/1/0/0/0")).unlink()
    r = run_validate(cache, progress=False)
    assert "shard" in checks(r) and any("missing" in p.reason for p in r.problems)


def test_truncated_shard_file(copy):
    _, cache = copy
    f = next((cache / "buckets").glob("*/patches/c/0/0/0/0"))
    f.write_bytes(f.read_bytes()[:-100])
    r = run_validate(cache, progress=False)
    assert "shard" in checks(r)


def rewrite_row(cache, bucket: str, name: str, row: int, change) -> None:
    """What a run that wrote a bad value would have left: the shard rewritten whole and its done marker (with the
    chunks' crc32c) written again, so only the value checks can tell."""
    st = Store(cache, mode="r+")
    a = zarr.open_array(str(cache / "buckets" / bucket / name), mode="r+")
    shard_rows = next(b for b in st.index.bucket_plans() if b.name == bucket).shard_rows
    u = row // shard_rows
    start = u * shard_rows
    block = a[start : start + shard_rows]
    change(block[row - start])
    a[start : start + shard_rows] = block
    m = st.markers.read()[(bucket, u)]
    failed = {int(r): why for r, why in m["failed"].items()}
    st.markers.write(bucket, u, m["start"], m["stop"], failed, st.shards.checksums(bucket, u))


def test_nan_row(copy):
    _, cache = copy
    key, bucket, row = first_row(cache)
    rewrite_row(cache, bucket, "patches", row, lambda x: x.__setitem__((0, 0, 0), np.nan))
    r = run_validate(cache, progress=False)
    assert any(p.check == "nan" and p.where == key for p in r.problems)
    assert "checksum" not in checks(r)


def test_zeroed_row(copy):
    _, cache = copy
    key, bucket, row = first_row(cache)
    rewrite_row(cache, bucket, "cls", row, lambda x: x.fill(0))
    r = run_validate(cache, progress=False)
    assert any(p.check == "zero" and p.where == key for p in r.problems)


def test_metadata_with_wrong_grid(copy):
    _, cache = copy
    meta_path = cache / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["dinofeat"]["buckets"][0]["grid"] = [3, 5]
    meta_path.write_text(json.dumps(meta))
    r = run_validate(cache, progress=False)
    assert any(p.check == "metadata" and p.where == "buckets" for p in r.problems)  # fails its checksum
    assert any(p.check == "metadata" and p.where == "buckets[0]" and "grid" in p.reason for p in r.problems)


def test_image_missing_from_cache_and_extra_in_folder(copy):
    imgs, cache = copy
    Image.new("RGB", (32, 32)).save(imgs / "new_image.png")
    (imgs / "im_000.png").unlink()
    r = run_validate(cache, images=imgs, progress=False)
    assert any(p.check == "missing" and p.where == "new_image.png" for p in r.problems)
    assert any(p.check == "extra" and p.where == "im_000.png" for p in r.problems)


def test_stale_file(copy):
    imgs, cache = copy
    Image.new("RGB", (64, 48), (1, 2, 3)).save(imgs / "im_001.png")
    r = run_validate(cache, images=imgs, progress=False)
    assert any(p.check == "stale" and p.where == "im_001.png" for p in r.problems)


def test_model_swapped_for_recompute(copy, tmp_path):
    imgs, cache = copy
    other = make_tiny("dinov3", tmp_path / "swapped")
    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(other / "model.safetensors")
    save_file({k: v + 0.5 * torch.randn_like(v) for k, v in w.items()}, other / "model.safetensors")
    edit_metadata(cache, lambda m: m["model"].update(id=str(other)), restamp=True)  # as if made with `other`
    r = run_validate(cache, images=imgs, recompute=2, progress=False)
    assert "recompute" in checks(r)
    assert any("min cosine" in p.reason for p in r.problems)


def test_unfinished_run_is_reported(copy):
    _, cache = copy
    st = Store(cache, mode="r+")
    st.metafile.update(state="planned")
    next((cache / "_dinofeat" / "done").rglob("*.json")).unlink()
    r = run_validate(cache, progress=False)
    assert "complete" in checks(r)
    res = runner.invoke(app, ["validate", str(cache)])
    assert res.exit_code == 1 and "FAIL" in res.output


def test_orphan_partial_file(copy):
    _, cache = copy
    (next((cache / "buckets").glob("*/patches/c/0/0/0")) / "0.abc.partial").write_bytes(b"x")
    assert "orphan" in checks(run_validate(cache, progress=False))


def test_not_a_cache(tmp_path):
    """A folder with none of a cache's files is a mistyped argument; a cache that lost its zarr.json is damaged."""
    from dinofeat.errors import ConfigError

    with pytest.raises(ConfigError, match="not a dinofeat cache"):
        run_validate(tmp_path, progress=False)
    (tmp_path / "_dinofeat" / "done").mkdir(parents=True)
    r = run_validate(tmp_path, progress=False)
    assert checks(r) == {"format"}


@pytest.mark.parametrize(
    ("fn", "rows", "want"),
    [
        (nonfinite_rows, [[0, 1], [np.nan, 0], [0, np.inf]], [1, 2]),
        (zero_rows, [[0, 0], [0, 1e-8], [0, 0]], [0, 2]),
        (saturated_rows, [[65504, 0], [1, 2], [-65504, 1]], [0, 2]),
    ],
)
def test_row_checks_table(fn, rows, want):
    assert fn(np.array(rows, np.float32)).tolist() == want


def test_pure_helpers():
    assert duplicates(["a", "b", "a", "c", "b"]) == ["a", "b"]
    norms = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 50.0])
    assert norm_outliers(norms).tolist() == [8]
    a = np.random.default_rng(0).normal(size=(2, 3, 8))
    assert np.allclose(patch_cosines(a, a), 1) and np.allclose(patch_cosines(a, -a), -1)


def test_info_and_show_cli(copy, tmp_path):
    _, cache = copy
    res = runner.invoke(app, ["info", str(cache), "--json"])
    assert res.exit_code == 0
    d = json.loads(res.output)
    assert d["done"] == 15 and sum(b["done"] for b in d["buckets"]) == 15
    assert len(d["channel_stats"]["mean"]) == 32 and d["model"]["patch_size"] == 16
    res = runner.invoke(app, ["show", str(cache), "im_000.png", "im_007.png", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    from dinofeat.read.reader import FeatureCache

    w, h = FeatureCache(cache)["im_000.png"].bucket
    assert Image.open(tmp_path / "s" / "im_000.png").size == (2 * w + 8, h)
    res = runner.invoke(app, ["show", str(cache), "im_000.png", "im_007.png", "--grid", "--out", str(tmp_path / "g")])
    assert res.exit_code == 0 and (tmp_path / "g" / "grid.png").exists()


def test_cli_buckets_and_precompute_errors(tmp_path, dinov3_path):
    res = runner.invoke(app, ["buckets", "--area", "512", "--multiple", "14", "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.output)["buckets"]
    assert all(r["width"] % 14 == 0 and r["height"] % 14 == 0 for r in rows)
    res = runner.invoke(app, ["buckets", "--multiple", "0"])
    assert res.exit_code == 1 and "error" in res.output
    imgs = tmp_path / "i"
    write_images(imgs, [(64, 64)] * 2)
    res = runner.invoke(
        app, ["precompute", str(imgs), str(tmp_path / "c"), "--model", str(dinov3_path), "--multiple", "14"]
    )
    assert res.exit_code == 1 and "patch size" in res.output
    res = runner.invoke(
        app,
        [
            "precompute",
            str(imgs),
            str(tmp_path / "c"),
            "--model",
            str(dinov3_path),
            "--area",
            "64",
            "--workers",
            "0",
            "--dtype",
            "fp32",
        ],
    )
    assert res.exit_code == 0 and "2 done" in res.output and "sealed" in res.output
