"""Tar shards and parquet files against a folder of the same images (issue 13 part 4, local half): probe (header)
and decode+resize throughput per image, the same JPEGs read as files, as byte ranges of webdataset shards, or as rows
of parquet files (img2dataset's layout: `key` + `jpg`, `--group-rows` rows per row group).

    PYTHONPATH=. python benchmarks/sources.py --count 256 --megapixels 1 --json benchmarks/results-sources-cpu.json

One thread, warm page cache, median of `--repeats` passes: what one decode worker sees. The end-to-end effect of
the source kind is in the `extract` rows (inline decoding on this CPU, model random:vits16 at area 256).

Parquet is also decoded in the order extraction uses (bucket by bucket, rows in source order) with the reader's
row-group cache cut to its minimum, as on a dataset far larger than the cache: `parquet_read_amplification` is the
image-column bytes read over the bytes of the images (1.0 = each row group read once).
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from report import emit  # benchmarks/report.py (run as `python benchmarks/<script>.py`)

from dinofeat.extraction.run import extract
from dinofeat.images.preprocess import load_resized
from dinofeat.images.probe import probe
from dinofeat.images.synthetic import make_images
from dinofeat.sources import parquet
from dinofeat.sources.discover import discover


def per_image_ms(fn: Callable[[], None], n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=256)
    ap.add_argument("--megapixels", type=float, default=1.0)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--group-rows", type=int, default=100, help="parquet rows per row group (img2dataset, HF: 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dinofeat-sources-"))
    folder = work / "folder"
    paths = make_images(folder, a.count, a.megapixels)
    shards = work / "shards"
    shards.mkdir()
    n_shards = -(-a.count // a.per_shard)
    for s in range(n_shards):
        with tarfile.open(shards / f"{s:06d}.tar", "w") as tf:
            for p in paths[s * a.per_shard : (s + 1) * a.per_shard]:
                tf.add(p, arcname=p.name)
    pattern = str(shards / f"{{000000..{n_shards - 1:06d}}}.tar")
    t0 = time.perf_counter()
    tar_src = discover(pattern)
    list_ms = 1e3 * (time.perf_counter() - t0)
    dir_src = discover(folder)
    pq_pattern, image_bytes = write_parquet(work / "parquet", paths, a.per_shard * 4, a.group_rows)
    t0 = time.perf_counter()
    pq_src = discover(pq_pattern)
    res: dict[str, object] = {
        "count": a.count,
        "megapixels": a.megapixels,
        "shards": n_shards,
        "group_rows": a.group_rows,
        "list_tars_ms": list_ms,
        "list_parquet_ms": 1e3 * (time.perf_counter() - t0),
    }
    sources = {"folder": (folder, dir_src), "tar": (pattern, tar_src), "parquet": (pq_pattern, pq_src)}
    for kind, (where, src) in sources.items():
        locs = [src.path(k) for k in src.keys]
        res[f"{kind}_probe_ms"] = per_image_ms(lambda locs=locs: [probe(x) for x in locs], len(locs), a.repeats)
        res[f"{kind}_decode_resize_ms"] = per_image_ms(
            lambda locs=locs: [load_resized(x, (512, 384)) for x in locs], len(locs), a.repeats
        )
        s = extract(
            where,
            work / f"cache-{kind}",
            model="random:vits16",
            area=256,
            device="cpu",
            progress=False,
        )
        res[f"{kind}_extract_img_s"] = s.images_per_s
    res.update(extraction_order(work / "cache-parquet", pq_src, dir_src, image_bytes, a.repeats))
    for kind in ("tar", "parquet"):
        res[f"{kind}_over_folder_decode"] = res["folder_decode_resize_ms"] / res[f"{kind}_decode_resize_ms"]
        res[f"{kind}_over_folder_probe"] = res["folder_probe_ms"] / res[f"{kind}_probe_ms"]
    res["parquet_bucket_order_over_folder_decode"] = (
        res["folder_bucket_order_decode_resize_ms"] / res["parquet_bucket_order_decode_resize_ms"]
    )
    emit(res, a.json)


def write_parquet(out: Path, paths: list[Path], per_file: int, group_rows: int) -> tuple[str, int]:
    """img2dataset's layout; returns the files' glob and the total bytes of the images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir()
    total = 0
    for f, lo in enumerate(range(0, len(paths), per_file)):
        chunk = paths[lo : lo + per_file]
        data = [p.read_bytes() for p in chunk]
        total += sum(map(len, data))
        table = pa.table({"key": [p.stem for p in chunk], "jpg": pa.array(data, pa.binary())})
        pq.write_table(table, out / f"{f:05d}.parquet", row_group_size=group_rows)
    return str(out / "*.parquet"), total


def extraction_order(cache: Path, src, dir_src, image_bytes: int, repeats: int) -> dict[str, float]:
    """Decode the parquet rows bucket by bucket, as the extraction's jobs ask for them, with a minimal row-group
    cache, and the same images from the folder in the same order to the same sizes; reports ms per image and the
    read amplification."""
    from dinofeat.cache.store import Store

    plan = Store(cache).index.plan()
    order = [plan.keys[i] for b, pos in plan.rows_to_keys().items() for i in pos]
    sizes = {b.name: b.size for b in plan.buckets}
    bucket_of = {plan.keys[i]: plan.buckets[plan.bucket[i]].name for i in range(len(plan)) if plan.bucket[i] >= 0}
    parquet.CACHE_BYTES = 0  # keeps the 2 most recent row groups: a dataset far larger than the cache
    parquet._reset_after_fork()

    def run() -> None:
        for k in order:
            load_resized(src.path(k), sizes[bucket_of[k]])

    def run_folder() -> None:
        for k in order:
            load_resized(dir_src.path(k.split("/", 1)[1] + ".jpg"), sizes[bucket_of[k]])

    ms = per_image_ms(run, len(order), repeats)
    reads, nbytes = parquet.reader_stats()
    return {
        "parquet_bucket_order_decode_resize_ms": ms,
        "folder_bucket_order_decode_resize_ms": per_image_ms(run_folder, len(order), repeats),
        "parquet_buckets": len(plan.buckets),
        "parquet_row_group_reads_per_pass": reads / repeats,
        "parquet_read_amplification": nbytes / repeats / image_bytes,
    }


if __name__ == "__main__":
    main()
