"""Tar shards against a folder of the same images (issue 13 part 4, local half): probe (header) and decode+resize
throughput per image, the same JPEGs read as files or as byte ranges of webdataset shards.

    PYTHONPATH=. python benchmarks/sources.py --count 256 --megapixels 1 --json benchmarks/results-sources-cpu.json

One thread, warm page cache, median of `--repeats` passes: what one decode worker sees. The end-to-end effect of
the source kind is in the `extract` rows (inline decoding on this CPU, model random:vits16 at area 256).
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

from dinofeat.discover import discover
from dinofeat.precompute import extract
from dinofeat.preprocess import load_resized
from dinofeat.probe import probe
from dinofeat.synthetic import make_images


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
    res: dict[str, object] = {"count": a.count, "megapixels": a.megapixels, "shards": n_shards, "list_tars_ms": list_ms}
    for kind, src in (("folder", dir_src), ("tar", tar_src)):
        locs = [src.path(k) for k in src.keys]
        res[f"{kind}_probe_ms"] = per_image_ms(lambda locs=locs: [probe(x) for x in locs], len(locs), a.repeats)
        res[f"{kind}_decode_resize_ms"] = per_image_ms(
            lambda locs=locs: [load_resized(x, (512, 384)) for x in locs], len(locs), a.repeats
        )
        s = extract(
            pattern if kind == "tar" else folder,
            work / f"cache-{kind}",
            model="random:vits16",
            area=256,
            device="cpu",
            progress=False,
        )
        res[f"{kind}_extract_img_s"] = s.images_per_s
    res["tar_over_folder_decode"] = res["folder_decode_resize_ms"] / res["tar_decode_resize_ms"]
    res["tar_over_folder_probe"] = res["folder_probe_ms"] / res["tar_probe_ms"]
    emit(res, a.json)


if __name__ == "__main__":
    main()
