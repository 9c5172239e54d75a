"""Shared fixtures: tiny models built from the real HF configs, saved with save_pretrained and loaded by path
(the same code path as a hub id), and generated image folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_tiny, write_images


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {k: make_tiny(k, root / k) for k in ("dinov3", "dinov2", "dinov2reg")}


@pytest.fixture(scope="session")
def dinov3_path(tiny_models) -> Path:
    return tiny_models["dinov3"]


@pytest.fixture
def image_dir(tmp_path) -> Path:
    d = tmp_path / "images"
    write_images(d, [(64, 48), (48, 64), (96, 32), (40, 40), (80, 60), (32, 96), (64, 64), (50, 70)])
    (d / "nested").mkdir()
    write_images(d / "nested", [(70, 50), (60, 60)], fmt="jpg", start_seed=100)
    return d
