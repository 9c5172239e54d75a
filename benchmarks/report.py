"""What every benchmark script ends with: figures rounded to 3 decimals, printed, and saved as JSON when asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def rounded(value: Any, digits: int = 3) -> Any:
    """Floats rounded, inside dicts and lists too."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def machine() -> dict[str, Any]:
    """Where a figure was measured: the CPU model and core count, and the GPU's name when there is one."""
    import os
    import platform

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    out: dict[str, Any] = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0}
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return out


def emit(result: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """Print the rounded result, with the machine it was measured on; write it to `path` (--json) when given."""
    result = rounded({**result, "machine": result.get("machine") or machine()})
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")
    return result
