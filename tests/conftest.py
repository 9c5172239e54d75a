"""Shared fixtures: tiny models built from the real HF configs, saved with save_pretrained and loaded by path
(the same code path as a hub id), and generated image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _save(config, path: Path) -> Path:
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(path)
    return path


def make_tiny(kind: str, path: Path, **overrides) -> Path:
    from transformers import Dinov2Config, Dinov2WithRegistersConfig, DINOv3ViTConfig

    kw = {**TINY, **overrides}
    if kind == "dinov3":
        cfg = DINOv3ViTConfig(patch_size=16, num_register_tokens=4, **kw)
    elif kind == "dinov2":
        cfg = Dinov2Config(
            patch_size=14, image_size=56, mlp_ratio=2, **{k: v for k, v in kw.items() if k != "intermediate_size"}
        )
    elif kind == "dinov2reg":
        cfg = Dinov2WithRegistersConfig(
            patch_size=14,
            image_size=56,
            num_register_tokens=4,
            mlp_ratio=2,
            **{k: v for k, v in kw.items() if k != "intermediate_size"},
        )
    else:
        raise ValueError(kind)
    return _save(cfg, path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {k: make_tiny(k, root / k) for k in ("dinov3", "dinov2", "dinov2reg")}


@pytest.fixture(scope="session")
def dinov3_path(tiny_models) -> Path:
    return tiny_models["dinov3"]


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


def write_images(folder: Path, sizes: list[tuple[int, int]], fmt: str = "png", start_seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"im_{i:03d}.{fmt}"
        noise_image(w, h, start_seed + i).save(p)
        out.append(p)
    return out


@pytest.fixture
def image_dir(tmp_path) -> Path:
    d = tmp_path / "images"
    write_images(d, [(64, 48), (48, 64), (96, 32), (40, 40), (80, 60), (32, 96), (64, 64), (50, 70)])
    (d / "nested").mkdir()
    write_images(d / "nested", [(70, 50), (60, 60)], fmt="jpg", start_seed=100)
    return d
