"""The reader at scale (issue 29, item 4): a FeatureCache over N images, its open time and memory per image, and
whether forked DataLoader workers reading it at random grow with it.

    PYTHONPATH=. python benchmarks/scale_reader.py --cache /tmp/scale-100k/cache --label after \
        --json benchmarks/results-scale-reader-cpu-after.json                # 10^5 images (the default)
    PYTHONPATH=. python benchmarks/scale_reader.py --count 1000000 --cache /tmp/scale-1m/cache   # 10^6 images

The cache is real, made fast: `dinofeat.extract` with the stub encoder (dinofeat/extraction/stub.py, loaded by
path as benchmarks/pipeline.py does: the real model's output shapes, no compute; its features are noise) at area 16
(one 16x16 patch per image: 1.5 KB of fp16 features, 10^6 images in 1.5 GB), over tar shards of 10,000 members
holding a few tiny JPEGs' bytes each. Shards of 1 MB (`shard_mb=1`: about 690 rows each) keep a shard's row count
near a real cache's (a 2 MB ViT-L/16 row at area 512 in 128 MB shards: 64), since each reading process keeps the
index of its open shards (16 bytes per row slot and array).
`--cache DIR` keeps it (and reuses it when it already holds N images), so one cache measures the reader of two
trees: `PYTHONPATH=/path/to/old/tree python benchmarks/scale_reader.py --cache DIR` (this script, run by path).

Each measurement runs in a fresh process (`python -P -c` below: the tree is PYTHONPATH's, not the current
folder's) that first opens and reads a 1,000-image cache made the same way, so imports and codecs are paid before
its baseline and what grows after it is per image. Memory is read from /proc/<pid>/smaps_rollup: RSS, PSS (shared
pages divided among the processes sharing them) and USS (private pages: Private_Clean + Private_Dirty), after
gc.collect and malloc_trim in the measured process (never in a forked worker: both write to the pages they walk).
- `one`: the memory before opening, after opening (`open_s`; `peak_rss_bytes_per_image_opening`: how far the open
  raised the peak RSS, VmHWM, per image), after a lookup by key of every key (`lookup_s`),
  and after an epoch of random access (every position once in a random order: `key(i)`, `index_of(key)`, the
  features); `*_per_image` are the growth over the memory before opening, in bytes per image.
- `held_bytes_per_image`: what the reader's own allocations hold after opening and a lookup of every key, traced
  by tracemalloc (numpy's buffers included) in a third process: the RSS figures also count what the allocator
  keeps of the memory the open used for a moment (the index read whole, decoded).
- `workers`: the same open and lookups, then 4 DataLoader workers (fork), each reading a full epoch of random
  access; measured when all four are done and idle. `total_pss_mb` and `total_rss_mb` sum the parent and the
  workers; `over_one` divides the total PSS by the PSS of `one` after its epoch (target: < 1.5), and
  `worker_uss_per_image` is a worker's private memory (pages it copied on write, its own shard indexes, and the
  fixed ~12 MB of any forked torch process) over the images: run two counts to separate the fixed part.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARD = 10_000
WARMUP = 1000  # images of the small cache each process opens and reads before its baseline

# run in a fresh process: FIGURES is the JSON printed on its last line
MEASURE = r"""
import gc, json, os, random, sys, time
import numpy as np

def smaps(pid="self"):
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1].isdigit():
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    uss = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return {"rss": out.get("Rss", 0), "pss": out.get("Pss", 0), "uss": uss}

import ctypes
_libc = ctypes.CDLL("libc.so.6")

def now():
    gc.collect()
    _libc.malloc_trim(0)  # freed heap back to the system: what is left is what the process holds
    with open("/proc/self/status") as f:  # VmHWM: the peak RSS so far
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {**smaps(), "peak_rss": hwm}

mode, cache, warmup, workers, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
import torch  # imported before the baseline: what every training process has anyway
from torch.utils.data import DataLoader, Dataset
import dinofeat
from dinofeat.read.reader import FeatureCache

small = FeatureCache(warmup)  # the fixed costs (modules, codecs) paid before the baseline: the rest is per image
for i in range(len(small)):
    small[small.key(i)]
small.close()
del small
figures = {"before_open": now()}
if mode == "traced":
    import tracemalloc
    tracemalloc.start()
t = time.perf_counter()
fc = FeatureCache(cache)
figures["open_s"] = time.perf_counter() - t
figures["after_open"] = now()
n = len(fc)
t = time.perf_counter()
for i in range(n):
    assert fc.index_of(fc.key(i)) == i
figures["lookup_s"] = time.perf_counter() - t
figures["after_lookups"] = now()
if mode == "traced":  # what the reader's own allocations (Python and numpy) hold, apart from the allocator's
    figures["traced_after_lookups"] = tracemalloc.get_traced_memory()[0]
    print(json.dumps({"images": n, **figures}))
    sys.exit(0)

def epoch(fc, seed):
    order = np.random.default_rng(seed).permutation(len(fc))
    total = 0.0
    for i in order:
        f = fc[fc.key(int(i))]  # by key: the lookup a training script joining its own data by key makes
        total += float(f.cls[0])
    return total

class Epochs(Dataset):
    def __len__(self):
        return workers

    def __getitem__(self, w):
        t = time.perf_counter()
        epoch(fc, seed + w)
        # no gc.collect or malloc_trim here: in a forked worker they write to the pages they walk (copy-on-write)
        return {"pid": os.getpid(), "epoch_s": time.perf_counter() - t}

