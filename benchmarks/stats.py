"""Cost of the per-channel statistics precompute accumulates (issue 14): `ChannelStats.of` on one shard of fp16
features, as the writer thread runs it after writing the shard.

    python benchmarks/stats.py --grid 32 --hidden 1024 --rows 64 --json benchmarks/results-stats-cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from report import emit  # benchmarks/report.py (run as `python benchmarks/<script>.py`)

from dinofeat.cache.stats import ChannelStats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, default=32, help="patch grid side (32 = 512x512 at patch 16)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=64, help="images per shard (64 x 2 MiB = 128 MiB for ViT-L at 512)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((a.rows, a.grid, a.grid, a.hidden)).astype(np.float16)
    ChannelStats.of(x[:1])
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ChannelStats.of(x)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    res = {
        "shard_mib": round(x.nbytes / 2**20, 1),
        "seconds_per_shard": round(med, 3),
        "gb_s": round(x.nbytes / med / 1e9, 2),
        "ms_per_image": round(med / a.rows * 1e3, 2),
        "stats_file_bytes_approx": 2 * 2 * 8 * a.hidden + 1300,  # mean and m2 (float64) of cls and patches + npz
    }
    emit(res, a.json)


if __name__ == "__main__":
    main()
