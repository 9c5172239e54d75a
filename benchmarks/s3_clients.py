"""Which S3 client dinofeat's remote caches use: obstore vs fsspec/s3fs on what a cache does.

Against a local S3-compatible server (moto, 127.0.0.1), per client:
- `put`: whole-shard PUTs (what the writer does), MB/s;
- `row`: one ranged GET of a row (what the reader does per patch grid), ms per row, single thread;
- `row_threads`: the same from 8 threads (a DataLoader worker's pool), rows/s;
- `meta`: small-object GET (zarr.json, markers), ms;
- `fork_safe`: after the parent used the client, a forked child (what a DataLoader worker is on Linux) makes a new
  client and GETs one object; False if that does not return within 20 s.
moto's Python server costs ~1 ms per request itself, so differences below that are the clients'. Run:
  pip install s3fs obstore  # obstore only for this comparison
  PYTHONPATH=. python3 benchmarks/s3_clients.py --json benchmarks/results-s3-clients-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from report import emit

from tests.s3server import S3Server


def _rate(fn: Any, n: int) -> float:
    fn(0)  # connection set-up is not what we measure
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n


def _figures(shard_bytes: int, put: float, get: float, threads: float, meta: float) -> dict[str, float]:
    return {
        "put_MBps": shard_bytes / put / 1e6,
        "row_ms": get * 1e3,
        "row_threads_per_s": threads,
        "meta_ms": meta * 1e3,
    }


def fork_safe(get: Any) -> bool:
    """Whether a forked child's fresh client can GET an object after the parent used the library."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(len(get())))
    p.start()
    try:
        return q.get(timeout=20) > 0
    except queue.Empty:
        return False
    finally:
        p.kill()
        p.join()


def run_obstore(shard: bytes, row: int, n: int) -> dict[str, Any]:
    import obstore
    from obstore.store import S3Store

    st = S3Store("bench")
    put = _rate(lambda i: obstore.put(st, f"o/shard{i}", shard), 8)
    rows = len(shard) // row
    get = _rate(lambda i: obstore.get_range(st, "o/shard0", start=(i % rows) * row, length=row), n)
    with ThreadPoolExecutor(8) as ex:
        t = time.perf_counter()
        list(ex.map(lambda i: obstore.get_range(st, "o/shard0", start=(i % rows) * row, length=row), range(n)))
        threads = n / (time.perf_counter() - t)
    obstore.put(st, "o/meta.json", b"{}" * 200)
    meta = _rate(lambda i: obstore.get(st, "o/meta.json").bytes(), n)
    safe = fork_safe(lambda: obstore.get(S3Store("bench"), "o/meta.json").bytes())
    return {**_figures(len(shard), put, get, threads, meta), "fork_safe": safe}


def run_s3fs(shard: bytes, row: int, n: int) -> dict[str, Any]:
    import s3fs

    fs = s3fs.S3FileSystem()
    put = _rate(lambda i: fs.pipe_file(f"bench/f/shard{i}", shard), 8)
    rows = len(shard) // row
    get = _rate(lambda i: fs.cat_file("bench/f/shard0", start=(i % rows) * row, end=(i % rows + 1) * row), n)
    with ThreadPoolExecutor(8) as ex:
        t = time.perf_counter()
        list(
            ex.map(
                lambda i: fs.cat_file("bench/f/shard0", start=(i % rows) * row, end=(i % rows) * row + row), range(n)
            )
        )
        threads = n / (time.perf_counter() - t)
    fs.pipe_file("bench/f/meta.json", b"{}" * 200)
    meta = _rate(lambda i: fs.cat_file("bench/f/meta.json"), n)
    safe = fork_safe(lambda: s3fs.S3FileSystem(skip_instance_cache=True).cat_file("bench/f/meta.json"))
    return {**_figures(len(shard), put, get, threads, meta), "fork_safe": safe}


def _one(client: str, kb: int, rows: int, n: int, timeout: float, env: dict[str, str]) -> Any:
    """One client at one row size, in its own process: a client that hangs is reported, not waited for."""
    cmd = [sys.executable, __file__, "--one", client, "--row-kb", str(kb), "--rows", str(rows), "-n", str(n)]
    try:
        got = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout:.0f} s (hung)"
    if got.returncode != 0:
        return "failed: " + (got.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(got.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64, help="rows per shard")
    ap.add_argument(
        "--row-kb",
        type=int,
        nargs="+",
        default=[576, 2],
        help="KB per row: 576 = vitl16 fp16 patches of a 768x768 bucket, 2 = its CLS",
    )
    ap.add_argument("-n", type=int, default=300, help="requests per figure")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per client and row size")
    ap.add_argument("--one", choices=["obstore", "s3fs"], help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.one:
        row = args.row_kb[0] * 1024
        shard = np.random.default_rng(0).integers(0, 255, args.rows * row, dtype=np.uint8).tobytes()
        print(json.dumps((run_obstore if args.one == "obstore" else run_s3fs)(shard, row, args.n)))
        return
    out: dict[str, Any] = {"rows_per_shard": args.rows, "server": "moto (python), 127.0.0.1", "n": args.n}
    with S3Server() as s3:
        s3.bucket("bench")
        for kb in args.row_kb:
            out[f"row_{kb}KB"] = {c: _one(c, kb, args.rows, args.n, args.timeout, s3.env) for c in ("obstore", "s3fs")}
    emit(out, args.json)


if __name__ == "__main__":
    main()
