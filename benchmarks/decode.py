"""Decode + resize: the default (exact full decoding) against the JPEG draft speed option, for accuracy and speed.

    PYTHONPATH=. python benchmarks/decode.py --json benchmarks/results-decode-cpu.json

Accuracy: every real photograph of tests/helpers.PHOTOS as a JPEG, at several bucket areas, each recipe's uint8
output against the documented recipe computed independently in float64 (full decode, torch bilinear with
antialias): max, 99th percentile and mean |error| in grey levels, worst over images. Speed: synthetic photo-like
JPEGs of 1, 3 and 12 MP resized to the 512^2 and 1024^2 buckets, median ms per image over `--repeats` passes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinofeat.buckets import BucketSpec, assign
from dinofeat.images.decode import decode_rgb
from dinofeat.images.preprocess import load_resized
from dinofeat.images.recipe import Recipe
from dinofeat.images.synthetic import make_images

RECIPES = {"exact (default)": 0, "draft gap 1 (0.1 default)": 1, "draft gap 2": 2, "draft gap 4": 4}


def float_reference(u8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(u8)).permute(2, 0, 1)[None].double()
    y = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bilinear", antialias=True)
    return y[0].permute(1, 2, 0).numpy()


def accuracy(photos: list[Path], areas: tuple[int, ...]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, gap in RECIPES.items():
        worst = {"max": 0.0, "p99": 0.0, "mean": 0.0}
        for p in photos:
            full = np.asarray(decode_rgb(p))
            w, h = full.shape[1], full.shape[0]
            for area in areas:
                b = assign(BucketSpec(area, 16), w, h).bucket
                size = (b.width, b.height)
                err = np.abs(load_resized(str(p), size, Recipe(jpeg_draft=gap)) - float_reference(full, size))
                for k, v in (("max", err.max()), ("p99", np.percentile(err, 99)), ("mean", err.mean())):
                    worst[k] = max(worst[k], float(v))
        out[name] = {k: round(v, 2) for k, v in worst.items()}
    return out


def speed(tmp: Path, megapixels: tuple[float, ...], areas: tuple[int, ...], count: int, repeats: int) -> list[dict]:
    rows = []
    for mp in megapixels:
        files = make_images(tmp / f"{mp}mp", count, mp)
        for area in areas:
            buckets = [assign(BucketSpec(area, 16), *Image.open(f).size).bucket for f in files]
            sizes = [(b.width, b.height) for b in buckets]
            row: dict = {"megapixels": mp, "area": area}
            for name, gap in RECIPES.items():
                passes = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for f, s in zip(files, sizes, strict=True):
                        load_resized(str(f), s, Recipe(jpeg_draft=gap))
                    passes.append((time.perf_counter() - t0) / len(files) * 1e3)
                row[name] = round(statistics.median(passes), 1)
            rows.append(row)
            print(row, flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=6, help="synthetic JPEGs per size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from tests.helpers import real_photos

    with tempfile.TemporaryDirectory() as d:
        acc = accuracy(real_photos(Path(d) / "photos"), (128, 192, 256, 384, 512))
        print(json.dumps(acc, indent=1), flush=True)
        spd = speed(Path(d), (1.0, 3.0, 12.0), (512, 1024), a.count, a.repeats)
    result = {"accuracy_grey_levels": acc, "ms_per_image": spd}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
