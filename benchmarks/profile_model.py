"""Where the encoder's forward pass spends its time (issue 31.5): torch.profiler over warm forward passes of one
bucket shape, kernels grouped as matmul, attention and everything else (norms, activations, RoPE, copies), with the
top kernels by device time.

    PYTHONPATH=. python benchmarks/profile_model.py --model random:vitl16 --area 1024 --batch 15 --device cuda \
        --json benchmarks/results-gpu-profile.json

On a GPU the times are CUDA kernel times; on a CPU (the dry run) operator self-times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
GROUPS = {  # kernel or operator name fragments (lower case) -> group; first match wins
    "attention": ("flash", "sdpa", "attention", "fmha", "softmax"),
    "matmul": ("gemm", "matmul", "mm", "linear", "addmm", "cutlass", "sm90_xmma", "nvjet", "wgmma"),
}


def group_of(name: str) -> str:
    low = name.lower()
    for group, words in GROUPS.items():
        if any(w in low for w in words):
            return group
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:vitl16")
    ap.add_argument("--area", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=15)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from report import emit

    from dinofeat.extraction.model import Encoder, load_model_info

    device = torch.device(a.device)
    info = load_model_info(a.model)
    enc = Encoder(info, device, a.dtype)
    side = a.area // info.patch_size * info.patch_size
    u8 = torch.randint(0, 255, (a.batch, side, side, 3), dtype=torch.uint8, device=device)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    enc.encode_uint8(u8, mean, std)  # warm-up: kernel selection
    _sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(a.steps):
            enc.encode_uint8(u8, mean, std)
        _sync(device)
    wall = (time.perf_counter() - t0) / a.steps
    res = summarise(prof, device, a.steps, a.top)
    res |= {"model": a.model, "area": a.area, "batch": a.batch, "dtype": a.dtype, "wall_s_per_forward": wall}
    res["img_s_under_profiler"] = a.batch / wall
    emit(res, a.json)


def summarise(prof: Any, device: torch.device, steps: int, top: int) -> dict[str, Any]:
    """Kernels (CUDA) or operators (CPU, self time) by total time per forward, grouped, and the top ones."""
    rows = []
    for e in prof.key_averages():
        t = _device_us(e) if device.type == "cuda" else e.self_cpu_time_total
        if t > 0 and (device.type != "cuda" or e.device_type == torch.autograd.DeviceType.CUDA):
            rows.append((e.key, t / steps / 1e3, e.count // steps))
    total = sum(ms for _, ms, _ in rows) or 1.0
    shares: dict[str, float] = {}
    for name, ms, _ in rows:
        shares[group_of(name)] = shares.get(group_of(name), 0.0) + ms / total
    rows.sort(key=lambda r: -r[1])
    return {
        "device_ms_per_forward": total,
        "shares": shares,
        "top": [{"name": n[:120], "ms": ms, "calls": c, "group": group_of(n)} for n, ms, c in rows[:top]],
    }


def _device_us(e: Any) -> float:
    return float(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) or 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
