"""Extraction throughput, three ways, on the same images and the same model, in one run:

1. model-only: pre-decoded uint8 batches through the encoder (the ceiling for the pipeline) and
2. end-to-end: `dinofeat.extract` (probe, plan, decode, model, background shard writes), both measured by
   `dinofeat.inspection.bench.bench`, the code behind `dinofeat bench`;
3. naive: per image open -> resize -> normalise -> batch-1 forward -> slice -> np.save (what most users write),
   in the same compute dtype, every shape warmed up first.

    python benchmarks/extract.py --count 96 --megapixels 1.5 --model random:vits16 --area 256
Targets (issue 6): end-to-end >= 0.8x model-only and >= 2x naive.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from report import emit  # benchmarks/report.py (run as `python benchmarks/<script>.py`)

from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.model import Encoder
from dinofeat.extraction.prepare import build_plan, prepare
from dinofeat.images.resize import normalize_np
from dinofeat.images.synthetic import make_images
from dinofeat.inspection.bench import bench
from dinofeat.sources.discover import discover


def naive(images: Path, cfg: ExtractConfig, count: int | None = None) -> float:
    prep = prepare(cfg)
    src = discover(images, limit=count)
    plan = build_plan(src, prep, progress=False)
    enc = Encoder(prep.model, prep.device, prep.dtype)
    p, regs = prep.model.patch_size, prep.model.num_register_tokens
    size_of = {plan.keys[i]: plan.buckets[plan.bucket[i]].size for i in range(len(plan))}
    for b in plan.buckets:  # warm the batch-1 shapes, as the other two are measured warm
        enc.hidden_states(torch.zeros(1, 3, b.height, b.width))
    out = Path(tempfile.mkdtemp(prefix="dinofeat-naive-"))
    t0 = time.perf_counter()
    for k in src.keys:
        w, h = size_of[k]
        im = Image.open(src.path(k)).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
        x = torch.from_numpy(normalize_np(np.asarray(im)))[None]
        hidden = enc.hidden_states(x)
        patches = hidden[0, 1 + regs :].reshape(h // p, w // p, -1).float().cpu().numpy().astype(np.float16)
        np.save(out / (k.replace("/", "_") + ".npy"), patches)
    return len(src.keys) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=96)
    ap.add_argument("--megapixels", type=float, default=1.5)
    ap.add_argument("--model", default="random:vits16")
    ap.add_argument("--area", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--images", type=Path, default=None, help="a folder to use instead of --count synthetic images")
    ap.add_argument("--naive-count", type=int, default=None, help="naive on the first N images only (0: skip it)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder (both model-only and e2e)")
    ap.add_argument("--decode", default="cpu", help="where JPEGs are decoded end to end: cpu or gpu (--decode)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    imgs = a.images
    if imgs is None:
        imgs = Path(tempfile.mkdtemp(prefix="dinofeat-bench-")) / "images"
        make_images(imgs, a.count, a.megapixels)
    count = len(discover(imgs).keys) if a.images is not None else a.count
    r = bench(
        a.model, a.area, a.device, images=imgs, count=count, workers=a.workers, progress=False, compile=a.compile,
        decode=a.decode,
    )  # fmt: skip
    res = {**r.to_dict(), "megapixels": a.megapixels if a.images is None else None, "compile": a.compile}
    res["decode"] = a.decode
    res["torch_threads"] = torch.get_num_threads()
    if a.naive_count != 0:
        cfg = ExtractConfig(model=a.model, area=a.area, device=a.device, progress=False)
        naive_img_s = naive(imgs, cfg, a.naive_count)
        res |= {
            "naive_images": a.naive_count or count,
            "naive_img_s": naive_img_s,
            "e2e_over_naive": r.end_to_end_img_s / naive_img_s,
            "e2e_wall_over_naive": r.end_to_end_wall_img_s / naive_img_s,
            "model_only_over_naive": r.model_only_img_s / naive_img_s,
        }
    emit(res, a.json)


if __name__ == "__main__":
    main()
