"""Day one (issue 23): a rerun is the short command, an interrupted run says how to go on, and the version is
everywhere a user looks."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dinofeat import __version__
from dinofeat.cache.store import Store
from dinofeat.cli import app
from dinofeat.extraction.config import ExtractConfig, recorded_options
from dinofeat.extraction.run import extract
from dinofeat.images.recipe import Recipe
from tests.helpers import FAST, kill_test_args, run_cli, write_images

runner = CliRunner()
FIRST = ["--area", "64", "--dtype", "fp32", "--workers", "0", "--device", "cpu", "--shard-mb", "0.01"]


@pytest.fixture
def imgs(tmp_path) -> Path:
    write_images(tmp_path / "imgs", [(64, 48)] * 4 + [(48, 64)] * 3)
    return tmp_path / "imgs"


def test_a_rerun_without_options_takes_them_from_the_cache_and_says_so(tmp_path, imgs, dinov3_path):
    cache = str(tmp_path / "c")
    first = runner.invoke(app, ["precompute", str(imgs), cache, "--model", str(dinov3_path), *FIRST, "--flip"])
    assert first.exit_code == 0, first.output
    (imgs / "new.png").write_bytes((imgs / "im_000.png").read_bytes())
    r = runner.invoke(app, ["precompute", str(imgs), cache, "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    taken = next(ln for ln in r.stdout.splitlines() if ln.startswith("settings from the cache"))
    for words in ("--area 64", f"--model {dinov3_path}", "--flip", "--dtype fp32"):
        assert words in taken, taken
    assert "incremental: 1 image new to the source added" in r.output
    refused = runner.invoke(app, ["precompute", str(imgs), cache, "--area", "128"])
    assert refused.exit_code == 1 and "bucket_spec.area: cache has 64, this run wants 128" in refused.output


def test_a_model_folder_named_relatively_is_the_same_model_from_anywhere(tmp_path, imgs, dinov3_path, monkeypatch):
    """A local model is recorded by its absolute path: a rerun from another folder without --model finds it, and
    `./m`, `m` and the absolute path are one model, not a settings mismatch."""
    monkeypatch.chdir(dinov3_path.parent)
    cache = str(tmp_path / "c")
    first = runner.invoke(app, ["precompute", str(imgs), cache, "--model", dinov3_path.name, *FIRST])
    assert first.exit_code == 0, first.output
    assert Store(cache).meta["fingerprint"]["model_id"] == str(dinov3_path.resolve())
    for model in (["--model", f"./{dinov3_path.name}"], ["--model", str(dinov3_path)]):
        again = runner.invoke(app, ["precompute", str(imgs), cache, *model, *FIRST])
        assert again.exit_code == 0, again.output
    monkeypatch.chdir(tmp_path)
    anywhere = runner.invoke(app, ["precompute", str(imgs), cache, "--workers", "0", "--device", "cpu"])
    assert anywhere.exit_code == 0 and "sealed" in anywhere.output, anywhere.output


def test_the_python_api_inherits_too_unless_given_a_config(tmp_path, imgs, dinov3_path):
    cache = tmp_path / "c"
    extract(imgs, cache, model=str(dinov3_path), area=64, layers="1,-1", **FAST)
    again = extract(imgs, cache, **FAST)  # no model, area or layers: the cache's
    assert again.sealed and again.processed == 0 and again.inherited["area"] == 64
    with pytest.raises(Exception, match="different settings"):
        extract(imgs, cache, ExtractConfig(model=str(dinov3_path), **FAST))  # an explicit config is taken as is


@pytest.mark.parametrize(
    ("fingerprint", "want"),
    [
        ({}, {}),
        (
            {"model_id": "m", "model_revision": None, "compute_dtype": "fp16", "store_dtype": "bf16", "limit": 5},
            {"model": "m", "revision": None, "dtype": "fp16", "store_dtype": "bf16", "limit": 5, "layers": (-1,),
             "layer_norm": True, "flip": False},
        ),
        (
            {"bucket_spec": {"version": 1, "area": 512, "multiple": 32, "min_ar": 0.5, "max_ar": 2.0,
                             "num_buckets": 9, "mode": "fit"}},
            {"area": 512, "multiple": 32, "min_ar": 0.5, "max_ar": 2.0, "num_buckets": 9, "bucket_mode": "fit",
             "bucket_version": 1, "dit_scale": None},
        ),
        (
            {"bucket_spec": {"version": 2, "tied": {"scale": "1/2", "dit_token": 16},
                             "dit": {"version": 2, "area": 1024, "multiple": 32, "min_ar": 0.25, "max_ar": 4.0,
                                     "num_buckets": 33, "mode": "list"}}},
            {"area": 1024, "multiple": 32, "min_ar": 0.25, "max_ar": 4.0, "num_buckets": 33, "bucket_mode": "list",
             "bucket_version": 2, "dit_scale": "1/2", "dit_token": 16},
        ),
        (
            {"model_id": "m", "recipe": Recipe(jpeg_draft=2).to_dict(),
             "features": {"layers": [4, 12], "layer_norm": False, "flip": True}},
            {"model": "m", "revision": None, "recipe": Recipe(jpeg_draft=2), "layers": (4, 12), "layer_norm": False,
             "flip": True},
        ),
    ],
)  # fmt: skip
def test_recorded_options_read_the_fingerprint_back(fingerprint, want):
    assert recorded_options({"fingerprint": fingerprint}) == want


@pytest.mark.slow
def test_ctrl_c_says_how_far_the_run_got_and_how_to_go_on(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 200 + [(48, 64)] * 200)  # a run of ~1 s: a 0.05 s poll catches it half way
    cache = tmp_path / "c"
    proc = run_cli(["precompute", str(imgs), str(cache), *kill_test_args(dinov3_path)])
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline and proc.poll() is None and not list((cache / "_dinofeat" / "done").rglob("*.json"))
    ):
        time.sleep(0.05)  # polling the other process's progress
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, out
    line = next(ln for ln in out.splitlines() if ln.startswith("interrupted: "))
    done = int(line.split()[1])
    assert "of 400 images done; rerun the same command to resume" in line and 0 < done < 400
    info = json.loads(runner.invoke(app, ["info", str(cache), "--json"]).stdout)
    assert info["state"] == "planned" and info["done"] + info["failed"] == done and info["pending"] == 400 - done
    v = runner.invoke(app, ["validate", str(cache)])
    assert v.exit_code == 1 and v.stdout.splitlines()[0].startswith("FAIL complete   cache: unfinished: ")
    assert len([ln for ln in v.stdout.splitlines() if ln.startswith("FAIL ")]) == 1  # one summary, not a line per image


def test_the_version_is_everywhere_a_user_looks(tmp_path, imgs, dinov3_path):
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"dinofeat {__version__}"
    cache = str(tmp_path / "c")
    s = runner.invoke(app, ["precompute", str(imgs), cache, "--model", str(dinov3_path), *FIRST, "--json"])
    assert json.loads(s.stdout)["version"] == __version__
    info = runner.invoke(app, ["info", cache])
    assert f"made by dinofeat {__version__}" in info.output
    assert json.loads(runner.invoke(app, ["info", cache, "--json"]).stdout)["dinofeat"] == __version__
    assert Store(cache).meta["dinofeat_version"] == __version__
    assert json.loads(runner.invoke(app, ["validate", cache, "--json"]).stdout)["dinofeat"] == __version__
