"""The dependency rule (docs/architecture.md), checked on every import in the package, at module level or inside a
function: a layer imports only the layers it sits on, and each heavy library has one home."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import comparable_files, old_tree

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dinofeat"

BASE = {
    "errors",
    "paths",
    "filesystems",
    "storeerrors",
    "progress",
    "runfile",
    "keys",
    "buckets",
    "__init__",
    "__version__",
}
# layer -> the layers it may import (besides itself and the base)
ALLOWED = {
    "base": set(),
    "sources": set(),
    "images": {"sources"},
    "cache": set(),
    "extraction": {"sources", "images", "cache"},
    "read": {"cache"},
    "inspection": {"sources", "images", "cache", "extraction", "read"},
    "cli": {"sources", "images", "cache", "extraction", "read", "inspection"},
}
# third-party libraries with one home: (module prefix) -> where they may be imported
HOMES = {
    "zarr": ("dinofeat.cache.",),
    "transformers": ("dinofeat.extraction.model",),
    "typer": ("dinofeat.cli",),
    "click": ("dinofeat.cli",),
    "pyarrow": ("dinofeat.sources.parquet",),
    "torchvision": ("dinofeat.extraction.devicedecode",),
    "tqdm": ("dinofeat.progress",),  # one place decides how progress is shown
}


def layer_of(module: str) -> str:
    """'dinofeat.cache.store' -> 'cache'; base modules and the bucket tables -> 'base'."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    return "cli" if parts[1] == "__main__" else parts[1]


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import of every module of the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + (
                    [f"{node.module}.{a.name}" for a in node.names] if node.module in ("dinofeat",) else []
                )
                out += [(module, n, node.lineno) for n in names]
            elif isinstance(node, ast.Import):
                out += [(module, a.name, node.lineno) for a in node.names]
    return out


def test_layers_import_only_what_they_sit_on():
    wrong = []
    for module, imported, line in imports():
        if not imported.startswith("dinofeat.") or imported == "dinofeat":
            continue
        src, dst = layer_of(module), layer_of(imported)
        if src != dst and dst != "base" and dst not in ALLOWED[src]:
            wrong.append(f"{module}:{line} imports {imported} ({src} -> {dst})")
        if src == "base" and dst == "base" and module.startswith("dinofeat.buckets") and "buckets" not in imported:
            wrong.append(f"{module}:{line} imports {imported} (the bucket tables stand alone)")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("library", list(HOMES))
def test_each_heavy_library_has_one_home(library):
    stray = [
        f"{module}:{line}"
        for module, imported, line in imports()
        if (imported == library or imported.startswith(library + "."))
        and not any(module == h or module.startswith(h) for h in HOMES[library])
    ]
    assert not stray, f"{library} imported outside {HOMES[library]}: {stray}"


def test_the_bucket_tables_and_the_package_import_light():
    """`import buckets` (a DiT dataloader's) and `import dinofeat` pull in neither torch nor zarr."""
    code = (
        "import sys, buckets, dinofeat, dinofeat.buckets; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'zarr', 'transformers', 'numpy'}); "
        "print(','.join(heavy)); assert buckets.BucketSpec is dinofeat.buckets.BucketSpec"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_a_users_buckets_py_or_cli_py_breaks_nothing(tmp_path, dinov3_path):
    """Their own modules named like ours, in the working directory (first on sys.path), change nothing of ours."""
    (tmp_path / "buckets.py").write_text("raise ImportError('the user buckets.py')\n")
    (tmp_path / "cli.py").write_text("raise ImportError('the user cli.py')\n")
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "imgs" / "a.png")
    code = "import dinofeat; from dinofeat.cli import main; import sys; sys.argv = sys.argv[1:]; main()"
    args = ["dinofeat", "precompute", "imgs", "c", "--model", str(dinov3_path), "--area", "64", "--device", "cpu"]
    r = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "sealed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


# ---- the move changed no byte ------------------------------------------------------------------------------------
BEFORE_MOVE = "e835773"  # the last commit before issue 24 moved the modules into their packages
OLD_RUN = (
    "import sys; from dinofeat.precompute import extract; "
    "extract(sys.argv[1], sys.argv[2], model=sys.argv[3], area=64, shard_mb=0.004, flip=True, "
    "num_workers=0, progress=False, dtype='fp32', device='cpu')"
)


@pytest.mark.slow
def test_a_cache_written_before_and_after_the_move_is_byte_identical(tmp_path, dinov3_path):
    old = tmp_path / "old"
    if not old_tree(old, BEFORE_MOVE):
        pytest.skip(f"commit {BEFORE_MOVE} is not in this checkout's history")
    from dinofeat.extraction.run import extract
    from tests.helpers import write_images

    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 4 + [(48, 64)] * 3 + [(64, 64)] * 2)
    env = {**os.environ, "PYTHONPATH": str(old)}
    r = subprocess.run(
        [sys.executable, "-c", OLD_RUN, str(imgs), str(tmp_path / "before"), str(dinov3_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    extract(imgs, tmp_path / "after", model=str(dinov3_path), area=64, shard_mb=0.004, flip=True,
            num_workers=0, progress=False, dtype="fp32", device="cpu")  # fmt: skip
    before, after = comparable_files(tmp_path / "before"), comparable_files(tmp_path / "after")
    assert sorted(before) == sorted(after)
    different = [rel for rel in before if before[rel] != after[rel]]
    assert not different, different


def test_the_wheel_installs_only_dinofeat(tmp_path):
    """Issue 30.6: a top-level `buckets` (or `cli`) in site-packages would clash with a user's `buckets.py` or another
    distribution's package of that name. The repository's buckets/ and cli.py serve a checkout; the wheel holds
    `dinofeat` and its dist-info, nothing else. Built from a copy, offline, with the build backend installed here."""
    import shutil
    import zipfile

    setuptools = pytest.importorskip("setuptools", reason="no build backend in this environment (built offline)")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} here; pyproject.toml's build backend needs >= 68")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "tests"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = tmp_path.glob("dinofeat-*.whl")
    with zipfile.ZipFile(wheel) as z:
        top = {name.split("/")[0] for name in z.namelist()}
        names = set(z.namelist())
    assert {t for t in top if not t.endswith(".dist-info")} == {"dinofeat"}, sorted(top)
    assert {"dinofeat/buckets/__init__.py", "dinofeat/cli/app.py"} <= names  # the code those names re-export
