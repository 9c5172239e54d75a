"""Synthetic photo-like test images (see dinofeat.synthetic).

python benchmarks/make_images.py OUT_DIR --count 64 --megapixels 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dinofeat.synthetic import make_images

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--megapixels", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(f"wrote {len(make_images(a.out, a.count, a.megapixels, a.seed))} images to {a.out}")
