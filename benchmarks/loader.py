"""Decode throughput of the extraction loader (issue 31.3): N workers against N times one worker's rate (the same
loader with one worker), with decode tasks (each batch split over the workers, joined in the main process: what
a CUDA run now does, but joined there on the device) and with one whole model batch per task (0.6.1, and a CPU run
now), on the same images in one run, the files read once first (the page cache holds them).

    PYTHONPATH=. python benchmarks/loader.py --model random:vits16 --area 512 --count 160 --workers 2 \
        --json benchmarks/results-loader-cpu.json

The batches are the plan's, at the CPU's default token budget and at the GPU's (131,072: ViT-S/16 at 512 in batches
of up to 127); `img_s` counts from the first batch on (after warm-up: workers start and import), `all_img_s` from
the start. Target (issue 31): with 2 workers at ViT-S/16 512 defaults, >= 0.85x of 2x one worker's rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def loader_rate(jobs: list[Any], recipe: Any, workers: int, tasks: bool) -> dict[str, float]:
    """Images/s through the loader after its first batch arrived, and seconds to that first batch."""
    import torch

    from dinofeat.extraction import loader

    t0 = time.perf_counter()
    it = loader.batches(loader.make_loader(jobs, recipe, workers, pin_memory=False, split=tasks), torch.device("cpu"))
    first = next(it)
    t1 = time.perf_counter()
    n = sum(len(b.job.paths) for b in it)
    t2 = time.perf_counter()
    return {
        "first_batch_s": t1 - t0,
        "img_s": n / (t2 - t1) if n else 0.0,
        "all_img_s": (n + len(first.job.paths)) / (t2 - t0),
        "first_batch_images": len(first.job.paths),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:vits16")
    ap.add_argument("--area", type=int, default=512)
    ap.add_argument("--count", type=int, default=160)
    ap.add_argument("--megapixels", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from report import emit

    from dinofeat.extraction.config import ExtractConfig
    from dinofeat.extraction.loop import DEFAULT_TOKEN_BUDGET, _batch_jobs
    from dinofeat.extraction.prepare import build_plan, prepare
    from dinofeat.images.synthetic import make_images
    from dinofeat.sources.discover import discover

    images = a.images
    if images is None:
        images = Path(tempfile.mkdtemp(prefix="dinofeat-loader-")) / "images"
        make_images(images, a.count, a.megapixels, progress=False)
    res: dict[str, Any] = {"model": a.model, "area": a.area, "images": a.count, "workers": a.workers}
    for device, budget in DEFAULT_TOKEN_BUDGET.items():
        prep = prepare(ExtractConfig(model=a.model, area=a.area, device="cpu", token_budget=budget, progress=False))
        src = discover(images)
        plan = build_plan(src, prep, progress=False)
        mine = {b.name: set(range(b.num_shards)) for b in plan.buckets}
        jobs = _batch_jobs(plan, src, prep, mine)
        for path in (p for j in jobs for p in j.paths if p is not None):
            Path(path).read_bytes()  # every run reads from the page cache
        row: dict[str, Any] = {"batch_images": max(len(j.paths) for j in jobs)}
        for name, tasks in (("tasks", True), ("whole_batches", False)):
            one = loader_rate(jobs, prep.config.recipe, 1, tasks)
            r = loader_rate(jobs, prep.config.recipe, a.workers, tasks)
            row[name] = {
                **r,
                "one_worker": one,
                "of_workers_x_one": r["img_s"] / (a.workers * one["img_s"]),
                "all_of_workers_x_one": r["all_img_s"] / (a.workers * one["all_img_s"]),
            }
        res[f"{device}_budget"] = row
    emit(res, a.json)


if __name__ == "__main__":
    main()
