"""Messages people can read (issue 30.8): a validate --images of another folder says so, a refused rerun names the
one setting that changed without Python's None or dicts, recompute reports a cosine, and the Python API ends a
missing credential in dinofeat's own StoreError, as the command line does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dinofeat
from dinofeat.cache.arrays import ArraySet
from dinofeat.cache.lifecycle import fingerprint_diff, with_features
from dinofeat.cli import app
from dinofeat.errors import CacheMismatchError
from dinofeat.inspection.validate import validate
from tests.helpers import FAST, write_images

SIZES = [(64, 48)] * 3 + [(48, 64)] * 2
DEFAULT = ArraySet((12,), False, False, True)


@pytest.fixture(scope="module")
def made(tmp_path_factory, dinov3_path) -> tuple[Path, Path]:
    """A sealed cache of five images, and the folder it was made from."""
    root = tmp_path_factory.mktemp("messages")
    write_images(root / "imgs", SIZES)
    s = dinofeat.extract(root / "imgs", root / "cache", model=str(dinov3_path), area=64, **FAST)
    assert s.sealed and s.done == 5
    return root / "cache", root / "imgs"


# ---- a refused rerun ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("old", "new", "lines"),
    [
        # a cache of the default feature set (no `features` recorded) and a run with --flip
        ({"limit": None}, {"limit": None, "features": {"layers": [12], "layer_norm": True, "flip": True}},
         ["features.flip: cache has False, this run wants True"]),
        # the other way round, and more blocks
        ({"features": {"layers": [4, 12], "layer_norm": True, "flip": False}}, {},
         ["features.layers: cache has [4, 12], this run wants [12]"]),
        ({"limit": None}, {"limit": 3}, ["limit: cache has none, this run wants 3"]),
        ({"area": 64}, {"area": 64}, []),
    ],
)  # fmt: skip
def test_a_refusal_names_each_changed_leaf(old, new, lines):
    diff = fingerprint_diff(with_features(old, DEFAULT), with_features(new, DEFAULT))
    assert diff == lines
    assert not any("None" in line or "{" in line for line in diff)


def test_a_rerun_with_flip_names_the_flip_setting(made, dinov3_path):
    cache, imgs = made
    with pytest.raises(CacheMismatchError) as e:
        dinofeat.extract(imgs, cache, model=str(dinov3_path), area=64, flip=True, **FAST)
    text = str(e.value)
    assert "features.flip: cache has False, this run wants True" in text
    assert "None" not in text and "{" not in text, text


# ---- validate --images on another folder -------------------------------------------------------------------------
def test_validate_images_of_another_folder_says_it_is_not_the_source(made, tmp_path):
    cache, imgs = made
    other = tmp_path / "holiday"
    (other / "sub").mkdir(parents=True)
    write_images(other / "sub", [(32, 32)] * 4)
    r = validate(cache, other, progress=False)
    assert [(p.check, p.where) for p in r.problems] == [("source", str(other))], r.problems
    assert "lacks 5 of the cache's 5 images: not the source this cache was made from" in r.problems[0].reason
    assert str(imgs) in r.problems[0].reason
    assert not any("--prune" in line for line in r.advice()), r.advice()
    out = CliRunner().invoke(app, ["validate", str(cache), "--images", str(other)]).output
    assert "not the source this cache was made from" in out and "--prune" not in out, out


@pytest.mark.parametrize(
    ("folder", "recorded", "planned", "lacking", "says"),
    [
        ("/data/b", "/data/a", 10, 10, "lacks 10 of the cache's 10 images: not the source"),
        ("/data/b", "/data/a", 10, 9, "lacks 9 of the cache's 10 images: not the source"),  # one name in common
        ("/data/b", "/data/a", 10, 5, ""),  # half present: a moved source, compared image by image
        ("/data/b", "/data/a", 10, 0, ""),
        ("/data/a", "/data/a", 10, 10, "holds none of the cache's 10 images any more"),  # emptied or renamed
        ("/data/a/", "/data/a", 10, 10, "holds none of the cache's 10 images any more"),
        ("/data/a", "/data/a", 10, 9, ""),  # its own source, mostly gone: --prune is the right advice
        ("s3://b/shards/{0..9}.tar", "s3://b/shards/{0..9}.tar", 10, 10, "holds none"),
        ("/data/b", "", 10, 10, "not the source this cache was made from;"),
        ("/data/b", "/data/a", 0, 0, ""),
    ],
)
def test_when_a_folder_is_not_the_caches_source(folder, recorded, planned, lacking, says):
    from dinofeat.inspection.validate import _not_the_source

    got = _not_the_source(folder, recorded, planned, lacking)
    assert (says in got) if says else got == "", got
    if "not the source" in got:
        assert "--prune" not in got


def test_validate_images_of_an_emptied_or_renamed_source_says_so(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, SIZES)
    cache = tmp_path / "c"
    dinofeat.extract(imgs, cache, model=str(dinov3_path), area=64, **FAST)
    for f in imgs.iterdir():
        f.rename(f.with_name("renamed_" + f.name))  # the same folder, every file under another name
    r = validate(cache, imgs, progress=False)
    assert [p.check for p in r.problems] == ["source"], r.problems
    assert "holds none of the cache's 5 images any more" in r.problems[0].reason
    empty = tmp_path / "empty"
    empty.mkdir()
    r = validate(cache, empty, progress=False)  # another, empty folder: not "--prune every image"
    assert [p.check for p in r.problems] == ["source"] and "not the source" in r.problems[0].reason, r.problems
    assert not any("--prune" in line for line in r.advice())


def test_validate_images_of_its_own_source_is_clean(made):
    cache, imgs = made
    assert validate(cache, imgs, progress=False).ok


# ---- recompute reads as a cosine -----------------------------------------------------------------------------------
def test_recompute_reports_a_cosine(made):
    cache, _ = made
    r = validate(cache, recompute=2, progress=False)
    assert r.ok, r.problems
    assert 0.99 <= r.checked["recompute_min_cosine"] <= 1 and "recompute_min_cosine_x1e4" not in r.checked
    out = CliRunner().invoke(app, ["validate", str(cache), "--recompute", "2"]).output
    assert "min cosine 0.99" in out or "min cosine 1.0" in out, out
    assert "x1e4" not in out


# ---- the Python API and a missing credential ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    from tests.s3server import S3Server, serve

    yield from serve(S3Server())


@pytest.fixture
def no_credentials(s3, monkeypatch, tmp_path):
    """The S3 server's endpoint, and no credential anywhere botocore looks; no client made with one is reused."""
    import s3fs

    from dinofeat import filesystems

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    nowhere = str(tmp_path / "no-aws-files")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(filesystems, "_FILESYSTEMS", {})
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


