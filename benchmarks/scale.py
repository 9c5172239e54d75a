"""Planning at scale (issue 29, items 1, 2 and 5): listing, probing and planning 10^5-10^6 images, the time per
image, the memory kept and the peak, and planning in steps.

    PYTHONPATH=. python benchmarks/scale.py --count 100000 --label after --json results.json
    PYTHONPATH=. python benchmarks/scale.py --count 1000000 --data /tmp/scale-1m --json ...   # 10^6 (kept in --data)

Sources: tar shards of 10,000 members (three tiny JPEGs' bytes repeated under distinct keys, in folders of 1,000:
`0012/img_000012345.jpg`, the shape of an img2dataset shard) and, with `--folder`, the same images as files in a
folder. `--data DIR` keeps them (made once). The old tree is measured by running this script with its PYTHONPATH:
`PYTHONPATH=/path/to/old/tree python benchmarks/scale.py ...` (run by path, the tree is PYTHONPATH's).

Each measurement runs in a fresh process (`python -P -c` below) that imports dinofeat and prepares the run's
settings (a `random:vits16` model at area 16: one bucket, only the config is read) and plans a 1,000-image source
first, so imports are paid before its baseline. Then, one after the other, with the figures after gc.collect and
malloc_trim (what the process holds, not what its allocator keeps):
- `list`: `discover(source)`: seconds, and bytes per image held after it (RSS growth);
- `plan`: the probe of every image and the plan (`prepare.build_plan`, what `precompute` does on the planning rank,
  with the default probe threads): seconds, images per second, bytes per image held by the source and the plan
  together (`retained_per_image`), and the peak RSS growth over the baseline per image (`peak_per_image`, VmHWM);
- `steps`: planning in two steps, the first half of the shards then all of them: the second step lists the whole
  source again, finds the images the first did not plan (as `cache/lifecycle.extend` does) and plans only those
  (`step2_s`, against `step1_s` for the same number of images).
- `index_bytes_per_image`: the plan's columns as the cache's index stores them (`cache/index.py`, zarr with its
  default compression) over the images, written to a temp folder.
- `rank_reads` (with `--cache DIR`, a sealed cache such as benchmarks/scale_reader.py makes): what a rank holds
  after reading the plan from the index, whole (`world` 1: rank 0, or every rank before issue 29.3) and as rank 1
  of 8 (`Index.plan(share=...)`): images held, seconds, bytes per image of the cache held and at the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARD = 10_000

# what each measuring process starts with: the memory figures after gc and malloc_trim (what it holds)
MEM = r"""
import ctypes, gc, json, os, sys, tempfile, time

_libc = ctypes.CDLL("libc.so.6")

def mem():
    gc.collect()
    _libc.malloc_trim(0)
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out
"""

MEASURE = (
    MEM
    + r"""
source, warm, steps_source, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.prepare import build_plan, prepare
from dinofeat.sources.discover import discover

prep = prepare(ExtractConfig(model="random:vits16", area=16, device="cpu", dtype="fp32", progress=False))
build_plan(discover(warm), prep, False)  # imports, codecs, thread pools: paid before the baseline
base = mem()
out = {"images": n}
t = time.perf_counter()
src = discover(source)
out["list_s"] = time.perf_counter() - t
after_list = mem()
out["list_held_per_image"] = (after_list["VmRSS"] - base["VmRSS"]) / n
t = time.perf_counter()
plan = build_plan(src, prep, False)
out["plan_s"] = time.perf_counter() - t
after_plan = mem()
assert len(plan) == n, (len(plan), n)
out["plan_images_per_s"] = n / out["plan_s"]
out["list_images_per_s"] = n / out["list_s"]
out["list_and_plan_images_per_s"] = n / (out["list_s"] + out["plan_s"])
out["retained_per_image"] = (after_plan["VmRSS"] - base["VmRSS"]) / n
out["peak_per_image"] = (after_plan["VmHWM"] - base["VmRSS"]) / n

from dinofeat.cache.index import write_index
import zarr
with tempfile.TemporaryDirectory() as d:
    write_index(zarr.open_group(d, mode="w"), "index", plan)
    out["index_bytes_per_image"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs) / n
del plan, src

