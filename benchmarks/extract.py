"""Extraction throughput, three ways, on the same images and the same model, in one run:

1. model-only: pre-decoded uint8 batches through the encoder (the ceiling for the pipeline);
2. end-to-end: `dinofeat.extract` (probe, plan, decode workers, model, background shard writes);
3. naive: per image open -> resize -> normalise -> batch-1 forward -> slice -> np.save (what most users write).

    python benchmarks/extract.py --count 96 --megapixels 1.5 --model random:vits16 --area 256
Targets (2-core CPU, random:vits16, area 256): end-to-end >= 0.8x model-only and >= 2x naive.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_images import make

from dinofeat.config import ExtractConfig
from dinofeat.discover import discover
from dinofeat.model import Encoder
from dinofeat.plan import batch_size_for
from dinofeat.precompute import DEFAULT_TOKEN_BUDGET, build_plan, extract, prepare
from dinofeat.preprocess import load_resized
from dinofeat.resize import normalize_np
from dinofeat.tokens import split_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=96)
    ap.add_argument("--megapixels", type=float, default=1.5)
    ap.add_argument("--model", default="random:vits16")
    ap.add_argument("--area", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dinofeat-bench-"))
    imgs = tmp / "images"
    make(imgs, a.count, a.megapixels)
    cfg = ExtractConfig(model=a.model, area=a.area, device=a.device, num_workers=a.workers, progress=False)
    prep = prepare(cfg)
    src = discover(imgs)
    plan = build_plan(src, prep, progress=False)
    enc = Encoder(prep.model, prep.device, prep.dtype)
    budget = DEFAULT_TOKEN_BUDGET.get(prep.device.type, 8192)
    R = prep.model.num_register_tokens

    # 1. model-only on pre-decoded batches, same batching as the pipeline
    pos = plan.rows_to_keys()
    batches = []
    for b in plan.buckets:
        bs = batch_size_for(b.grid[0] * b.grid[1] + 1 + R, budget)
        arr = np.stack([load_resized(src.path(plan.keys[i]), (b.width, b.height)) for i in pos[b.name]])
        batches += [(b, torch.from_numpy(arr[s : s + bs])) for s in range(0, len(arr), bs)]
    # warm every batch shape once: CPU kernels are specialised on first use per shape, GPU kernels autotune
    for _, x in batches:
        enc.encode_uint8(x, cfg.recipe.mean, cfg.recipe.std)
    t0 = time.perf_counter()
    for b, x in batches:
        h = enc.encode_uint8(x, cfg.recipe.mean, cfg.recipe.std)
        split_tokens(h, R, b.grid)[2].to(torch.float16).cpu()
    if prep.device.type == "cuda":
        torch.cuda.synchronize()
    model_only = a.count / (time.perf_counter() - t0)

    # 2. end-to-end
    t0 = time.perf_counter()
    s = extract(imgs, tmp / "cache", cfg)
    wall = time.perf_counter() - t0
    e2e_loop, e2e_wall = s.images_per_s, a.count / wall

    # 3. naive recipe
    out = tmp / "naive"
    out.mkdir()
    size_of = {
        plan.keys[i]: (plan.buckets[plan.bucket[i]].width, plan.buckets[plan.bucket[i]].height)
        for i in range(len(plan))
    }
    for b in plan.buckets:  # warm the batch-1 shapes too, so all three are measured warm
        enc.hidden_states(torch.zeros(1, 3, b.height, b.width))
    t0 = time.perf_counter()
    for k in src.keys:
        im = Image.open(src.path(k)).convert("RGB").resize(size_of[k], Image.Resampling.BILINEAR)
        x = torch.from_numpy(normalize_np(np.asarray(im)))[None]
        h = enc.hidden_states(x)
        w, hh = size_of[k]
        patches = h[0, 1 + R :].reshape(hh // 16, w // 16, -1).float().cpu().numpy().astype(np.float16)
        np.save(out / (k.replace("/", "_") + ".npy"), patches)
    naive = a.count / (time.perf_counter() - t0)

    res = {
        "images": a.count,
        "megapixels": a.megapixels,
        "model": a.model,
        "area": a.area,
        "device": str(prep.device),
        "dtype": prep.dtype,
        "torch_threads": torch.get_num_threads(),
        "buckets": len(plan.buckets),
        "model_only_img_s": round(model_only, 2),
        "end_to_end_img_s_loop": round(e2e_loop, 2),
        "end_to_end_img_s_wall": round(e2e_wall, 2),
        "naive_img_s": round(naive, 2),
        "e2e_over_model_only": round(e2e_loop / model_only, 3),
        "e2e_over_naive": round(e2e_loop / naive, 3),
        "e2e_wall_over_naive": round(e2e_wall / naive, 3),
    }
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
