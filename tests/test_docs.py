"""Every code block in README.md and docs/ runs as written, or is checked as far as this machine allows (issue 23).

Each fenced block carries a marker line just before it: `<!-- doctest: run -->` (executed here as written),
`<!-- doctest: parse (why it cannot run here) -->` (every dinofeat command in it must parse: its options exist and
their values have the right types), `<!-- doctest: skip (why) -->` (the CI runs it, or it is a measurement), or
`<!-- doctest: text (what) -->` (output or a layout, not code). A block without a marker fails the suite."""

from __future__ import annotations

import importlib
import math
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dinofeat.extraction.run import extract
from tests.helpers import FAST, write_images

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC = ROOT / "docs" / "dit-integration.md"
_BLOCK = re.compile(r"^(<!-- doctest: (\w+)(?: \((.*?)\))? -->\n)?```(\w*)\n(.*?)^```", re.M | re.S)


def blocks() -> list[tuple[str, str, str, str]]:
    """(where, marker, language, code) of every fenced block in the docs."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in _BLOCK.finditer(text):
            where = f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
            out.append((where, m.group(2) or "", m.group(4), m.group(5)))
    return out


def test_every_block_says_how_it_is_checked():
    unmarked = [where for where, marker, _, _ in blocks() if marker not in ("run", "parse", "skip", "text")]
    assert not unmarked, f"code blocks without a <!-- doctest: ... --> marker: {unmarked}"
    assert sum(marker == "run" for _, marker, _, _ in blocks()) >= 3


def dinofeat_commands(code: str) -> list[list[str]]:
    """The argument lists of every `dinofeat ...` (or `-m dinofeat ...`) command in a shell block; shell variables
    stand for numbers, `# comments` are dropped."""
    text = re.sub(r"\\\n", " ", code)
    out = []
    for line in text.splitlines():
        for part in line.split("&&"):
            words = shlex.split(re.sub(r"\$\(\(.*?\)\)|\$\w+", "1", part), comments=True)
            # a bare `...` is the docs' "and your other options", not an argument (`--model ...` stays a value)
            words = [w for i, w in enumerate(words) if w != "..." or (i and words[i - 1].startswith("-"))]
            for i, w in enumerate(words):
                if w == "dinofeat" and (i == 0 or words[i - 1] in ("-m", "&&")):
                    out.append(words[i + 1 :])
                    break
    return out


PARSED = [(where, code) for where, marker, _, code in blocks() if marker == "parse"]


@pytest.mark.parametrize(("where", "code"), PARSED, ids=[w for w, _ in PARSED])
def test_documented_commands_parse(where, code):
    """What cannot run here (hub weights, GPUs, clusters) must at least be a command this build accepts."""
    import typer.main

    from dinofeat.cli import app

    group = typer.main.get_command(app)
    commands = dinofeat_commands(code)
    assert commands, f"{where}: no dinofeat command in a block marked parse"
    for args in commands:
        sub = group.commands.get(args[0])
        assert sub is not None, f"{where}: no command {args[0]!r}"
        sub.make_context(args[0], list(args[1:]))  # raises on an unknown option or a value of the wrong type


_DOTTED = re.compile(r"(?<![\w./-])dinofeat((?:\.[A-Za-z_]\w*)+)(\()?")


def dotted_references(text: str) -> list[tuple[str, bool]]:
    """Every `dinofeat.a.b` name the text gives (in prose, inline code or any block), and whether it is called
    (followed by `(`)."""
    return [("dinofeat" + m.group(1), m.group(2) is not None) for m in _DOTTED.finditer(text)]


def resolve(dotted: str) -> object:
    """The object a dotted name stands for after `import dinofeat`, as Python evaluates it: each part an attribute
    (a package's `assign` is the function its __init__ exports), else the submodule of that name (imported)."""
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, attr in enumerate(parts[1:], 2):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            if not isinstance(obj, types.ModuleType):
                raise
            obj = importlib.import_module(".".join(parts[:i]))
    return obj


@pytest.mark.parametrize(
    ("text", "refs"),
    [
        ("`dinofeat.inspection.bench(...)`", [("dinofeat.inspection.bench", True)]),
        ("`dinofeat.bench(...)` and dinofeat.cache.gcs", [("dinofeat.bench", True), ("dinofeat.cache.gcs", False)]),
        ("python -m dinofeat precompute, dinofeat.", []),
        ("tests/dinofeat.x, pkg.dinofeat.y(", []),
    ],
)
def test_dotted_references_are_found(text, refs):
    assert dotted_references(text) == refs


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_named_python_objects_exist_and_calls_are_callable(doc):
    """Issue 30.7: the README called `dinofeat.inspection.bench(...)`, a module (TypeError): every dotted name the
    docs give must exist, and one written as a call must be callable (a function or a class), not a module."""
    bad = []
    for name, called in dotted_references(doc.read_text()):
        try:
            obj = resolve(name)
        except (ImportError, AttributeError) as e:
            bad.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if called and not callable(obj):
            bad.append(f"{name}(...): a {type(obj).__name__}, not callable")
    assert not bad, f"{doc.relative_to(ROOT)}: {bad}"


def unmade_tar_targets(code: str) -> list[str]:
    """The folders a block's `tar ... -C DIR` extracts into without a `mkdir -p DIR` before it (tar refuses a
    folder that does not exist)."""
    made, out = set(), []
    for words in (shlex.split(part, comments=True) for part in re.split(r"&&|\||;|\n", re.sub(r"\\\n", " ", code))):
        if words[:2] == ["mkdir", "-p"]:
            made |= set(words[2:])
        elif words[:1] == ["tar"] and "-C" in words[:-1]:
            target = words[words.index("-C") + 1]
            if target not in made:
                out.append(target)
    return out


@pytest.mark.parametrize(
    ("code", "unmade"),
    [
        ("aws s3 cp s3://b/0.tar - | tar -xf - -C /tmp/sample && ls", ["/tmp/sample"]),
        ("mkdir -p /tmp/sample && aws s3 cp s3://b/0.tar - | tar -xf - -C /tmp/sample", []),
        ("tar -xf x.tar", []),
    ],
)
def test_unmade_tar_targets(code, unmade):
    assert unmade_tar_targets(code) == unmade


@pytest.mark.parametrize(("where", "code"), PARSED, ids=[w for w, _ in PARSED])
def test_documented_tar_targets_are_made_first(where, code):
    """Issue 30.7: scale-out.md extracted a shard with `tar -C /tmp/sample`, a folder nothing had made."""
    assert not unmade_tar_targets(code), f"{where}: make these folders first (mkdir -p): {unmade_tar_targets(code)}"


# ---- the runnable blocks -----------------------------------------------------------------------------------------
def _module(doc: Path, index: int, tmp_path: Path, name: str, monkeypatch):
    """The `index`-th python block of `doc`, written as written to a module (importable by spawned workers)."""
    code = [c for _, marker, lang, c in _blocks_of(doc) if lang == "python" and marker == "run"][index]
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, module)  # gone with the test
    return module


