"""The bucket spec: the few numbers from which a DiT dataloader elsewhere rebuilds exactly the same buckets."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

Mode = Literal["list", "fit"]
# 1: each side rounded to the multiple on its own (a bucket's aspect could fall outside min_ar..max_ar)
# 2: the same, except that a size rounded outside the aspect range is rounded the other way (table.size_for_aspect)
SPEC_VERSION = 2
SPEC_VERSIONS = (1, 2)
MAX_BUCKETS = 1000  # far past any useful table (sides are multiples of 16): more only takes time and memory


class BucketSpecError(ValueError):
    """A bucket spec that cannot produce valid buckets (raised at construction, before any work)."""


@dataclass(frozen=True)
class BucketSpec:
    """How target sizes are chosen.

    `area` is the side of the square whose area every bucket approximates (1024 means 1024x1024 pixels).
    `multiple` is the step every side is rounded to: the patch size, or any multiple of it that also suits the
    VAE factor x DiT patch. `mode="list"` uses `num_buckets` sizes spaced evenly in log aspect ratio between
    `min_ar` and `max_ar` (width / height); `mode="fit"` sizes each image on its own (aspect kept, area fitted).
    `version` fixes the rounding rule, so a spec recorded by an older release rebuilds exactly its buckets.
    """

    area: int = 1024
    multiple: int = 16
    min_ar: float = 0.25
    max_ar: float = 4.0
    num_buckets: int = 33
    mode: Mode = "list"
    version: int = SPEC_VERSION

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
        if not 1 <= self.num_buckets <= MAX_BUCKETS:
            raise BucketSpecError(f"num_buckets must be between 1 and {MAX_BUCKETS}, got {self.num_buckets}")
        if self.mode not in ("list", "fit"):
            raise BucketSpecError(f"mode must be 'list' or 'fit', got {self.mode!r}")
        if self.version not in SPEC_VERSIONS:
            raise BucketSpecError(f"unsupported bucket spec version {self.version} (this build reads {SPEC_VERSIONS})")

    @property
    def target_pixels(self) -> int:
        return self.area * self.area

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # a version 1 spec gives the very dict (and hash) dinofeat <= 0.5 recorded

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BucketSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BucketSpecError(f"unknown bucket spec fields: {sorted(unknown)}")
        return cls(**{"version": 1, **data})  # a spec without a version is from before versions existed

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """Stable across processes and machines: sha256 of the canonical JSON, first 16 hex digits."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TiedSpec:
    """DINO buckets tied to a DiT's: every DINO bucket is a DiT bucket scaled by `scale` exactly, so an image lands
    in buckets of the same aspect ratio on both sides and each DINO patch covers k x k DiT tokens.

    `dit` is the DiT's own spec (in DiT pixels); `scale` an exact fraction ("1/2"); `dit_token` the DiT pixels per
    token (VAE factor x DiT patch, 8 x 2 = 16). With DINO patch P, k = P / (scale * dit_token) must be an integer
    (checked by `grid_factor`): DiT token (i, j) then lies in DINO patch (i // k, j // k).
    """

    dit: BucketSpec
    scale: str = "1/2"
    dit_token: int = 16

    def __post_init__(self) -> None:
        ratio = parse_scale(self.scale)
        object.__setattr__(self, "scale", str(ratio))  # "2/4" and "0.5" hash like "1/2"
        if self.dit_token < 1 or self.dit.multiple % self.dit_token:
            raise BucketSpecError(
                f"the DiT multiple {self.dit.multiple} must be a multiple of the DiT token size {self.dit_token}"
            )
        if (self.dit.multiple * ratio).denominator != 1:
            raise BucketSpecError(f"the DiT multiple {self.dit.multiple} x {self.scale} is not a whole pixel count")

    @property
    def ratio(self) -> Fraction:
        return Fraction(self.scale)

    @property
    def mode(self) -> Mode:
        return self.dit.mode

    def dino_size(self, width: int, height: int) -> tuple[int, int]:
        return int(width * self.ratio), int(height * self.ratio)

    def dit_size(self, width: int, height: int) -> tuple[int, int]:
        return int(width / self.ratio), int(height / self.ratio)

    def grid_factor(self, patch: int) -> int:
        """k: DiT tokens per DINO patch along each side. Raises BucketSpecError unless every DINO side is a
        multiple of `patch` and k is a whole number."""
        if (self.dit.multiple * self.ratio) % patch:
            raise BucketSpecError(
                f"DINO sides (DiT multiple {self.dit.multiple} x {self.scale}) are not multiples of the patch {patch}; "
                f"use a DiT multiple that is a multiple of {min_tied_multiple(patch, self.ratio, self.dit_token)}"
            )
        k = Fraction(patch) / (self.ratio * self.dit_token)
        if k.denominator != 1:
            raise BucketSpecError(
                f"a DINO patch ({patch} px at scale {self.scale}) covers {k} DiT tokens of {self.dit_token} px: "
                "not a whole number, so the grids cannot be aligned"
            )
        return int(k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.dit.version,
            "tied": {"scale": self.scale, "dit_token": self.dit_token},
            "dit": self.dit.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


AnySpec = BucketSpec | TiedSpec


def parse_scale(scale: str) -> Fraction:
    """'1/2', '0.5', '2/4' -> Fraction(1, 2); BucketSpecError unless a positive fraction."""
    try:
        ratio = Fraction(scale)
    except (ValueError, ZeroDivisionError):
        raise BucketSpecError(f"scale must be a fraction like 1/2, got {scale!r}") from None
    if ratio <= 0:
        raise BucketSpecError(f"scale must be positive, got {scale}")
    return ratio


def spec_for(
    area: int,
    multiple: int | None,
    min_ar: float,
    max_ar: float,
    num_buckets: int,
    mode: Mode,
    patch: int,
    dit_scale: str | None = None,
    dit_token: int = 16,
    version: int | None = None,
) -> AnySpec:
    """The DINO-side spec from user settings, checked against the patch size. Untied: `multiple` defaults to the
    patch and must be a multiple of it. Tied (`dit_scale`): area/multiple/aspects describe the DiT's buckets,
    `multiple` defaults to the smallest that aligns, and the grids must align (k whole)."""
    if dit_scale is None:
        m = patch if multiple is None else multiple
        if m % patch:
            raise BucketSpecError(f"bucket multiple {m} is not a multiple of the model's patch size {patch}")
        return BucketSpec(area, m, min_ar, max_ar, num_buckets, mode, version or SPEC_VERSION)
    m = min_tied_multiple(patch, parse_scale(dit_scale), dit_token) if multiple is None else multiple
    dit = BucketSpec(area, m, min_ar, max_ar, num_buckets, mode, version or SPEC_VERSION)
    spec = TiedSpec(dit, dit_scale, dit_token)
    spec.grid_factor(patch)
    return spec


def min_tied_multiple(patch: int, ratio: Fraction, dit_token: int) -> int:
    """The smallest DiT multiple whose scaled sides are multiples of `patch` and which is a multiple of the token."""
    base = patch * ratio.denominator // math.gcd(ratio.numerator, patch * ratio.denominator)
    return math.lcm(base, dit_token)


def load_spec(data: dict[str, Any] | str | os.PathLike[str]) -> AnySpec:
    """A spec from its `to_dict()` (a cache's metadata), or from the JSON file `dinofeat buckets --out` writes
    (its path, or its parsed content)."""
    if isinstance(data, (str, os.PathLike)):
        try:
            data = json.loads(Path(data).read_text())
        except (OSError, ValueError) as e:
            raise BucketSpecError(f"cannot read a bucket spec from {os.fspath(data)}: {e}") from e
    if not isinstance(data, dict):
        raise BucketSpecError(f"a bucket spec is a JSON object, got {type(data).__name__}")
    data = dict(data.get("spec", data))  # the whole --out file, or just its spec
    if "tied" in data:
        tied = data["tied"]
        return TiedSpec(BucketSpec.from_dict(data["dit"]), str(tied["scale"]), int(tied["dit_token"]))
    return BucketSpec.from_dict(data)
