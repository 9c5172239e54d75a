"""Shared fixtures: tiny models built from the real HF configs, saved with save_pretrained and loaded by path
(the same code path as a hub id), and generated image folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_tiny, write_image_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {k: make_tiny(k, root / k) for k in ("dinov3", "dinov2", "dinov2reg")}


@pytest.fixture(scope="session")
def dinov3_path(tiny_models) -> Path:
    return tiny_models["dinov3"]


@pytest.fixture
def image_dir(tmp_path) -> Path:
    return write_image_dir(tmp_path / "images")
