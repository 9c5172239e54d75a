"""What the GPU run ran on (issue 10): device, versions, the measured matmul peak per dtype, and which kernel
PyTorch's scaled_dot_product_attention dispatches to for ViT-L/16 at area 1024 (4096 + 5 tokens, 16 heads of 64).

    PYTHONPATH=. python benchmarks/gpu_env.py --device cuda --json $OUT/env.json
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from report import emit  # benchmarks/report.py (run as `python benchmarks/<script>.py`)

from dinofeat.extraction.model import resolve_device
from dinofeat.inspection.bench import matmul_peak_tflops

KERNEL_WORDS = ("flash", "efficient", "cudnn", "fmha", "attention", "softmax", "bmm", "gemm")


def sdpa_kernels(device: torch.device, dtype: torch.dtype, tokens: int = 4101, heads: int = 16, dim: int = 64) -> list:
    """Names of the device kernels one SDPA call launches (the attention-looking ones), from torch.profiler."""
    q = torch.randn(8, heads, tokens, dim, device=device, dtype=dtype)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        if device.type == "cuda":
            torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(w in n.lower() for w in KERNEL_WORDS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    device = resolve_device(a.device)
    res: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
    }
    try:
        import transformers

        res["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        res["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
        res["mem_efficient_sdp_enabled"] = torch.backends.cuda.mem_efficient_sdp_enabled()
        res["cudnn_sdp_enabled"] = torch.backends.cuda.cudnn_sdp_enabled()
    for dtype in ("fp16", "bf16") if device.type == "cuda" else ("fp32",):
        res[f"matmul_peak_tflops_{dtype}"] = matmul_peak_tflops(device, dtype, seconds=2.0)
    half = torch.float16 if device.type == "cuda" else torch.float32
    res["sdpa_kernels_vitl16_1024"] = sdpa_kernels(device, half, tokens=4101 if device.type == "cuda" else 261)
    emit(res, a.json)


if __name__ == "__main__":
    main()
