"""The code style the brief asks for is enforced, not hoped for: ruff's lint rules and formatting (pyproject.toml)
over every Python file of the project. ruff is pinned in the test extra, so CI and a laptop judge alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ["dinofeat", "buckets", "tests", "benchmarks", "cli.py", ".ci"]


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_is_clean():
    r = _ruff("check", *PYTHON)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_format_is_clean():
    r = _ruff("format", "--check", *PYTHON)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
