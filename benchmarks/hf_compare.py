"""dinofeat's preprocessing against Hugging Face's DINOv3 image processor (issue 10 part 4), on the same photos.

    PYTHONPATH=. python benchmarks/hf_compare.py --images DIR --model random:vitl16 --area 512 --device cuda \
        --json $OUT/hf-compare.json

For each image, both resize the whole image to its dinofeat bucket (HF with `do_center_crop=False`,
`size={"height": H, "width": W}`: its recipe is rescale, antialiased bilinear resize in float, normalise; ours is
antialiased bilinear resize in uint8 (PIL), then the same normalisation), and both inputs go through the same
model. Reported: max and mean absolute difference of the normalised inputs, and the mean and worst per-image
patch cosine of the features. HF's processor needs torchvision (the GPU machine has it; this CPU VM does not):
without it the script says so and reports our half only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from report import emit  # benchmarks/report.py (run as `python benchmarks/<script>.py`)

from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.model import TORCH_DTYPES, Encoder
from dinofeat.extraction.prepare import build_plan, prepare
from dinofeat.extraction.tokens import split_tokens
from dinofeat.images.decode import decode_rgb
from dinofeat.images.preprocess import load_resized
from dinofeat.images.resize import normalize_np
from dinofeat.sources.discover import discover


def hf_processor(height: int, width: int):  # transformers is imported lazily (needs torchvision)
    import transformers

    # transformers 5 names it DINOv3ViTImageProcessor; 4.56-4.x DINOv3ViTImageProcessorFast
    cls = getattr(transformers, "DINOv3ViTImageProcessor", None) or transformers.DINOv3ViTImageProcessorFast
    return cls(size={"height": height, "width": width}, do_center_crop=False)


def cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).cpu().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--model", default="random:vitl16")
    ap.add_argument("--area", type=int, default=512)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="fp32", help="compute dtype of both forwards (fp32: differences are input's)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    cfg = ExtractConfig(model=a.model, area=a.area, device=a.device, dtype=a.dtype, progress=False)
    prep = prepare(cfg)
    src = discover(a.images)
    plan = build_plan(src, prep, progress=False)
    enc = Encoder(prep.model, prep.device, prep.dtype)
    regs = prep.model.num_register_tokens
    try:
        hf_processor(32, 32)
        hf_error = None
    except Exception as e:  # ImportError or torchvision's operator errors on a CPU-only torch
        hf_error = f"{type(e).__name__}: {e}"
    rows = []
    for i, key in enumerate(plan.keys):
        if plan.bucket[i] < 0:
            continue
        b = plan.buckets[plan.bucket[i]]
        ours = torch.from_numpy(normalize_np(load_resized(src.path(key), b.size, cfg.recipe)))
        row: dict[str, object] = {"key": key, "bucket": b.name}
        if hf_error is None:
            rgb = decode_rgb(src.path(key))  # upright RGB, as we decode it: only the resize + normalise differ
            theirs = hf_processor(b.height, b.width)(images=rgb, return_tensors="pt")["pixel_values"][0]
            diff = (ours - theirs.float()).abs()
            x = torch.stack([ours, theirs.float()]).to(prep.device, TORCH_DTYPES[prep.dtype])
            hidden = enc.hidden_states(x)
            _, _, patches = split_tokens(hidden, regs, b.grid)
            cos = cosines(patches[0], patches[1])
            row |= {
                "input_max_abs": float(diff.max()),
                "input_mean_abs": float(diff.mean()),
                "patch_cos_mean": float(cos.mean()),
                "patch_cos_min": float(cos.min()),
            }
        rows.append(row)
    res: dict[str, object] = {"model": a.model, "area": a.area, "device": str(prep.device), "images": len(rows)}
    if hf_error is not None:
        res["hf_processor"] = f"unavailable here ({hf_error})"
    else:
        res |= {
            "input_max_abs": max(r["input_max_abs"] for r in rows),
            "input_mean_abs": float(np.mean([r["input_mean_abs"] for r in rows])),
            "patch_cos_mean": float(np.mean([r["patch_cos_mean"] for r in rows])),
            "patch_cos_worst_image": min(r["patch_cos_mean"] for r in rows),
        }
    res["per_image"] = rows
    emit(res, a.json)


if __name__ == "__main__":
    main()
