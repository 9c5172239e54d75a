"""Which images failed (issue 30.1): `info --failures` lists each failed image with its reason (and `--json` puts the
list under one key), `validate --failures` names each as a warning: failed images are data, not damage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dinofeat.cache.layout import STATUS_DONE, STATUS_FAILED, STATUS_PENDING, STATUS_PRUNED
from dinofeat.cli import app
from dinofeat.extraction.run import extract
from dinofeat.inspection.info import NO_REASON, failed_images, failed_list, info
from dinofeat.inspection.validate import validate
from tests.helpers import FAST, write_images

D, F, P, X = STATUS_DONE, STATUS_FAILED, STATUS_PENDING, STATUS_PRUNED


@pytest.mark.parametrize(
    ("keys", "status", "reasons", "listed"),
    [
        (["b", "a", "c"], [F, F, D], {"a": "decode: x", "b": "probe: y"}, [("a", "decode: x"), ("b", "probe: y")]),
        (["a", "b"], [D, X], {"b": "decode: gone since"}, []),  # a reason left for a pruned image is not listed
        (["a"], [F], {}, [("a", NO_REASON)]),
        (["a", "b"], [P, D], {}, []),
        ([], [], {}, []),
    ],
)
def test_failed_list(keys, status, reasons, listed):
    assert failed_list(keys, np.array(status, np.int8), reasons) == listed


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Five good images, a truncated JPEG (its header reads, its pixels do not) and a .png that is no image."""
    d = tmp_path_factory.mktemp("failures") / "imgs"
    write_images(d, [(64, 48)] * 3 + [(48, 64)] * 2)
    write_images(d / "sub", [(64, 48)], fmt="jpg")
    good = (d / "sub" / "im_000.jpg").read_bytes()
    (d / "sub" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (d / "sub" / "im_000.jpg").unlink()
    (d / "notes.png").write_bytes(b"not an image at all")
    return d


@pytest.fixture(scope="module")
def sealed(source, tmp_path_factory, dinov3_path) -> Path:
    cache = tmp_path_factory.mktemp("sealed") / "cache"
    s = extract(source, cache, model=str(dinov3_path), area=64, **FAST)
    assert s.sealed and s.done == 5 and s.failed == 2
    return cache


def test_info_lists_each_failed_image_with_its_reason(sealed):
    failed = failed_images(sealed)
    assert [k for k, _ in failed] == ["notes.png", "sub/cut.jpg"]
    assert all(reason and reason != NO_REASON for _, reason in failed), failed
    assert info(sealed, failures=True)["failures"] == [{"key": k, "reason": r} for k, r in failed]
    assert "failures" not in info(sealed)  # only when asked: a cache of millions may hold many

    out = CliRunner().invoke(app, ["info", str(sealed), "--failures"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines() == [f"{k}\t{r}" for k, r in failed]
    doc = json.loads(CliRunner().invoke(app, ["info", str(sealed), "--failures", "--json"]).output)
    assert doc["failures"] == [{"key": k, "reason": r} for k, r in failed] and doc["failed"] == 2
    assert "--failures lists each failed image" in CliRunner().invoke(app, ["info", str(sealed)]).output


def test_validate_names_failed_images_as_warnings_when_asked(sealed):
    plain = validate(sealed, progress=False)
    assert plain.ok and not [w for w in plain.warnings if w.check == "failed"]
    asked = validate(sealed, progress=False, failures=True)
    assert asked.ok  # failed images are data, not damage
    named = [(w.where, w.reason) for w in asked.warnings if w.check == "failed"]
    assert named == failed_images(sealed)
    out = CliRunner().invoke(app, ["validate", str(sealed), "--failures"])
    assert out.exit_code == 0, out.output
    assert "warn failed     sub/cut.jpg: " in out.output and "warn failed     notes.png: " in out.output


def test_an_unfinished_cache_lists_the_failures_its_markers_record(source, tmp_path, dinov3_path):
    """Not sealed yet: the failure records are written at seal, so the done markers and the probe say."""
    cache = tmp_path / "cache"
    s = extract(source, cache, model=str(dinov3_path), area=64, rank=0, world_size=2, shard_mb=0.001, **FAST)
    assert not s.sealed
    failed = failed_images(cache)
    assert ("notes.png" in [k for k, _ in failed]) and failed == sorted(failed)
    assert len(failed) == info(cache)["failed"] >= 1
    asked = validate(cache, progress=False, failures=True)
    assert [(w.where, w.reason) for w in asked.warnings if w.check == "failed"] == failed


def test_counts_by_reason_agree_with_the_list_after_a_prune(source, tmp_path, dinov3_path):
    """A failed image gone from the source and pruned keeps its recorded reason; info counts only what --failures
    lists (before: 2 reasons counted, 1 image listed)."""
    import shutil

    imgs = tmp_path / "imgs"
    shutil.copytree(source, imgs)
    cache = tmp_path / "c"
    extract(imgs, cache, model=str(dinov3_path), area=64, **FAST)
    (imgs / "notes.png").unlink()
    assert extract(imgs, cache, model=str(dinov3_path), area=64, prune=True, **FAST).pruned_now == 1
    d = info(cache, failures=True)
    assert [f["key"] for f in d["failures"]] == ["sub/cut.jpg"] and d["failed"] == 1 and d["pruned"] == 1
    assert sum(d["failures_by_reason"].values()) == 1, d["failures_by_reason"]


def test_a_key_with_a_tab_or_line_break_stays_one_line(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 2)
    (imgs / "tab\there.png").write_bytes(b"no image")
    (imgs / "two\nlines.png").write_bytes(b"no image either")
    cache = tmp_path / "c"
    extract(imgs, cache, model=str(dinov3_path), area=64, **FAST)
    out = CliRunner().invoke(app, ["info", str(cache), "--failures"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["tab\\there.png", "two\\nlines.png"], lines
    assert all(ln.count("\t") == 1 for ln in lines), lines
    out = CliRunner().invoke(app, ["validate", str(cache), "--failures"])
    warned = [ln for ln in out.output.splitlines() if ln.startswith("warn")]
    assert len(warned) == 2 and "two\\nlines.png: " in warned[1], out.output  # one line each, like info's


@pytest.mark.parametrize("how", ["decode", "probe"])
def test_a_failed_image_replaced_by_a_good_one_is_extracted_by_a_plain_rerun(tmp_path, dinov3_path, how):
    """A corrupt image is recorded as failed and skipped; once the user replaces the file, the same command extracts
    it (planned again into its bucket: its failed row stays vacant), and then resumes with nothing to do. A failed
    image left as it was is not retried. The result serves what a fresh build of the fixed folder serves."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 3 + [(48, 64)] * 2)
    good = (imgs / "im_004.png").read_bytes()
    bad = good[: len(good) // 2] if how == "decode" else b"not an image"  # a truncated PNG fails at decode
    (imgs / "im_004.png").write_bytes(bad)
    (imgs / "other.png").write_bytes(b"also no image")  # stays broken
    cache, kw = tmp_path / "c", {"model": str(dinov3_path), "area": 64, **FAST}
    s = extract(imgs, cache, **kw)
    assert s.sealed and s.failed == 2, s
    assert extract(imgs, cache, **kw).processed == 0  # nothing changed: nothing retried
    (imgs / "im_004.png").write_bytes(good)
    s = extract(imgs, cache, **kw)
    assert s.sealed and s.processed == 1, s
    assert [k for k, _ in failed_images(cache)] == ["other.png"]
    assert extract(imgs, cache, **kw).processed == 0
    assert validate(cache, imgs, progress=False).ok
    fresh = tmp_path / "fresh"
    extract(imgs, fresh, **kw)
    from dinofeat.read.reader import FeatureCache

    a, b = FeatureCache(cache), FeatureCache(fresh)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in b.keys():  # noqa: SIM118 (a FeatureCache is no dict)
        np.testing.assert_allclose(a[k].patches, b[k].patches, rtol=1e-3, atol=1e-3, err_msg=k)