if steps_source:  # planning in steps: half the shards, then all of them (only the new half is planned)
    from dinofeat.cache.layout import extend_plan
    t = time.perf_counter()
    first = build_plan(discover(steps_source), prep, False)
    out["step1_s"] = time.perf_counter() - t
    t = time.perf_counter()
    whole = discover(source)
    if hasattr(first.keys, "positions"):  # what cache/lifecycle.extend does: the keys matched as columns
        import numpy as np
        new = whole.keys.take(np.flatnonzero(first.keys.positions(whole.keys) < 0))
    else:  # dinofeat <= 0.7.0: a set of the planned keys
        have = set(first.keys)
        new = tuple(k for k in whole.keys if k not in have)
    added = build_plan(whole.subset(new), prep, False, part=1)
    both = extend_plan(first, added)
    out["step2_s"] = time.perf_counter() - t
    out["step2_new_images"] = len(new)
    assert len(both) == n
print(json.dumps(out))
"""
)


SHARE = (
    MEM
    + r"""
cache, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from dinofeat.cache.store import Store
st = Store(cache)
st.index.bucket_plans()
base = mem()
t = time.perf_counter()
try:
    plan = st.index.plan(share=(rank, world)) if world > 1 else st.index.plan()
except TypeError:  # dinofeat <= 0.7.0: every rank read the whole plan
    plan = st.index.plan()
took = time.perf_counter() - t
after = mem()
n = int(st.meta["num_images"])
held, peak = (after["VmRSS"] - base["VmRSS"]) / n, (after["VmHWM"] - base["VmRSS"]) / n
print(json.dumps({"world": world, "held": len(plan), "read_s": took, "held_per_image": held, "peak_per_image": peak}))
"""
)


def make_shards(folder: Path, count: int) -> list[Path]:
    """Tar shards of SHARD members (made once; kept in `folder`)."""
    sys.path.insert(0, str(HERE))
    from scale_reader import _write_shards

    n = (count + SHARD - 1) // SHARD
    if not (folder / f"{n - 1:06d}.tar").exists() or (folder / f"{n:06d}.tar").exists():
        if folder.exists():
            for p in folder.glob("*.tar"):
                p.unlink()
        _write_shards(folder, count)
    return sorted(folder.glob("*.tar"))


def make_folder(folder: Path, count: int) -> Path:
    """The same images as files, 1,000 to a folder (made once; kept)."""
    from scale_reader import _write_shards

    last = folder / f"{(count - 1) // 1000:04d}" / f"img_{count - 1:09d}.jpg"
    if last.exists() and not (folder / f"{count // 1000:04d}" / f"img_{count:09d}.jpg").exists():
        return folder
    import shutil
    import tarfile

    shutil.rmtree(folder, ignore_errors=True)
    tars = folder.parent / f"{folder.name}-tmp"
    _write_shards(tars, count)
    for t in sorted(tars.glob("*.tar")):
        with tarfile.open(t) as tar:
            tar.extractall(folder, filter="data")
    shutil.rmtree(tars)
    return folder


def measure(source: str, warm: str, steps: str, count: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-P", "-c", MEASURE, source, warm, steps, str(count)], capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_share(cache: Path, world: int) -> dict[str, Any]:
    """A rank's read of the plan from a cache's index (rank 1 of `world`; 1: the whole plan), in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-P", "-c", SHARE, str(cache), "1" if world > 1 else "0", str(world)],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--data", type=Path, default=None, help="where the sources are made (kept; default: a temp dir)")
    ap.add_argument("--no-steps", action="store_true", help="skip planning in two steps")
    ap.add_argument("--folder", action="store_true", help="a folder of files instead of tar shards (no steps)")
    ap.add_argument(
        "--cache", type=Path, default=None, help="also measure a rank's read of this cache's plan (item 3): whole, 1/8"
    )
    ap.add_argument("--label", default="")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from report import emit

    data = a.data or Path(tempfile.mkdtemp(prefix="dinofeat-scale-"))
    res: dict[str, Any] = {"label": a.label, "images": a.count, "cpus": os.cpu_count()}
    if a.folder:
        source, steps = str(make_folder(data / "folder", a.count)), ""
        warm = [make_folder(data / "warm-folder", 1000)]
        res["source"] = "folder"
    else:
        shards = make_shards(data / "tars", a.count)
        warm = make_shards(data / "warm", 1000)
        n = len(shards)
        source = str(data / "tars" / f"{{000000..{n - 1:06d}}}.tar")
        steps = "" if a.no_steps or n < 2 else str(data / "tars" / f"{{000000..{n // 2 - 1:06d}}}.tar")
        res |= {"source": "tar", "shards": n}
    res |= measure(source, str(warm[0]), steps, a.count)
    if a.cache is not None:
        res["rank_reads"] = [measure_share(a.cache, w) for w in (1, 8)]
    emit(res, a.json)


if __name__ == "__main__":
    main()
