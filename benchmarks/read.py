"""Random-access read throughput of a dinofeat cache against two baselines holding the same bytes, in one run:

1. dinofeat: `FeatureDataset` over a sealed cache (fast shard reader) with `BucketBatchSampler` + `collate_features`,
   every row checked against its crc32c (the default), and `dinofeat_unverified` (`FeatureCache(verify=False)`),
   the same files read without the check, to show what the check costs;
2. npy: one `.npy` per image (cls row + patch grid, [1 + h*w, D]) read with `np.load`;
3. raw: one flat file holding every image's bytes back to back, read with one `os.pread` per image at its offset
   (the upper bound: no format at all).

Each is read through a torch DataLoader (0 and 2 workers) in the same random order, warm (page cache hot) and cold
(every file of that layout dropped from the page cache with posix_fadvise(DONTNEED) before the pass).

    python benchmarks/read.py --images 1024 --grid 24 --hidden 768 --json benchmarks/results-read-cpu.json

Targets (issues 4, 12): dinofeat (verified) >= 0.8x raw and >= 1x npy, warm and cold. Memory: the reader's RSS
after a full random pass must not grow with the cache's size beyond its index (reported as rss_growth_mb per pass).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dinofeat.cache import lifecycle
from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.plan import make_plan
from dinofeat.extraction.prepare import cache_metadata, prepare
from dinofeat.images.probe import Probe
from dinofeat.read.collate import collate_features
from dinofeat.read.dataset import FeatureDataset
from dinofeat.read.reader import FeatureCache
from dinofeat.sources.discover import Source


def fake_rows(rng: np.random.Generator, n: int, tokens: int, hidden: int) -> np.ndarray:
    """Finite fp16 values (bit patterns below 0x3C00 are in [0, 1)), [n, tokens, hidden]."""
    return rng.integers(0, 0x3C00, (n, tokens, hidden), dtype=np.uint16).view(np.float16)


def build_layouts(root: Path, n: int, grid: int, hidden: int, model: str, seed: int) -> dict[str, Any]:
    """A real sealed dinofeat cache (planned and written through the store, random values instead of a model),
    the same bytes as one .npy per image, and as one flat file."""
    patch = 16
    side = grid * patch
    cfg = ExtractConfig(model=model, area=side, min_ar=1.0, max_ar=1.0, num_buckets=1, progress=False)
    prep = prepare(cfg)
    if prep.model.hidden_size != hidden or prep.model.patch_size != patch:
        raise SystemExit(f"--model {model} has hidden {prep.model.hidden_size}, patch {prep.model.patch_size}")
    keys = [f"img_{i:06d}.jpg" for i in range(n)]
    probes = [Probe(k, side, side, 1, 1) for k in keys]
    plan = make_plan(keys, probes, prep.spec, patch, hidden, "fp16", int(cfg.shard_mb * 2**20))
    src = Source(root / "images", tuple(keys))
    cache = root / "cache"
    st = lifecycle.create(cache, cache_metadata(prep, plan, src), plan, hidden, 0, "fp16")
    (root / "npy").mkdir()
    rng = np.random.default_rng(seed)
    positions = plan.rows_to_keys()
    with open(root / "flat.bin", "wb") as flat:
        for b in plan.buckets:
            for u in range(b.num_shards):
                s0, s1 = b.shard_range(u)
                rows = fake_rows(rng, s1 - s0, 1 + grid * grid, hidden)
                arrays = {"cls": rows[:, 0], "patches": rows[:, 1:].reshape(-1, grid, grid, hidden)}
                st.shards.write(b.name, s0, arrays)
                st.markers.write(b.name, u, s0, s1, {}, st.shards.checksums(b.name, u))
                for r in range(s1 - s0):
                    np.save(root / "npy" / f"{keys[positions[b.name][s0 + r]]}.npy", rows[r])
                    flat.write(rows[r].tobytes())
    status, _, sealed = lifecycle.finalize(st, plan)
    assert sealed and (status == 1).all()
    row_bytes = (1 + grid * grid) * hidden * 2
    return {"cache": cache, "npy": root / "npy", "flat": root / "flat.bin", "keys": keys, "row_bytes": row_bytes}


class NpyDataset(Dataset):
    def __init__(self, folder: Path, keys: list[str], grid: int) -> None:
        self.folder, self.keys, self.grid = folder, keys, grid

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        a = np.load(self.folder / f"{self.keys[i]}.npy")
        t = torch.from_numpy(a)
        return {"key": self.keys[i], "bucket": None, "cls": t[0], "patches": t[1:].view(self.grid, self.grid, -1)}


class RawDataset(Dataset):
    """One pread per image into a fresh buffer; the file is opened lazily per worker process."""

    def __init__(self, path: Path, keys: list[str], grid: int, hidden: int, row_bytes: int) -> None:
        self.path, self.keys, self.grid, self.hidden, self.row_bytes = path, keys, grid, hidden, row_bytes
        self.fd: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "fd": None}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((1 + self.grid * self.grid, self.hidden), np.float16)
        os.preadv(self.fd, [memoryview(out).cast("B")], i * self.row_bytes)
        t = torch.from_numpy(out)
        return {"key": self.keys[i], "bucket": None, "cls": t[0], "patches": t[1:].view(self.grid, self.grid, -1)}


class FixedBatches(Sampler[list[int]]):
    """The same random batches for every layout (indices map to the same image in all three)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def drop_page_cache(paths: list[Path]) -> None:
    os.sync()  # DONTNEED drops only clean pages
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def rss_mb() -> float:
    """Resident set size after returning freed heap pages to the OS (otherwise malloc's arenas blur the figure)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed_pass(ds: Dataset, batches: list[list[int]], workers: int) -> tuple[float, int]:
    dl = DataLoader(ds, batch_sampler=FixedBatches(batches), num_workers=workers, collate_fn=collate_features)
    t0 = time.perf_counter()
    n = 0
    for batch in dl:
        n += batch["patches"].shape[0]
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--grid", type=int, default=24, help="patch grid side (24 = 384x384 at patch 16)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--model", default="random:vitb16", help="whose metadata the cache carries (hidden must match)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per cell; the median is reported")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the three layouts (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dinofeat-read-", dir=a.dir))
    try:
        t0 = time.perf_counter()
        lay = build_layouts(root, a.images, a.grid, a.hidden, a.model, a.seed)
        build_s = time.perf_counter() - t0
        keys, row_bytes = lay["keys"], lay["row_bytes"]
        rss0 = rss_mb()
        fc = FeatureCache(lay["cache"])
        ds_ours = FeatureDataset(fc)
        rss_index = rss_mb() - rss0
        # dataset position -> image key, so every layout reads the same image at the same step
        key_pos = {k: i for i, k in enumerate(keys)}
        ours_to_key = np.array([key_pos[k] for k in fc.keys()])  # noqa: SIM118 (FeatureCache is not a dict)
        rng = np.random.default_rng(a.seed)
        order = rng.permutation(len(keys))
        batches_ours = [order[i : i + a.batch].tolist() for i in range(0, len(order), a.batch)]
        batches_key = [ours_to_key[b].tolist() for b in batches_ours]
        layouts = {
            "dinofeat": (ds_ours, batches_ours, files_under(lay["cache"])),
            "dinofeat_unverified": (
                FeatureDataset(FeatureCache(lay["cache"], verify=False)),
                batches_ours,
                files_under(lay["cache"]),
            ),
            "npy": (NpyDataset(lay["npy"], keys, a.grid), batches_key, files_under(lay["npy"])),
            "raw": (RawDataset(lay["flat"], keys, a.grid, a.hidden, row_bytes), batches_key, [lay["flat"]]),
        }
        rows: list[dict[str, Any]] = []
        for workers in a.workers:
            for cache_state in ("warm", "cold"):
                # layouts interleaved inside each repeat, so drift on a shared machine hits all three alike
                secs: dict[str, list[float]] = {name: [] for name in layouts}
                rss_before = rss_mb()
                every_file = [f for _, _, files in layouts.values() for f in files]
                names = list(layouts)
                for rep in range(a.repeats + (cache_state == "warm")):
                    k = rep % len(names)
                    for name in names[k:] + names[:k]:  # rotate, so no layout always goes first
                        ds, batches, _ = layouts[name]
                        if cache_state == "cold":
                            drop_page_cache(every_file)  # all layouts, so each pass starts from the same state
                        t, n = timed_pass(ds, batches, workers)
                        assert n == a.images
                        if cache_state == "cold" or rep > 0:  # the first warm repeat only fills the page cache
                            secs[name].append(t)
                rss_growth = rss_mb() - rss_before
                for name, ts in secs.items():
                    med = float(np.median(ts))
                    rows.append(
                        {
                            "layout": name,
                            "workers": workers,
                            "page_cache": cache_state,
                            "samples_s": round(a.images / med, 1),
                            "samples_s_best": round(a.images / min(ts), 1),
                            "mb_s": round(a.images * row_bytes / med / 2**20, 1),
                            "passes": len(ts),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
                rows[-1]["rss_growth_mb_all_layouts"] = round(rss_growth, 1)
        ratios = {}
        for workers in a.workers:
            for cache_state in ("warm", "cold"):
                here = [r for r in rows if r["workers"] == workers and r["page_cache"] == cache_state]
                cell = {r["layout"]: r["samples_s"] for r in here}
                ratios[f"{workers}w_{cache_state}"] = {
                    "over_raw": round(cell["dinofeat"] / cell["raw"], 3),
                    "over_npy": round(cell["dinofeat"] / cell["npy"], 3),
                    "unverified_over_raw": round(cell["dinofeat_unverified"] / cell["raw"], 3),
                    "verified_over_unverified": round(cell["dinofeat"] / cell["dinofeat_unverified"], 3),
                }
        res = {
            "images": a.images,
            "grid": [a.grid, a.grid],
            "hidden": a.hidden,
            "bytes_per_image": row_bytes,
            "cache_gb": round(sum(f.stat().st_size for f in files_under(lay["cache"])) / 1e9, 3),
            "batch": a.batch,
            "build_s": round(build_s, 1),
            "reader_open_rss_mb": round(rss_index, 1),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "torch_threads": torch.get_num_threads(),
            "results": rows,
            "ratios": ratios,
        }
        print(json.dumps({k: v for k, v in res.items() if k != "results"}, indent=2))
        if a.json:
            a.json.write_text(json.dumps(res, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
