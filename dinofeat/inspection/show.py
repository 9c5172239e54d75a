"""`show`: the resized input beside a PCA (3 components -> RGB) of its patch grid, the standard DINO picture."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from dinofeat.errors import ConfigError
from dinofeat.images.recipe import Recipe
from dinofeat.paths import local_path
from dinofeat.read.reader import FeatureCache


def pca_rgb(grids: list[np.ndarray]) -> list[np.ndarray]:
    """One shared PCA over all grids' patches -> per grid [h, w, 3] uint8 (components scaled by 1st/99th pct)."""
    flat = np.concatenate([g.reshape(-1, g.shape[-1]).astype(np.float64) for g in grids])
    centred = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[:3].T
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    out, start = [], 0
    for g in grids:
        n = g.shape[0] * g.shape[1]
        out.append((rgb[start : start + n].reshape(g.shape[0], g.shape[1], 3) * 255).astype(np.uint8))
        start += n
    return out


def _panel(fc: FeatureCache, key: str, pca: np.ndarray, images: Path | None) -> Image.Image:
    from dinofeat.images.preprocess import load_resized

    w, h = fc[key].bucket
    feat = Image.fromarray(pca).resize((w, h), Image.Resampling.NEAREST)
    src = images / key if images else None
    panel = Image.new("RGB", (2 * w + 8, h), (255, 255, 255))
    if src is not None and src.exists():
        panel.paste(Image.fromarray(load_resized(str(src), (w, h), Recipe.from_dict(fc.meta["recipe"]))), (0, 0))
    panel.paste(feat, (w + 8, 0))
    return panel


def show(
    cache: str | os.PathLike[str],
    keys: list[str],
    out: str | os.PathLike[str],
    grid: bool = False,
    images: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write one PNG per key (each with its own PCA), or with grid=True one tiled PNG with a shared PCA."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the PNGs (it is created)")
    fc = FeatureCache(cache)
    folder = local_path(images, "image folder") if images else Path(fc.meta["source_root"])
    absent = [k for k in keys if k not in fc]
    if absent:
        why = fc.failures.get(absent[0])
        raise ConfigError(
            f"{absent[0]} failed during precompute: {why}" if why else f"{absent[0]} is not in the cache {cache}"
        )
    out.mkdir(parents=True, exist_ok=True)
    feats = [fc[k].patches for k in keys]
    written = []
    if grid:
        panels = [_panel(fc, k, p, folder) for k, p in zip(keys, pca_rgb(feats), strict=True)]
        width = max(p.width for p in panels)
        sheet = Image.new("RGB", (width, sum(p.height + 8 for p in panels)), (255, 255, 255))
        y = 0
        for p in panels:
            sheet.paste(p, (0, y))
            y += p.height + 8
        path = out / "grid.png"
        sheet.save(path)
        return [path]
    for k, f in zip(keys, feats, strict=True):
        path = out / (k.replace("/", "__").rsplit(".", 1)[0] + ".png")
        _panel(fc, k, pca_rgb([f])[0], folder).save(path)
        written.append(path)
    return written
