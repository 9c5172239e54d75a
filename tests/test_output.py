"""Batch-job friendly output (issue 30.2): progress follows --quiet and TQDM_DISABLE, is plain lines when stderr is a
log, and every --json names the dinofeat that wrote it."""

from __future__ import annotations

import io
import json

import pytest
from typer.testing import CliRunner

from dinofeat import __version__, progress
from dinofeat.cli import app
from tests.helpers import write_images


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("enabled", "env", "stream", "want"),
    [
        (True, {}, Terminal(), "frames"),
        (True, {}, io.StringIO(), "lines"),  # SLURM, nohup, CI: stderr is a file or a pipe
        (False, {}, Terminal(), "off"),  # --quiet, --json, a rank other than 0
        (True, {"TQDM_DISABLE": "1"}, Terminal(), "off"),
        (True, {"TQDM_DISABLE": "0"}, Terminal(), "off"),  # tqdm's rule: any non-empty value disables
        (True, {"TQDM_DISABLE": ""}, io.StringIO(), "lines"),
    ],
)
def test_progress_mode(enabled, env, stream, want):
    assert progress.mode(enabled, stream, env) == want


def test_a_log_gets_lines_not_frames(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    log = io.StringIO()
    with progress.bar(total=1000, desc="extract", unit="img", file=log) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert 2 <= len(lines) <= 3 and lines[-1].startswith("extract: 100%") and "1000/1000" in lines[-1]
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)  # a redraw due at every update: one line each
    log = io.StringIO()
    for _ in progress.bar(range(5), desc="probe", file=log, miniters=1):
        pass
    assert "\r" not in log.getvalue() and len(log.getvalue().splitlines()) >= 5


def test_a_terminal_gets_frames(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    tty = Terminal()
    for _ in progress.bar(range(3), desc="probe", file=tty):
        pass
    assert "\r" in tty.getvalue()


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("out")
    write_images(root / "imgs", [(64, 64)] * 3)
    args = [str(root / "imgs"), str(root / "c"), "--model", str(tiny_models["dinov3"]), "--area", "64"]
    args += ["--workers", "0", "--device", "cpu", "--dtype", "fp32"]
    out = CliRunner().invoke(app, ["precompute", *args, "--quiet"])
    assert out.exit_code == 0, out.output
    return root, args


@pytest.mark.parametrize(
    ("extra", "env", "shown"),
    [([], {}, True), (["--quiet"], {}, False), (["-q"], {}, False), ([], {"TQDM_DISABLE": "1"}, False)],
)
def test_precompute_progress_follows_quiet_and_tqdm_disable(made, monkeypatch, extra, env, shown):
    _, args = made
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = CliRunner().invoke(app, ["precompute", *args, "--overwrite", *extra])
    assert out.exit_code == 0, out.output
    assert ("probe:" in out.stderr and "extract:" in out.stderr) is shown, out.stderr
    assert "\r" not in out.stderr  # CliRunner's stderr is no terminal: lines
    assert "3 done" in out.stdout  # the result prints either way


def test_validate_quiet(made, monkeypatch):
    root, _ = made
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    loud = CliRunner().invoke(app, ["validate", str(root / "c")])
    quiet = CliRunner().invoke(app, ["validate", str(root / "c"), "--quiet"])
    assert loud.exit_code == quiet.exit_code == 0
    assert "validate:" in loud.stderr and "validate:" not in quiet.stderr and "OK" in quiet.stdout


def test_every_json_names_the_version(made, tmp_path):
    """Every command with --json carries this build's version under the one key "dinofeat"."""
    root, args = made
    model = args[args.index("--model") + 1]
    tiny = [
        "--area",
        "64",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--count",
        "2",
        "--megapixels",
        "0.01",
        "--workers",
        "0",
    ]
    commands = {
        "buckets": ["buckets", "--area", "64"],
        "precompute": ["precompute", *args, "--overwrite"],
        "precompute --dry-run": ["precompute", *args, "--dry-run"],
        "validate": ["validate", str(root / "c")],
        "info": ["info", str(root / "c")],
        "bench": ["bench", "--model", model, *tiny],
    }
    import typer.main

    with_json = {
        n for n, c in typer.main.get_command(app).commands.items() if any(p.name == "as_json" for p in c.params)
    }
    assert with_json == {c.split()[0] for c in commands}, "a command with --json is missing here"
    for name, cmd in commands.items():
        out = CliRunner().invoke(app, [*cmd, "--json"])
        assert out.exit_code == 0, (name, out.output)
        assert json.loads(out.stdout)["dinofeat"] == __version__, name


def test_each_rank_of_a_manual_split_says_what_it_did(tmp_path, tiny_models):
    """Issue 30.2: rank 0 of a `--rank/--world-size` split ends first here (rank 1 printed nothing at all, and rank 0
    said "pending" of a cache rank 1 then sealed): each rank names its own images, failures and shards; the rank that
    ends first says the rest is in the other ranks' shards."""
    import re

    from dinofeat.cache.store import Store
    from tests.helpers import bad_files

    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 6 + [(96, 48)] * 3, fmt="jpg")
    data = (imgs / "im_001.jpg").read_bytes()
    (imgs / "im_001.jpg").write_bytes(data[: len(data) * 2 // 3])  # header intact: fails at decode, inside a shard
    bad_files(imgs)  # and failures of the plan (the probe), which are no rank's
    args = ["precompute", str(imgs), str(tmp_path / "c"), "--model", str(tiny_models["dinov3"]), "--area", "64"]
    args += ["--shard-mb", "0.002", "--workers", "0", "--device", "cpu", "--dtype", "fp32", "--world-size", "2", "-q"]
    said, work = [], []
    for rank in (0, 1):
        out = CliRunner().invoke(app, [*args, "--rank", str(rank)])
        assert out.exit_code == 0, out.output
        said.append(out.stdout)
        m = re.search(rf"rank {rank} of 2: (\d+) images? \((\d+) failed\), (\d+) shards? written", out.stdout)
        assert m, out.stdout
        work.append(tuple(map(int, m.groups())))
    st = Store(tmp_path / "c")
    assert st.meta["state"] == "sealed"
    decode_failures = len(st.index.failures()) - len(st.index.plan().probe_errors)  # inside shards: the ranks'
    assert sum(w[0] for w in work) == 9 and sum(w[1] for w in work) == decode_failures >= 1
    assert sum(w[2] for w in work) == len(st.markers.read()) and all(w[2] for w in work)
    assert "pending" not in said[0] and "in the other ranks' shards" in said[0] and "sealed" not in said[0]
    assert "; sealed" in said[1] and not re.search(r"[1-9]\d* pending", said[1])
    assert "by 2 processes" not in said[0] + said[1]  # each counts its own images