def _blocks_of(doc: Path) -> list[tuple[str, str, str, str]]:
    return [b for b in blocks() if b[0].startswith(str(doc.relative_to(ROOT)))]


@pytest.fixture(scope="module")
def tied_cache(tmp_path_factory, tiny_models) -> Path:
    root = tmp_path_factory.mktemp("doc")
    imgs = root / "imgs"
    write_images(imgs, [(128, 64)] * 5 + [(64, 128)] * 4 + [(96, 96)] * 3)
    model = str(tiny_models["dinov3"])
    s = extract(imgs, root / "cache", model=model, area=128, dit_scale="1/2", flip=True, num_buckets=5, **FAST)
    assert s.done == 12
    return root / "cache"


def test_dit_integration_example_runs(tied_cache, tmp_path, monkeypatch):
    example = _module(DOC, 0, tmp_path, "dit_example", monkeypatch)
    loss = example.train_steps(str(tied_cache), epochs=3)
    assert math.isfinite(loss) and loss > 0


@pytest.mark.slow
def test_dit_integration_example_runs_with_spawned_workers(tied_cache, tmp_path, monkeypatch):
    """Workers started with spawn unpickle the dataset and its `extra` (a closure there could not be)."""
    example = _module(DOC, 0, tmp_path, "dit_example_spawn", monkeypatch)
    loss = example.train_steps(str(tied_cache), epochs=2, num_workers=2, context="spawn")
    assert math.isfinite(loss) and loss > 0


