"""The bucket spec: the few numbers from which a DiT dataloader elsewhere rebuilds exactly the same buckets."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Mode = Literal["list", "fit"]
SPEC_VERSION = 1


class BucketSpecError(ValueError):
    """A bucket spec that cannot produce valid buckets (raised at construction, before any work)."""


@dataclass(frozen=True)
class BucketSpec:
    """How target sizes are chosen.

    `area` is the side of the square whose area every bucket approximates (1024 means 1024x1024 pixels).
    `multiple` is the step every side is rounded to: the patch size, or any multiple of it that also suits the
    VAE factor x DiT patch. `mode="list"` uses `num_buckets` sizes spaced evenly in log aspect ratio between
    `min_ar` and `max_ar` (width / height); `mode="fit"` sizes each image on its own (aspect kept, area fitted).
    """

    area: int = 1024
    multiple: int = 16
    min_ar: float = 0.25
    max_ar: float = 4.0
    num_buckets: int = 33
    mode: Mode = "list"

    def __post_init__(self) -> None:
        # 4 and 4.0 must serialise (and hash) alike
        object.__setattr__(self, "min_ar", float(self.min_ar))
        object.__setattr__(self, "max_ar", float(self.max_ar))
        if self.multiple < 1:
            raise BucketSpecError(f"multiple must be >= 1, got {self.multiple}")
        if self.area < self.multiple:
            raise BucketSpecError(f"area side {self.area} is smaller than the multiple {self.multiple}")
        if not (0 < self.min_ar <= 1.0 <= self.max_ar) or not math.isfinite(self.max_ar):
            raise BucketSpecError(
                f"aspect range must satisfy 0 < min_ar <= 1 <= max_ar, got {self.min_ar}..{self.max_ar}"
            )
        if self.num_buckets < 1:
            raise BucketSpecError(f"num_buckets must be >= 1, got {self.num_buckets}")
        if self.mode not in ("list", "fit"):
            raise BucketSpecError(f"mode must be 'list' or 'fit', got {self.mode!r}")

    @property
    def target_pixels(self) -> int:
        return self.area * self.area

    def to_dict(self) -> dict[str, Any]:
        return {"version": SPEC_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BucketSpec:
        version = data.get("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise BucketSpecError(f"unsupported bucket spec version {version} (this build reads {SPEC_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"version"}
        if unknown:
            raise BucketSpecError(f"unknown bucket spec fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """Stable across processes and machines: sha256 of the canonical JSON, first 16 hex digits."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
