"""The README's set-up is what CI runs, its test command works without the current directory on sys.path, and
URLs are refused (remote caches do not exist yet) instead of becoming local folders named 's3:'."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dinofeat.cli import app
from dinofeat.errors import ConfigError
from dinofeat.paths import is_file_url, is_url, local_path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ci_runs_the_readme_commands():
    cmds = _readme_commands().setup_commands((ROOT / "README.md").read_text())
    assert "dinofeat precompute" in cmds["main"] and "dinofeat validate" in cmds["main"]
    assert cmds["test"].endswith("pytest -q -p no:cacheprovider")  # the pytest script, as a user types it
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_commands.py main" in ci and "readme_commands.py test" in ci
    assert 'bash -euo pipefail -c "$main_job"' in ci and 'bash -euo pipefail -c "$test_cmd"' in ci
    assert "pytest" not in ci.replace("readme_commands.py", "")  # no look-alike test command of its own


@pytest.mark.parametrize(
    "readme",
    [
        "## Set-up\n\n```bash\na\n```\n\n## Next\n",  # one block
        "## Set-up\n\n```bash\na\n```\n```bash\nb\nc\n```\n\n## Next\n",  # a two-line block
        "# no set-up section\n",
    ],
)
def test_readme_shape_is_enforced(readme):
    with pytest.raises(SystemExit):
        _readme_commands().setup_commands(readme)


def test_suite_collects_without_cwd_on_sys_path():
    """`pytest` (the script) does not put the current directory on sys.path; `python -P` reproduces that."""
    r = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_docs.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("s3://bucket/feats", True),
        ("gs://b/x", True),
        ("http://host/x", True),
        ("file:///tmp/x", True),
        ("file:/tmp/x", True),
        ("/data/feats", False),
        ("relative/s3:/x", False),
        ("C:\\data", False),
        ("feats:v2", False),
    ],
)
def test_url_detection(value, url):
    assert (is_url(value) or is_file_url(value)) is url
    if url:
        with pytest.raises(ConfigError, match="is a URL"):
            local_path(value, "cache")
    else:
        assert local_path(value, "cache") == Path(value)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["precompute", "docs/examples/images", "nosuch://bucket/feats", "--model", "random:vits16"], "not nosuch://"),
        (["precompute", "s3://bucket/images", "{tmp}/c", "--model", "random:vits16"], "is a URL"),
        (["precompute", "docs/examples/images", "s3://bucket", "--model", "random:vits16"], "prefix inside"),
        (["validate", "ftp://bucket/feats"], "not ftp://"),
        (["info", "s3://bucket/"], "prefix inside"),
        (["show", "nosuch://bucket/feats", "a.jpg"], "not nosuch://"),
    ],
)
def test_cli_refuses_bad_urls_with_one_line(tmp_path, monkeypatch, args, words):
    """Caches may be URLs (tests/test_remote.py); image folders may not, and a URL dinofeat cannot use is refused in
    one line before anything is read or written (no request leaves the machine)."""
    monkeypatch.chdir(ROOT)
    r = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code == 1
    err = r.output.strip().splitlines()
    assert len(err) == 1 and words in err[0], r.output
    assert not list(ROOT.glob("s3:*")) and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "spelling", ["file://{p}", "file://localhost{p}", "FILE://LocalHost{p}", "file:{p}", "File:{p}", "{p}"]
)
def test_a_file_url_with_or_without_localhost_is_the_local_folder(tmp_path, monkeypatch, spelling):
    """`file://localhost/path` and `file:/path` are `/path` (RFC 8089), never the relative folders
    `./localhost/path` or `./file:/path`."""
    from dinofeat.cache.objects import cache_location, open_files

    monkeypatch.chdir(tmp_path)
    target = tmp_path / "feats"
    assert cache_location(spelling.format(p=target)) == target
    assert open_files(spelling.format(p=target)).root == target


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file://server/data/feats", "on the machine 'server'"),
        ("file://", "names no folder"),
        ("file:feats", "without an absolute path"),
        ("file:/", "without an absolute path"),
    ],
)
def test_a_file_url_of_another_host_is_refused_in_one_line(tmp_path, monkeypatch, url, words):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["validate", url])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and words in lines[0], r.output
    assert not list(tmp_path.iterdir())