def test_dit_token_ij_gets_dino_patch_i_div_k(tmp_path, monkeypatch):
    spread = _module(DOC, 0, tmp_path, "dit_grid", monkeypatch).dino_on_dit_grid
    patches = torch.randn(2, 3, 5, 7)
    for k in (1, 2, 3):
        out = spread(patches, k)
        assert out.shape == (2, 3 * k, 5 * k, 7)
        for i in range(3 * k):
            for j in range(5 * k):
                assert torch.equal(out[:, i, j], patches[:, i // k, j // k])


def test_remote_reading_example_runs_against_a_real_s3_server(tmp_path, dinov3_path, monkeypatch):
    """docs/scale-out.md's reader block, as written, against s3://bucket/feats on a local S3 server."""
    from dinofeat import filesystems
    from tests.s3server import S3Server, apply_env, restore_env

    with S3Server() as server:
        old = apply_env(server.env)
        monkeypatch.setattr(filesystems, "_FILESYSTEMS", {})  # no client of another test's server
        try:
            server.bucket("bucket")
            imgs = tmp_path / "imgs"
            write_images(imgs, [(64, 48)] * 3 + [(48, 64)] * 2)
            extract(imgs, "s3://bucket/feats", model=str(dinov3_path), area=64, **FAST)
            monkeypatch.chdir(tmp_path)
            code = next(c for _, m, _, c in _blocks_of(ROOT / "docs" / "scale-out.md") if m == "run")
            ns: dict = {}
            exec(compile(code, "scale-out.md", "exec"), ns)
            assert len(ns["ds"]) == 5 and len(ns["loader"]) >= 2
        finally:
            restore_env(old)


@pytest.mark.slow
def test_the_training_recipe_runs_on_two_cpu_processes_as_documented(tmp_path):
    """Issue 30.7: docs/dit-integration.md's recipe, saved as recipe.py, and its shell block run as written (the
    cache made by the CLI, the recipe under torchrun): two processes, each served its half."""
    doc = ROOT / "docs" / "dit-integration.md"
    recipe = next(c for _, m, lang, c in _blocks_of(doc) if lang == "python" and m == "run" and "def ddp_loader" in c)
    shell = next(c for _, m, lang, c in _blocks_of(doc) if lang == "bash" and m == "run" and "torchrun" in c)
    (tmp_path / "recipe.py").write_text(recipe)
    (tmp_path / "docs").symlink_to(ROOT / "docs")  # the block names the repository's example images
    # this checkout's dinofeat and torch, whatever the console scripts on PATH point at
    prelude = f'dinofeat() {{ "{sys.executable}" -m dinofeat "$@"; }}\n'
    prelude += f'torchrun() {{ "{sys.executable}" -m torch.distributed.run "$@"; }}\nset -e\n'
    r = subprocess.run(
        ["bash", "-c", prelude + shell],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # each process writes its line in one write: two processes' lines never run together (seen under
    # PYTHONUNBUFFERED with print, whose text and newline are two writes)
    shares = sorted(re.findall(r"^process (\d) of (\d): (\d+) samples$", r.stdout, re.M))
    assert shares == [("0", "2", "16"), ("1", "2", "16")], r.stdout


def test_config_file_example_runs(tmp_path, monkeypatch):
    """README's `--config docs/examples/precompute.toml` commands, as written, in a copy of docs/examples (the
    example's cache is made in the current directory)."""
    import shutil

    from typer.testing import CliRunner

    from dinofeat.cache.store import Store
    from dinofeat.cli import app

    shutil.copytree(ROOT / "docs" / "examples", tmp_path / "docs" / "examples")
    monkeypatch.chdir(tmp_path)
    code = next(c for _, m, _, c in _blocks_of(ROOT / "README.md") if m == "run" and "--config" in c)
    commands = dinofeat_commands(code)
    assert len(commands) == 2
    areas = []
    for args in commands:
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0, out.output
        assert "; sealed" in out.stdout and "\r" not in out.output and "extract:" not in out.output  # quiet = true
        areas.append(Store(tmp_path / "example-features").meta["fingerprint"]["bucket_spec"]["area"])
    assert areas == [64, 128]  # the file's area, then the flag's