if mode == "one":
    t = time.perf_counter()
    epoch(fc, seed)
    figures["epoch_s"] = time.perf_counter() - t
    figures["after_epoch"] = now()
else:
    loader = DataLoader(Epochs(), batch_size=None, num_workers=workers, multiprocessing_context="fork")
    it = iter(loader)
    got = [next(it) for _ in range(workers)]  # every worker done and idle, still alive
    procs = [now()] + [smaps(g["pid"]) for g in got]
    figures["epoch_s"] = [g["epoch_s"] for g in got]
    figures["parent"], figures["workers"] = procs[0], procs[1:]
    del it
print(json.dumps({"images": n, "dinofeat": os.path.dirname(dinofeat.__file__), **figures}))
"""


def make_cache(cache: Path, count: int, workers: int) -> float:
    """A sealed cache of `count` images, made with the stub encoder; returns the seconds it took."""
    import importlib.util

    from dinofeat.extraction import loop
    from dinofeat.extraction.run import extract

    shards = cache.parent / f"{cache.name}-shards"
    _write_shards(shards, count)
    spec = importlib.util.spec_from_file_location("dinofeat_stub", HERE.parent / "dinofeat" / "extraction" / "stub.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    real, loop.Encoder = loop.Encoder, mod.StubEncoder
    n = (count + SHARD - 1) // SHARD
    source = str(shards / f"{{000000..{n - 1:06d}}}.tar")
    try:
        t = time.perf_counter()
        common = {"num_workers": workers, "progress": False, "overwrite": True}
        s = extract(source, cache, model="random:vits16", area=16, shard_mb=1, **common)
        took = time.perf_counter() - t
    finally:
        loop.Encoder = real
    if s.done != count:
        raise SystemExit(f"the cache holds {s.done} images, not {count}")
    return took


def _write_shards(folder: Path, count: int) -> None:
    """Tar shards of SHARD members: three tiny JPEGs (two sizes; one bucket at area 16) repeated under distinct keys."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    jpegs = []
    for k, size in enumerate([(32, 24), (24, 32), (32, 24)]):
        buf = io.BytesIO()
        Image.new("RGB", size, (40 * k, 90, 200 - 40 * k)).save(buf, "JPEG", quality=80)
        jpegs.append(buf.getvalue())
    for s in range(0, count, SHARD):
        with tarfile.open(folder / f"{s // SHARD:06d}.tar", "w") as tar:
            for i in range(s, min(s + SHARD, count)):
                data = jpegs[i % len(jpegs)]
                info = tarfile.TarInfo(f"{i // 1000:04d}/img_{i:09d}.jpg")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def _held(cache: Path) -> int:
    try:
        from dinofeat.read.reader import FeatureCache

        return len(FeatureCache(cache))
    except Exception:  # not there yet, or damaged: made again
        return -1


def measure(mode: str, cache: Path, warmup: Path, workers: int, seed: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-P", "-c", MEASURE, mode, str(cache), str(warmup), str(workers), str(seed)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(one: dict[str, Any], many: dict[str, Any]) -> dict[str, Any]:
    n = one["images"]
    base = one["before_open"]

    def per_image(at: str) -> dict[str, float]:
        return {k: (one[at][k] - base[k]) / n for k in ("rss", "uss", "pss")}

    procs = [many["parent"], *many["workers"]]
    total_pss = sum(p["pss"] for p in procs)
    out = {
        "open_s": one["open_s"],
        "lookup_us_per_key": 1e6 * one["lookup_s"] / n,
        "epoch_us_per_image": 1e6 * one["epoch_s"] / n,
        "bytes_per_image_after_open": per_image("after_open"),
        "bytes_per_image_after_lookups": per_image("after_lookups"),
        "bytes_per_image_after_epoch": per_image("after_epoch"),
        "peak_rss_bytes_per_image_opening": (one["after_open"]["peak_rss"] - base["peak_rss"]) / n,
        "one_after_epoch_mb": {k: v / 1e6 for k, v in one["after_epoch"].items()},
        "workers": len(many["workers"]),
        "total_pss_mb": total_pss / 1e6,
        "total_rss_mb": sum(p["rss"] for p in procs) / 1e6,
        "worker_uss_mb": [p["uss"] / 1e6 for p in many["workers"]],
        "worker_uss_per_image": sum(p["uss"] for p in many["workers"]) / len(many["workers"]) / n,
        "over_one": total_pss / one["after_epoch"]["pss"],
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--cache", type=Path, default=None, help="where the cache is made (kept; default: a temp folder)")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    ap.add_argument("--extract-workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="what is measured (e.g. 'before', 'after'), stored in the JSON")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from report import emit

    cache = a.cache or Path(tempfile.mkdtemp(prefix="dinofeat-scale-reader-")) / "cache"
    res: dict[str, Any] = {"label": a.label, "images": a.count}
    warmup = cache.parent / f"{cache.name}-warmup"
    if _held(cache) != a.count:
        res["make_cache_s"] = make_cache(cache, a.count, a.extract_workers)
    if _held(warmup) != WARMUP:
        make_cache(warmup, WARMUP, a.extract_workers)
    one = measure("one", cache, warmup, a.workers, a.seed)
    many = measure("workers", cache, warmup, a.workers, a.seed)
    traced = measure("traced", cache, warmup, a.workers, a.seed)
    res |= summary(one, many) | {"held_bytes_per_image": traced["traced_after_lookups"] / a.count}
    res["raw"] = {"one": one, "workers": many}
    emit(res, a.json)


if __name__ == "__main__":
    main()
