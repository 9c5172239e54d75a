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


def emit(result: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """Print the rounded result; write it to `path` (the script's --json) when given."""
    result = rounded(result)
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")
    return result
