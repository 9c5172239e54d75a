"""The pipeline's ceiling (issue 31): `dinofeat.extract` with a stub encoder (dinofeat/extraction/stub.py: the real
model's output shapes, no compute), once with real shard writes and once with every shard dropped at the writer, on
the same images, in one process. Their ratio is what the writer costs; on a GPU machine the stub's rate is what the
pipeline could feed the model.

    PYTHONPATH=. python benchmarks/pipeline.py --model random:vitl16 --area 1024 --count 90 --megapixels 1 \
        --workers 2 --json benchmarks/results-pipeline-cpu.json

It patches `dinofeat.extraction.loop.Encoder` (and, for the dropped run, `loop.ShardWriter`), loading the stub from
this checkout by path, so the same script measures an older tree (`PYTHONPATH=/path/to/old/tree`): the before and
after of a change in one run. Target (issue 31): with writes >= 0.6x dropped for ViT-L/16 at 1024 on a CPU VM, and
the writer's time per shard 4x lower than 0.6.1's: `writer_s_per_shard` (wall, the same methods timed in either
tree, summed over writer threads, so concurrent fsyncs each count) and `writer_cpu_s_per_shard` (the writer
threads' own CPU seconds in them: what the writer takes from the decode workers on a small machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _stub_class() -> type:
    spec = importlib.util.spec_from_file_location("dinofeat_stub", HERE.parent / "dinofeat" / "extraction" / "stub.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.StubEncoder


def _probe_writer() -> tuple[dict[str, float], Any]:
    """Seconds spent in each piece of per-shard writer work, measured the same way in any tree: the writer's own
    statistics, and the store's shard write, sync, statistics file, checksums and done marker, plus each shard's
    `build` (assembly, or waiting for its copies). Returns the totals and a function that undoes the wrapping."""
    import threading

    from dinofeat.cache.markers import Markers
    from dinofeat.cache.shards import Shards
    from dinofeat.cache.stats import ShardStats
    from dinofeat.extraction import writer

    totals: dict[str, float] = {"shards": 0.0}
    lock = threading.Lock()
    undo = []

    def wrap(owner: Any, name: str, label: str) -> None:
        real = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return real(*args, **kwargs)
            finally:
                with lock:
                    totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0
                    totals[f"{label}_cpu"] = totals.get(f"{label}_cpu", 0.0) + time.thread_time() - c0

        setattr(owner, name, timed)
        undo.append((owner, name, real))

    from dinofeat.cache import shards as shards_module

    encode = "shard_parts" if hasattr(shards_module, "shard_parts") else "encode_shard"  # now / 0.6.1
    wrap(shards_module, encode, "encode")  # inside `write`: the rest of `write` is the system calls
    for owner, name, label in [(writer.ShardWriter, "_stats", "stats"), (Shards, "write", "write"),
                               (Shards, "sync", "sync"), (ShardStats, "write", "marker"),
                               (Shards, "checksums", "marker"), (Markers, "write", "marker")]:  # fmt: skip
        wrap(owner, name, label)
    real_submit = writer.ShardWriter.submit

    def submit(self: Any, result: Any) -> None:
        build = result.build

        def timed_build() -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return build()
            finally:
                with lock:
                    totals["build"] = totals.get("build", 0.0) + time.perf_counter() - t0
                    totals["build_cpu"] = totals.get("build_cpu", 0.0) + time.thread_time() - c0
                    totals["shards"] += 1

        result.build = timed_build
        real_submit(self, result)

    writer.ShardWriter.submit = submit
    undo.append((writer.ShardWriter, "submit", real_submit))

    def restore() -> None:
        for owner, name, real in reversed(undo):
            setattr(owner, name, real)

    return totals, restore


def run(images: Path, cache: Path, opts: dict[str, Any], drop: bool) -> dict[str, Any]:
    """One extract with the stub encoder; `drop` discards every shard the writer is handed."""
    from dinofeat.extraction import loop
    from dinofeat.extraction.run import extract

    real_encoder, real_writer = loop.Encoder, loop.ShardWriter

    class Dropping(real_writer):  # type: ignore[misc, valid-type]
        def submit(self, result: Any) -> None:
            self._check()

    loop.Encoder = _stub_class()
    if drop:
        loop.ShardWriter = Dropping
    totals, restore = _probe_writer() if not drop else ({}, lambda: None)
    try:
        t0 = time.perf_counter()
        s = extract(images, cache, overwrite=True, **opts)
        wall = time.perf_counter() - t0
    finally:
        loop.Encoder, loop.ShardWriter = real_encoder, real_writer
        restore()
    out = {"img_s": s.images_per_s, "images": s.processed, "seconds": s.seconds, "wall_s": wall}
    shards = totals.pop("shards", 0)
    for suffix in ("", "_cpu"):
        if "encode" + suffix in totals:
            totals["write" + suffix] -= totals["encode" + suffix]  # the write system calls and fsync of the file
    if shards:
        wall = {k: v / shards for k, v in totals.items() if not k.endswith("_cpu")}
        cpu = {k[:-4]: v / shards for k, v in totals.items() if k.endswith("_cpu")}
        out["writer_s_per_shard"] = wall | {"total": sum(wall.values())}
        out["writer_cpu_s_per_shard"] = cpu | {"total": sum(cpu.values())}
        out["shards"] = int(shards)
    out["gb_written"] = s.bytes_written / 1e9
    if getattr(s, "timings", None):
        out["timings"] = s.timings
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:vitl16")
    ap.add_argument("--area", type=int, default=1024)
    ap.add_argument("--count", type=int, default=90)
    ap.add_argument("--megapixels", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp16", help="the stub's compute dtype (the CPU has no fp16 model to run)")
    ap.add_argument("--token-budget", type=int, default=131072, help="the GPU's default: ViT-L batches of 15")
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="where the caches go (default: a temporary folder)")
    ap.add_argument("--only", choices=("writes", "dropped"), default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from report import emit

    from dinofeat.images.synthetic import make_images

    tmp = Path(tempfile.mkdtemp(prefix="dinofeat-pipeline-"))
    images = a.images
    if images is None:
        images = tmp / "images"
        make_images(images, a.count, a.megapixels, progress=False)
    where = a.cache or tmp
    opts = {
        "model": a.model,
        "area": a.area,
        "device": a.device,
        "dtype": a.dtype,
        "store_dtype": "fp16",
        "num_workers": a.workers,
        "token_budget": a.token_budget,
        "progress": False,
    }
    res: dict[str, Any] = {
        "model": a.model,
        "area": a.area,
        "workers": a.workers,
        "images": a.count,
        "device": a.device,
    }
    for name, drop in (("writes", False), ("dropped", True)):
        if a.only in (None, name):
            res[name] = run(images, where / f"cache-{name}", opts, drop)
    if "writes" in res and "dropped" in res:
        res["writes_over_dropped"] = res["writes"]["img_s"] / res["dropped"]["img_s"]
    emit(res, a.json)


if __name__ == "__main__":
    main()
