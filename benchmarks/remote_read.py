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

`--fetch` measures instead what one whole-shard fetch into the local shard cache costs (issue 22): one object of
`--shard-mb` random bytes on the same kind of server, fetched through `ShardCache.open` `--repeats` times per
variant, each time in a fresh process (peak RSS is per process: VmHWM, reset before the fetch, minus VmRSS before
it), variants interleaved; seconds and peak RSS growth, medians:
- `cat_file`: the path before issue 22 (kept here only): `RemoteFiles.read` (fsspec `cat_file`, the object whole in
  memory), then written to the temp file;
- `get_file`: fsspec `get_file` with s3fs's defaults (objects over 50 MiB as concurrent 50 MiB parts in memory);
- `chunked`: 8 MiB ranged reads into one reused buffer (`fs.open(..., cache_type="none")`);
- `stream`: what the library does (`RemoteFiles.open` -> `RemoteFiles.download`: one GET streamed to the file).

    PYTHONPATH=. python3 benchmarks/remote_read.py --fetch --repeats 5 --json benchmarks/results-remote-fetch-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from report import emit

from tests.s3server import S3Server, apply_env

SHARD = "buckets/256x256/patches/c/0/0"  # where the --fetch object lives under the cache prefix
FETCHES = ("cat_file", "get_file", "chunked", "stream")


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
    ap.add_argument("--fetch", action="store_true", help="measure whole-shard fetches into the local shard cache")
    ap.add_argument("--shard-mb", type=int, default=128, help="--fetch: the shard's size in MiB")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "URL", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(fetch_once(*a.child)))
        return
    emit(fetch_bench(a) if a.fetch else read_passes(a), a.json)


def read_passes(a: argparse.Namespace) -> dict[str, Any]:
    """Training-style DataLoader passes over each mode (the module docstring's first list)."""
    from read import build_layouts, timed_pass

    from dinofeat.read.dataset import FeatureDataset
    from dinofeat.read.reader import FeatureCache

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
    return out


def fetch_bench(a: argparse.Namespace) -> dict[str, Any]:
    """Each variant `--repeats` times, interleaved, each fetch in a fresh process (`--child`)."""
    size = a.shard_mb * 2**20
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in FETCHES}
    root = Path(tempfile.mkdtemp(prefix="dinofeat-remote-fetch-"))
    try:
        with S3Server() as s3:
            s3.bucket("bench")
            apply_env(s3.env)  # the children inherit it
            s3.client().put_object(Bucket="bench", Key=f"feats/{SHARD}", Body=os.urandom(size))
            for rep in range(a.repeats):
                for variant in FETCHES:
                    folder = root / f"{variant}-{rep}"
                    cmd = [sys.executable, __file__, "--child", variant, "s3://bench/feats", str(folder)]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode:
                        raise RuntimeError(f"{variant}: {done.stderr[-3000:]}")
                    got = json.loads(done.stdout)
                    assert got["bytes"] == size, got
                    runs[variant].append(got)
                    print(variant, got, flush=True)
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "shard_bytes": size,
        "repeats": a.repeats,
        "server": "moto (python) on 127.0.0.1, its own process",
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores",
        "peak_rss": "VmHWM after the fetch (reset before it) minus VmRSS before it, MiB",
        "variants": {
            v: {
                "secs_median": float(np.median([r["secs"] for r in rs])),
                "peak_rss_mib_median": float(np.median([r["peak_rss_mib"] for r in rs])),
                "secs": [r["secs"] for r in rs],
                "peak_rss_mib": [r["peak_rss_mib"] for r in rs],
            }
            for v, rs in runs.items()
        },
    }


def fetch_once(variant: str, url: str, folder: str) -> dict[str, Any]:
    """One fetch of SHARD into a fresh shard cache under `folder`, in this (fresh) process."""
    from dinofeat.cache.objects import RemoteFiles
    from dinofeat.cache.shardcache import ShardCache

    files = RemoteFiles.from_url(url)
    cache = files.shard_cache = ShardCache(Path(folder), "bench")
    assert files.exists(SHARD)  # client, connection and botocore's service model loaded before measuring
    key = files._key(SHARD)
    blobs: list[Any] = []  # a LocalBlob closes its fd when collected

    def library() -> int:
        blobs.append(files.open(SHARD))  # the library's own path
        return os.dup(blobs[-1].fd)

    opens: dict[str, Callable[[], int]] = {
        "cat_file": lambda: cache.open(SHARD, lambda tmp: tmp.write_bytes(files.read(SHARD))),
        "get_file": lambda: cache.open(SHARD, lambda tmp: files.fs.get_file(key, str(tmp))),
        "chunked": lambda: cache.open(SHARD, lambda tmp: _chunked(files.fs, key, tmp, 8 * 2**20)),
        "stream": library,
    }
    reset = _reset_peak_rss()
    before = _vm_kib("VmRSS") if reset else _vm_kib("VmHWM")
    t0 = time.perf_counter()
    fd = opens[variant]()
    secs = time.perf_counter() - t0
    peak_mib = (_vm_kib("VmHWM") - before) / 1024
    size = os.fstat(fd).st_size
    os.close(fd)
    return {"secs": secs, "peak_rss_mib": peak_mib, "bytes": size, "peak_reset": reset}


def _chunked(fs: Any, key: str, dest: Path, chunk: int) -> None:
    """Ranged reads of `chunk` bytes into one reused buffer, each written out before the next."""
    buf = bytearray(chunk)
    with fs.open(key, "rb", block_size=chunk, cache_type="none") as f, open(dest, "wb") as out:
        while n := f.readinto(buf):
            out.write(memoryview(buf)[:n])


def _reset_peak_rss() -> bool:
    """VmHWM := VmRSS (Linux >= 4.0), so the peak measured is the fetch's, not the imports'."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_kib(field: str) -> int:
    """A /proc/self/status field (its "kB" are KiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _row(mode: str, workers: int, images: int, row_bytes: int, secs: list[float]) -> dict[str, Any]:
    med = float(np.median(secs))
    return {"mode": mode, "workers": workers, "samples_s": images / med, "mb_s": images * row_bytes / med / 2**20}


if __name__ == "__main__":
    main()