HINT = "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or an instance role)"
CALLS = {
    "extract": lambda imgs, url, model: dinofeat.extract(imgs, url, model=model, area=64, **FAST),
    "extract_processes": lambda imgs, url, model: dinofeat.extract_processes(
        imgs, url, dinofeat.ExtractConfig(model=model, area=64, **FAST), 1
    ),
    "FeatureCache": lambda imgs, url, model: dinofeat.FeatureCache(url),
    "FeatureDataset": lambda imgs, url, model: dinofeat.FeatureDataset(url),
    "validate": lambda imgs, url, model: dinofeat.validate(url, progress=False),
    "info": lambda imgs, url, model: __import__("dinofeat.inspection.info", fromlist=["info"]).info(url),
}


@pytest.mark.parametrize("call", CALLS)
def test_the_python_api_raises_dinofeats_store_error_without_credentials(made, no_credentials, dinov3_path, call):
    _, imgs = made
    url = "s3://dinofeat-nocreds/feats"
    with pytest.raises(dinofeat.StoreError) as e:
        CALLS[call](imgs, url, str(dinov3_path))
    assert str(e.value) == f"no credentials for {url} {HINT}"
    assert isinstance(e.value, dinofeat.DinofeatError)


def test_a_source_on_s3_without_credentials_is_named(no_credentials, dinov3_path, tmp_path):
    """A local cache from shards on S3: the line names the store that failed, the source's."""
    url = "s3://dinofeat-nocreds/shards/{000000..000001}.tar"
    with pytest.raises(dinofeat.StoreError) as e:
        dinofeat.extract(url, tmp_path / "cache", model=str(dinov3_path), area=64, **FAST)
    assert str(e.value) == f"no credentials for {url} {HINT}"
    assert not os.path.exists(tmp_path / "cache" / "zarr.json")
