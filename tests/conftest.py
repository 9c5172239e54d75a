"""Shared fixtures: tiny models built from the real HF configs, saved with save_pretrained and loaded by path
(the same code path as a hub id), and generated image folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_tiny, write_image_dir


@pytest.fixture(scope="session", autouse=True)
def random_weights_stay_in_the_test_folder(tmp_path_factory):
    """random: models keep their drawn weights under DINOFEAT_CACHE_DIR: a folder of this session's, not ~/.cache
    (subprocesses inherit it)."""
    os.environ["DINOFEAT_CACHE_DIR"] = str(tmp_path_factory.mktemp("dinofeat-cache"))


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
