"""Helpers shared by several test modules: tiny models from the real HF configs (saved with save_pretrained and
loaded by path, the same code path as a hub id), generated images, bad files, and the fast CPU run settings.

A module of its own, so that no test module imports another (and `tests` resolves under plain `pytest`)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FAST = {"num_workers": 0, "progress": False, "dtype": "fp32", "device": "cpu"}

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


def corner_image(w: int = 60, h: int = 40) -> np.ndarray:
    """Four flat corner blocks of distinct colours on grey, so orientation and cropping are visible."""
    d = np.full((h, w, 3), 128, np.uint8)
    bh, bw = h // 4, w // 4
    d[:bh, :bw] = (255, 0, 0)
    d[:bh, -bw:] = (0, 255, 0)
    d[-bh:, :bw] = (0, 0, 255)
    d[-bh:, -bw:] = (255, 255, 0)
    return d


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h (a decompression bomb's signature) with no real pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def png_chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def bad_files(folder: Path) -> dict[str, str]:
    """One of each kind of bad file -> the reason prefix it must be recorded with."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "_tmp_good.jpg"
    Image.fromarray(corner_image(64, 64)).save(good, quality=90)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    _png_header_only(folder / "bomb.png", 40000, 40000)
    return {
        "truncated.jpg": "corrupt or truncated",
        "zero.jpg": "empty file",
        "text.png": "not an image",
        "garbage.jpg": "",
        "bomb.png": "decompression bomb",
    }


# Real photographs with hard edges, from scikit-image's wheel (a test dependency; read as files, never imported):
# text, a printed page, a rocket on its gantry, a brick wall (a fence-like grid), a cameraman with a tripod, a
# motorcycle, a portrait, a cat, coffee, a galaxy field and a 1411^2 retina scan (sources up to 8x the buckets).
PHOTOS = (
    "text.png",
    "page.png",
    "rocket.jpg",
    "brick.png",
    "camera.png",
    "motorcycle_left.png",
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
)


def photo_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("the real-photo tests need scikit-image's bundled images: pip install -e '.[test]'")
    return Path(spec.origin).parent / "data"


def real_photos(folder: Path, names: tuple[str, ...] = PHOTOS, quality: int = 92) -> list[Path]:
    """The photos as RGB JPEGs in `folder` (rocket, hubble and retina are JPEGs already and are copied as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        src = photo_dir() / name
        dst = folder / f"{Path(name).stem}.jpg"
        if src.suffix == ".jpg":
            dst.write_bytes(src.read_bytes())
        else:
            Image.open(src).convert("RGB").save(dst, quality=quality)
        out.append(dst)
    return out
