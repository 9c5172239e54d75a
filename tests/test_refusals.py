"""Day one (issue 23) and options checked first (issue 22): every bad path or option a new user can type is refused
before any work, in one line, exit 1, and leaves nothing behind: no cache, no lock file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from transformers import Dinov2Config
from typer.testing import CliRunner

from dinofeat.cli import app
from tests.helpers import make_tiny

ROOT = Path(__file__).resolve().parents[1]
M = ["--model", "random:vits16"]

# (command line with {imgs} {tmp} placeholders, words the one line must contain)
CASES = {
    "cache is a file": (["precompute", "imgs", "afile", *M], "is a file"),
    "cache under a file": (["precompute", "imgs", "afile/c", *M], "which is a file"),
    "empty source folder": (["precompute", "empty", "c", *M], "no images found in 'empty' (looked for .bmp"),
    "missing source": (["precompute", "nosuch", "c", *M], "does not exist"),
    "list naming nothing": (["precompute", "empty.txt", "c", *M], "the list names no files"),
    "tar shards missing": (["precompute", "s/{000..001}.tar", "c", *M], "do not exist"),
    "area too large": (["precompute", "imgs", "c", *M, "--area", "1000000000"], "more than the"),
    "area 0": (["precompute", "imgs", "c", *M, "--area", "0"], "area must be"),
    "negative workers": (["precompute", "imgs", "c", *M, "--workers", "-1"], "decode workers must be"),
    "draft gap 0": (["precompute", "imgs", "c", *M, "--jpeg-draft", "--draft-gap", "0"], "--draft-gap must be >= 1"),
    "gap without draft": (["precompute", "imgs", "c", *M, "--draft-gap", "3"], "only with --jpeg-draft"),
    "gpu decode on a CPU": (["precompute", "imgs", "c", *M, "--decode", "gpu", "--device", "cpu"], "on a CUDA device"),
    "gpu decode drafted": (["precompute", "imgs", "c", *M, "--decode", "gpu", "--jpeg-draft"], "give one"),
    "decode nowhere": (["precompute", "imgs", "c", *M, "--decode", "tpu"], "decode must be one of cpu, gpu"),
    "repair and overwrite": (["precompute", "imgs", "c", *M, "--repair", "--overwrite"], "--overwrite starts over"),
    "prune and overwrite": (["precompute", "imgs", "c", *M, "--prune", "--overwrite"], "--overwrite starts over"),
    "repair in a dry run": (["precompute", "imgs", "c", *M, "--repair", "--dry-run"], "--dry-run only plans"),
    "aspect range": (["precompute", "imgs", "c", *M, "--min-ar", "2", "--max-ar", "1"], "aspect range"),
    "no buckets": (["precompute", "imgs", "c", *M, "--num-buckets", "0"], "must be"),
    "multiple 0": (["precompute", "imgs", "c", *M, "--multiple", "0"], "multiple must be"),
    "multiple vs patch": (["precompute", "imgs", "c", *M, "--multiple", "24"], "not a multiple of the model's patch"),
    "layer too deep": (["precompute", "imgs", "c", *M, "--layers", "99"], "does not exist"),
    "layers not numbers": (["precompute", "imgs", "c", *M, "--layers", "x"], "comma-separated"),
    "dit scale": (["precompute", "imgs", "c", *M, "--dit-scale", "0"], "positive"),
    "limit 0": (["precompute", "imgs", "c", *M, "--limit", "0"], "limit must be"),
    "batch 0": (["precompute", "imgs", "c", *M, "--batch-size", "0"], "batch size"),
    "token budget 0": (["precompute", "imgs", "c", *M, "--token-budget", "0"], "token budget"),
    "shard size 0": (["precompute", "imgs", "c", *M, "--shard-mb", "0"], "shard size"),
    "shard size nan": (["precompute", "imgs", "c", *M, "--shard-mb", "nan"], "shard size"),
    "shard size inf": (["precompute", "imgs", "c", *M, "--shard-mb", "inf"], "shard size"),
    "workers too many": (["precompute", "imgs", "c", *M, "--workers", "100000"], "per core"),
    "buckets too many": (["precompute", "imgs", "c", *M, "--num-buckets", "100000"], "between 1 and"),
    "cache URL scheme": (["precompute", "imgs", "ftp://host/c", *M], "not ftp://"),
    "file URL of another host": (["precompute", "imgs", "file://server/c", *M], "on the machine 'server'"),
    "empty source argument": (["precompute", "", "c", *M], "must be named"),
    "empty cache argument": (["precompute", "imgs", " ", *M], "must be named"),
    "model dir without weights": (["precompute", "imgs", "c", "--model", "noweights"], "no weights"),
    "truncated weights": (["precompute", "imgs", "c", "--model", "truncated"], "are damaged (its header says"),
    "compute dtype": (["precompute", "imgs", "c", *M, "--dtype", "fp8"], "dtype must be"),
    "store dtype": (["precompute", "imgs", "c", *M, "--store-dtype", "int8"], "store dtype"),
    "device": (["precompute", "imgs", "c", *M, "--device", "tpu"], "device"),
    "missing model dir": (["precompute", "imgs", "c", "--model", "./nosuch-model"], "neither a local directory"),
    "random arch": (["precompute", "imgs", "c", "--model", "random:nope"], "unknown random model"),
    "revision of a random model": (["precompute", "imgs", "c", *M, "--revision", "v2"], "random:vits16' is built here"),
    "revision of a model folder": (["precompute", "imgs", "c", "--model", "dinov2", "--revision", "v2"], "has none"),
    "registers of a model without": (
        ["precompute", "imgs", "c", "--model", "dinov2", "--keep-registers"],
        "no register",
    ),
    "processes 0": (["precompute", "imgs", "c", *M, "--num-processes", "0"], "must be >= 1"),
    "rank out of range": (["precompute", "imgs", "c", *M, "--rank", "2", "--world-size", "2"], "rank"),
    "bucket spec file": (["precompute", "imgs", "c", *M, "--bucket-spec", "nosuch.json"], "cannot read a bucket"),
    "validate: no cache": (["validate", "nosuch"], "no dinofeat cache at"),
    "validate: not a cache": (["validate", "imgs"], "not a dinofeat cache"),
    "validate: a file": (["validate", "afile"], "a file, not a folder"),
    "info: a file": (["info", "afile"], "Not a directory"),
    "show: --out is a file": (["show", "nosuch", "a.png", "--out", "afile"], "is a file"),
    "validate: sample": (["validate", "imgs", "--sample", "0"], "--sample"),
    "validate: recompute": (["validate", "imgs", "--recompute", "-1"], "--recompute"),
    "validate: missing images": (["validate", "imgs", "--images", "nosuch"], "does not exist"),
    "info: no cache": (["info", "nosuch"], "no dinofeat cache at"),
    "show: no cache": (["show", "nosuch", "a.png"], "no dinofeat cache at"),
    "buckets: area 0": (["buckets", "--area", "0"], "area"),
    "buckets: aspect": (["buckets", "--min-ar", "0"], "aspect range"),
    "bench: model": (["bench", "--model", "./nosuch-model"], "neither a local directory"),
    "bench: count": (["bench", "--model", "random:vits16", "--count", "0"], "count"),
    "bench: area 0": (["bench", "--model", "random:vits16", "--area", "0"], "--area is the side"),
    "bench: eta": (["bench", "--model", "random:vits16", "--eta-images", "-1"], "--eta-images is a number"),
}


_MODELS: list[Path] = []


def _dinov2(tmp_path_factory) -> Path:
    """A tiny DINOv2 (no register tokens), made once for the module."""
    if not _MODELS:
        _MODELS.append(make_tiny("dinov2", tmp_path_factory.mktemp("refusals") / "dinov2"))
    return _MODELS[0]


@pytest.fixture
def workdir(tmp_path, tmp_path_factory, monkeypatch) -> Path:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("# nothing listed\n")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "s").mkdir()

    Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "noweights")
    shutil.copytree(_dinov2(tmp_path_factory), tmp_path / "dinov2")
    model = shutil.copytree(tmp_path / "dinov2", tmp_path / "truncated")  # a copy or download cut short
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} | {p.name for p in root.iterdir()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_1_and_leaves_nothing(workdir, case):
    args, words = CASES[case]
    before = _tree(workdir)
    r = CliRunner().invoke(app, args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and words in lines[0], lines[0]
    assert _tree(workdir) == before  # no cache, no lock file, nothing else


def test_a_run_leaves_no_lock_file_behind(workdir):
    r = CliRunner().invoke(app, ["precompute", "imgs", "c", *M, "--area", "64", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert (workdir / "c" / "zarr.json").is_file() and not list(workdir.glob(".*lock*"))


def test_an_unreachable_hub_fails_in_seconds_with_one_line(workdir):
    """A closed port stands in for a machine without network (no request leaves 127.0.0.1)."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(workdir / "hf")}
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dinofeat",
            "precompute",
            "imgs",
            "c",
            "--model",
            "facebook/dinov3-vits16-pretrain-lvd1689m",
        ],
        cwd=workdir,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - t0
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stdout + r.stderr
    assert "cannot reach the Hugging Face hub" in lines[0] and "local model directory" in lines[0]
    assert took < 20, took  # not a minute of retries (the interpreter and torch import take a few seconds)
    assert not (workdir / "c").exists()


def test_a_revision_an_older_dinofeat_recorded_for_a_random_model_still_resumes(workdir):
    """The refusal is for new settings: a cache whose record already holds such a revision resumes with it (given
    or inherited), and only another value is refused."""
    from tests.helpers import edit_metadata

    run = ["precompute", "imgs", "c", *M, "--area", "64", "--device", "cpu", "--json"]
    assert CliRunner().invoke(app, run).exit_code == 0
    edit_metadata(workdir / "c", lambda m: m["fingerprint"].update(model_revision="v1"), restamp=True)
    assert CliRunner().invoke(app, [*run, "--revision", "v1"]).exit_code == 0
    assert CliRunner().invoke(app, ["precompute", "imgs", "c", "--device", "cpu", "--json"]).exit_code == 0
    r = CliRunner().invoke(app, [*run, "--revision", "v2"])
    assert r.exit_code == 1 and "--revision names a version of a hub model" in r.output, r.output
