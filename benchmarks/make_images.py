"""Synthetic photo-like test images (see dinofeat.images.synthetic), optionally of several sizes and in parallel.

python benchmarks/make_images.py OUT_DIR --count 64 --megapixels 2
python benchmarks/make_images.py OUT_DIR --count 300 --megapixels 2 4 8 12 --jobs 16   # the GPU run's folder
python benchmarks/make_images.py OUT_DIR --count 64 --megapixels 2 --aspect 4:3          # one bucket shape
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dinofeat.images.synthetic import make_images


def _part(args: tuple[Path, int, float, int, list[tuple[int, int]] | None]) -> int:
    out, count, megapixels, seed, aspects = args
    return len(make_images(out, count, megapixels, seed, aspects=aspects))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--megapixels", type=float, nargs="+", default=[2.0], help="several: split evenly between them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--aspect", default=None, help="W:H for every image (one bucket shape); default: nine aspects")
    a = ap.parse_args()
    aspects = [tuple(int(x) for x in a.aspect.split(":"))] if a.aspect else None
    # one sub-folder per (size, job); seeds follow the image number, so the images are the same for any --jobs
    parts = []
    per_size = -(-a.count // len(a.megapixels))
    for s, mp in enumerate(a.megapixels):
        n = min(per_size, a.count - s * per_size)
        step = -(-n // a.jobs)
        for j in range(0, n, step):
            seed = a.seed + s * per_size + j
            parts.append((a.out / f"{mp:g}mp_{j:06d}", min(step, n - j), mp, seed, aspects))
    with ProcessPoolExecutor(max(1, a.jobs)) as pool:
        total = sum(pool.map(_part, parts))
    print(f"wrote {total} images to {a.out}")
