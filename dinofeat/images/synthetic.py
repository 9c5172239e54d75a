"""Synthetic photo-like JPEGs (smooth gradients, shapes, mild noise) so `dinofeat bench` and the benchmarks run
without a dataset, with file sizes and decode costs like real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dinofeat.progress import bar as progress_bar

ASPECTS = [(4, 3), (3, 4), (16, 9), (9, 16), (1, 1), (3, 2), (2, 3), (21, 9), (1, 3)]


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    fx, fy = np.float32(rng.uniform(0.3, 1) / width / 2), np.float32(rng.uniform(0.3, 1) / height / 2)
    # float32 and broadcast ramps: a 12 MP image in well under a second (issue 10 makes 1,000 of them)
    t = np.arange(width, dtype=np.float32)[None, :] * fx + np.arange(height, dtype=np.float32)[:, None] * fy
    img = c0 + (c1 - c0) * t[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(6)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(min(width, height) // 20 + 1, min(width, height) // 4 + 2))
        d.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def make_images(
    out: Path,
    count: int,
    megapixels: float,
    seed: int = 0,
    progress: bool = False,
    aspects: list[tuple[int, int]] | None = None,
) -> list[Path]:
    """`count` JPEGs of about `megapixels`, cycling through `aspects` (default: common photo aspect ratios; one
    aspect gives one bucket shape, e.g. to time torch.compile without compiling nine shapes)."""
    out.mkdir(parents=True, exist_ok=True)
    cycle = aspects or ASPECTS
    paths = []
    for i in progress_bar(range(count), desc="synthetic photos", unit="img", enabled=progress):
        aw, ah = cycle[i % len(cycle)]
        scale = (megapixels * 1e6 / (aw * ah)) ** 0.5
        w, h = max(16, int(aw * scale)), max(16, int(ah * scale))
        p = out / f"img_{i:05d}.jpg"
        photo_like(w, h, seed + i).save(p, quality=90)
        paths.append(p)
    return paths
