"""`dinofeat precompute --config run.toml` (issue 30.3): any precompute option from a TOML file, keys spelled as the
command line spells them, the command line over the file, and the cache recording what the run used as flags do."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from dinofeat.cache.store import Store
from dinofeat.cli import app
from dinofeat.cli.app import precompute
from dinofeat.cli.options import file_options
from dinofeat.errors import ConfigError
from dinofeat.runfile import options_from, read_options
from tests.helpers import write_images

KNOWN = file_options(typer.main.get_command(app).commands["precompute"], precompute, skip={"config", "help"})


@pytest.mark.parametrize(
    ("doc", "want"),
    [
        ({"area": 512}, {"area": 512}),
        ({"shard-mb": 256}, {"shard_mb": 256.0}),  # a whole number is a number
        ({"shard_mb": 1.5}, {"shard_mb": 1.5}),  # underscores for dashes
        ({"min-ar": 0.5, "max_ar": 2}, {"min_ar": 0.5, "max_ar": 2.0}),
        ({"jpeg-draft": True, "draft-gap": 3}, {"jpeg_draft": True, "draft_gap": 3}),
        ({"compile": False}, {"compile_model": False}),  # the option's name, not the parameter's
        ({"json": True, "quiet": True}, {"as_json": True, "quiet": True}),
        (
            {"source": "imgs", "cache": "feats", "layers": "4,8,-1"},
            {"source": "imgs", "cache": "feats", "layers": "4,8,-1"},
        ),
        (
            {"bucket-spec": "spec.json", "model": "random:vits16"},
            {"bucket_spec": "spec.json", "model": "random:vits16"},
        ),
        ({}, {}),
    ],
)
def test_keys_and_values(doc, want):
    assert options_from(doc, KNOWN, "run.toml") == want


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"aera": 512}, r"run.toml: unknown option 'aera'; did you mean area\? \(known: area, batch-size, "),
        ({"shardmb": 1}, r"unknown option 'shardmb'; did you mean shard-mb\?"),
        ({"frobnicate": 1}, r"unknown option 'frobnicate'; \(known: "),
        ({"config": "other.toml"}, r"unknown option 'config'"),  # a file does not name another
        ({"area": "512"}, r"run.toml: area must be a whole number, got '512' \(str\)"),
        ({"area": True}, r"area must be a whole number, got True \(bool\)"),
        ({"area": 1.5}, r"area must be a whole number, got 1.5 \(float\)"),
        ({"shard-mb": "big"}, r"shard-mb must be a number, got 'big' \(str\)"),
        ({"flip": 1}, r"flip must be true or false, got 1 \(int\)"),
        ({"model": {"id": "x"}}, r"model must be a string, got a table"),
        ({"layers": [4, 8]}, r"layers must be a string, got \[4, 8\] \(list\)"),
        ({"shard-mb": 1, "shard_mb": 2}, r"'shard_mb' and 'shard-mb' set the same option; keep one"),
        # actions for one run and per-process settings: a rerun of the same file must resume, not start over
        ({"overwrite": True}, r"'overwrite' is an action for one run \(a rerun of the same file would delete"),
        ({"dry_run": True}, r"'dry_run' is an action for one run: give --dry-run on the command line"),
        ({"repair": True}, r"'repair' is an action for one run: give --repair on the command line"),
        ({"prune": True}, r"'prune' is an action for one run"),
        ({"rank": 1}, r"'rank' is different for each process of a split: give --rank on the command line"),
        ({"world-size": 2}, r"'world-size' is part of a manual split"),
    ],
)
def test_refusals_name_the_key(doc, error):
    with pytest.raises(ConfigError, match=error):
        options_from(doc, KNOWN, "run.toml")


def test_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        read_options(tmp_path / "missing.toml", KNOWN)
    (tmp_path / "bad.toml").write_text("area = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        read_options(tmp_path / "bad.toml", KNOWN)
    (tmp_path / "ok.toml").write_text('area = 64\nshard-mb = 0.5\n# a comment\nsource = "imgs"\n')
    assert read_options(tmp_path / "ok.toml", KNOWN) == {"area": 64, "shard_mb": 0.5, "source": "imgs"}


@pytest.fixture(scope="module")
def images(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("runfile")
    write_images(root / "imgs", [(64, 64), (96, 48)])
    return root / "imgs", str(tiny_models["dinov3"])


def toml(settings: dict) -> str:
    return "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}\n" for k, v in settings.items())


FAST = {"workers": 0, "device": "cpu", "dtype": "fp32", "quiet": True}


def run(tmp_path, file: dict, flags: list[str]) -> CliRunner:
    (tmp_path / "run.toml").write_text(toml(file))
    return CliRunner().invoke(app, ["precompute", "--config", str(tmp_path / "run.toml"), *flags])


@pytest.mark.parametrize(
    ("file", "flags", "want"),
    [
        ({"area": 128}, [], {"area": 128, "flip": False}),
        ({"area": 128}, ["--area", "64"], {"area": 64, "flip": False}),  # the command line wins
        ({"area": 128, "flip": True}, ["--area", "64"], {"area": 64, "flip": True}),  # a flag not given: the file's
        ({"area": 64, "flip": True}, ["--no-flip"], {"area": 64, "flip": False}),
    ],
)
def test_the_command_line_overrides_the_file(images, tmp_path, file, flags, want):
    imgs, model = images
    out = run(tmp_path, {"model": model, **FAST, **file}, [str(imgs), str(tmp_path / "c"), *flags])
    assert out.exit_code == 0, out.output
    fp = Store(tmp_path / "c").meta["fingerprint"]
    assert fp["bucket_spec"]["area"] == want["area"] and bool((fp.get("features") or {}).get("flip")) == want["flip"]


def test_the_cache_records_the_same_settings_as_flags_give(images, tmp_path):
    imgs, model = images
    settings = {"model": model, "area": 64, "min-ar": 0.5, "num-buckets": 5, "layers": "1,-1", "flip": True}
    flags = [w for k, v in settings.items() for w in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]
    fast = ["--workers", "0", "--device", "cpu", "--dtype", "fp32", "--quiet"]
    by_flags = CliRunner().invoke(app, ["precompute", str(imgs), str(tmp_path / "a"), *flags, *fast])
    assert by_flags.exit_code == 0, by_flags.output
    by_file = run(tmp_path, {**settings, **FAST, "source": str(imgs), "cache": str(tmp_path / "b")}, [])
    assert by_file.exit_code == 0, by_file.output  # SOURCE and CACHE from the file
    a, b = Store(tmp_path / "a").meta, Store(tmp_path / "b").meta
    assert a["fingerprint"] == b["fingerprint"] and a["bucket_spec_hash"] == b["bucket_spec_hash"]
    # a rerun with the same file resumes (the file's settings are given ones, equal to the cache's)
    again = run(tmp_path, {**settings, **FAST, "source": str(imgs), "cache": str(tmp_path / "b")}, ["--json"])
    assert again.exit_code == 0, again.output
    assert '"processed": 0' in again.stdout and '"sealed": true' in again.stdout
    # and a file that differs from the cache is refused as a flag would be
    other = run(tmp_path, {**settings, **FAST, "area": 128, "source": str(imgs), "cache": str(tmp_path / "b")}, [])
    assert other.exit_code == 1 and "different settings" in other.output


def test_a_bad_file_is_one_line_before_any_work(images, tmp_path):
    imgs, model = images
    out = run(tmp_path, {"model": model, "area": "big"}, [str(imgs), str(tmp_path / "c")])
    assert out.exit_code == 1 and out.output.strip().count("\n") == 0, out.output
    assert "area must be a whole number" in out.output and not (tmp_path / "c").exists()
    out = run(tmp_path, {"model": model, "are": 64}, [str(imgs), str(tmp_path / "c")])
    assert out.exit_code == 1 and "unknown option 'are'; did you mean area?" in out.output


@pytest.mark.parametrize("flag", ["--no-quiet", "--no-fit", "--no-json"])
def test_every_switch_a_file_can_set_the_command_line_can_unset(flag):
    """A file's `quiet = true` (the example sets it) or `fit = true` must yield to the command line, as the docs
    say: every bool option has its --no- form."""
    command = typer.main.get_command(app).commands["precompute"]
    switches = [p for p in command.params if getattr(p, "is_flag", False) and p.name != "help"]
    assert switches and all(p.secondary_opts for p in switches), [p.name for p in switches if not p.secondary_opts]
    assert flag in {o for p in switches for o in p.secondary_opts}
