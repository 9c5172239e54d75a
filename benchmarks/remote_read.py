"""Training-style reads of a cache on a local S3-compatible server vs the same cache on local disk.

One sealed cache (written through the store with random values, as benchmarks/read.py does) is read through a
torch DataLoader (random order, batches, `collate_features`) from:
- `local`: its directory;
- `s3`: the same objects uploaded to a moto server on 127.0.0.1 (`s3://bench/feats`): one ranged GET per row,
  a batch's rows fetched concurrently (`FeatureDataset.fetch_threads`);
- `s3_serial`: the same with `fetch_threads=0` (one GET after the other), to show what the concurrency buys;
- `s3_local_cache`: `FeatureCache(local_cache=DIR)`: the first pass fetches whole shards into DIR, later passes
  read DIR (reported: first pass and warm passes).
With 0 and 2 workers; samples/s and MB/s of features delivered. moto is a Python server (~1-20 ms per request
on this VM), far slower per request than S3 or MinIO: the figures show how each mode scales, not S3's speed.

    PYTHONPATH=. python3 benchmarks/remote_read.py --json benchmarks/results-remote-read-cpu.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from read import build_layouts, timed_pass
from report import emit

from dinofeat.cache import FeatureCache
from dinofeat.dataset import FeatureDataset
from tests.s3server import S3Server, apply_env


def upload(cache: Path, s3: S3Server, bucket: str, prefix: str) -> None:
    c = s3.client()
    for f in sorted(p for p in cache.rglob("*") if p.is_file()):
        c.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(cache).as_posix()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--grid", type=int, default=16, help="patch grid side (16 = 256x256 at patch 16)")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--model", default="random:vits16", help="whose metadata the cache carries (hidden must match)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dinofeat-remote-read-"))
    try:
        lay = build_layouts(root, a.images, a.grid, a.hidden, a.model, a.seed)
        row_bytes = lay["row_bytes"]
        order = np.random.default_rng(a.seed).permutation(a.images)
        batches = [order[i : i + a.batch].tolist() for i in range(0, a.images, a.batch)]
        out: dict[str, Any] = {
            "images": a.images,
            "bytes_per_image": row_bytes,
            "batch": a.batch,
            "server": "moto (python) on 127.0.0.1, its own process",
            "rows": [],
        }
        with S3Server() as s3:
            s3.bucket("bench")
            apply_env(s3.env)
            t0 = time.perf_counter()
            upload(lay["cache"], s3, "bench", "feats")
            out["upload_s"] = time.perf_counter() - t0
            url = "s3://bench/feats"
            for workers in a.workers:
                shards = root / f"shards-{workers}"
                modes = {
                    "local": lambda: FeatureDataset(lay["cache"]),
                    "s3": lambda: FeatureDataset(url),
                    "s3_serial": lambda: FeatureDataset(url, fetch_threads=0),
                    "s3_local_cache": lambda shards=shards: FeatureDataset(FeatureCache(url, local_cache=shards)),
                }
                for name, make in modes.items():
                    ds = make()
                    secs = []
                    for rep in range(a.repeats + 1):
                        t, n = timed_pass(ds, batches, workers)
                        assert n == a.images
                        if name == "s3_local_cache" and rep == 0:
                            out["rows"].append(_row(f"{name}_first_pass", workers, a.images, row_bytes, [t]))
                        elif rep > 0 or name != "local":  # local: the first pass only warms the page cache
                            secs.append(t)
                    label = f"{name}_warm" if name == "s3_local_cache" else name
                    out["rows"].append(_row(label, workers, a.images, row_bytes, secs))
                    print(out["rows"][-1], flush=True)
                shutil.rmtree(shards, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    emit(out, a.json)


def _row(mode: str, workers: int, images: int, row_bytes: int, secs: list[float]) -> dict[str, Any]:
    med = float(np.median(secs))
    return {"mode": mode, "workers": workers, "samples_s": images / med, "mb_s": images * row_bytes / med / 2**20}


if __name__ == "__main__":
    main()
