"""The cost of each feature option (issue 14 part 5): end-to-end `extract` on the same images and model, one cache
per option, img/s (the extraction loop: decode, model, shard writes with statistics) and bytes per image on disk,
each against the default.

    python benchmarks/options.py --count 72 --model random:vits16 --area 256 --json benchmarks/results-options-cpu.json

Rows: the default; --flip; --layers 4,8,-1 (three of 12 blocks); --layers 4 (REPA-style: the model is cut after
block 4); --flip with --layers 6,-1; tied buckets (--dit-scale 1/2 with the DiT at twice --area, so DINO runs at
--area) against an untied cache at the DiT's size, which is what you would otherwise run to align the grids.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from report import emit  # benchmarks/report.py (run as `python benchmarks/<script>.py`)

from dinofeat.cache.store import Store
from dinofeat.extraction.run import extract
from dinofeat.images.synthetic import make_images
from dinofeat.read.reader import FeatureCache


def run(images: Path, work: Path, name: str, repeats: int, **options: Any) -> dict[str, Any]:
    """Median img/s of `repeats` fresh extractions (model load excluded: Summary.seconds is the extraction loop)."""
    rates, wall = [], []
    for r in range(repeats):
        cache = work / f"{name}-{r}"
        t0 = time.perf_counter()
        s = extract(images, cache, progress=False, **options)
        wall.append(time.perf_counter() - t0)
        rates.append(s.images_per_s)
        if r < repeats - 1:
            shutil.rmtree(cache)
    c = FeatureCache(cache)
    disk = Store(cache).files.total_bytes()
    return {
        "option": name,
        "img_s": sorted(rates)[len(rates) // 2],
        "wall_s": sorted(wall)[len(wall) // 2],
        "bytes_per_image": disk / len(c),
        "arrays": len(c.arrays.names()),
        "dino_tokens_per_image": sum(c.size(i)[0] * c.size(i)[1] for i in range(len(c))) / len(c) / c.patch_size**2,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=72)
    ap.add_argument("--megapixels", type=float, default=0.5)
    ap.add_argument("--model", default="random:vits16")
    ap.add_argument("--area", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dinofeat-options-"))
    images = work / "images"
    make_images(images, a.count, a.megapixels)
    base = {"model": a.model, "area": a.area, "device": a.device}
    rows = [
        run(images, work, "default", a.repeats, **base),
        run(images, work, "--flip", a.repeats, **base, flip=True),
        run(images, work, "--layers 4,8,-1", a.repeats, **base, layers="4,8,-1"),
        run(images, work, "--layers 4", a.repeats, **base, layers="4"),
        run(images, work, "--flip --layers 6,-1", a.repeats, **base, flip=True, layers="6,-1"),
        run(images, work, f"untied, area {2 * a.area}", a.repeats, **{**base, "area": 2 * a.area, "multiple": 32}),
        run(
            images,
            work,
            f"tied: DiT {2 * a.area}, --dit-scale 1/2",
            a.repeats,
            **{**base, "area": 2 * a.area},
            dit_scale="1/2",
        ),
    ]
    ref = {r["option"]: r for r in rows}
    for r in rows:
        against = ref[f"untied, area {2 * a.area}"] if r["option"].startswith("tied") else ref["default"]
        r["img_s_vs_ref"] = r["img_s"] / against["img_s"]
        r["bytes_vs_ref"] = r["bytes_per_image"] / against["bytes_per_image"]
        r["ref"] = against["option"]
    res = {
        "model": a.model,
        "area": a.area,
        "count": a.count,
        "megapixels": a.megapixels,
        "repeats": a.repeats,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    emit(res, a.json)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
