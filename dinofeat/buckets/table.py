"""Bucket tables: sizes whose sides are multiples of a step and whose areas stay close to a target."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from dinofeat.buckets.spec import AnySpec, BucketSpec, TiedSpec, spec_for


@dataclass(frozen=True, order=True)
class Bucket:
    """One target size in pixels (width, height). Ordering is by width, then height."""

    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    def grid(self, patch: int) -> tuple[int, int]:
        """(rows, cols) of patches; the sides must be multiples of `patch`."""
        if self.width % patch or self.height % patch:
            raise ValueError(f"bucket {self.name} is not a multiple of patch size {patch}")
        return self.height // patch, self.width // patch

    def tokens(self, patch: int) -> int:
        h, w = self.grid(patch)
        return h * w


def round_to_multiple(x: float, m: int) -> int:
    """Nearest positive multiple of m (halves round up, so the result never depends on float noise at .5)."""
    return max(m, math.floor(x / m + 0.5) * m)


def size_for_aspect(aspect: float, spec: BucketSpec) -> Bucket:
    """The size of area ~ spec.area^2 and aspect ~ `aspect`, each side rounded to the multiple on its own.

    Version 2 specs keep every size inside min_ar..max_ar: when that rounding leaves the range, each side is
    rounded down or up instead, and of the sizes inside the range the one nearest in log area plus log aspect is
    taken. If the multiple leaves none inside (a tiny area), the plain rounding stays."""
    w = math.sqrt(spec.target_pixels * aspect)
    h = math.sqrt(spec.target_pixels / aspect)
    m = spec.multiple
    plain = Bucket(round_to_multiple(w, m), round_to_multiple(h, m))
    if spec.version < 2 or in_range(plain, spec):
        return plain
    sides_w = {max(m, math.floor(w / m) * m), max(m, math.ceil(w / m) * m)}
    sides_h = {max(m, math.floor(h / m) * m), max(m, math.ceil(h / m) * m)}
    inside = [Bucket(a, b) for a in sides_w for b in sides_h if in_range(Bucket(a, b), spec)]
    if not inside:
        return plain
    log_a, log_t = math.log(aspect), math.log(spec.target_pixels)
    return min(inside, key=lambda b: abs(math.log(b.width * b.height) - log_t) + abs(math.log(b.aspect) - log_a))


def in_range(b: Bucket, spec: BucketSpec) -> bool:
    """The bucket's aspect lies within the spec's min_ar..max_ar (to float precision)."""
    return spec.min_ar * (1 - 1e-12) <= b.aspect <= spec.max_ar * (1 + 1e-12)


def area_bound(aspect: float, spec: BucketSpec) -> float:
    """Largest |W*H - A| that rounding each ideal side by at most m/2 can give (the stated, tested bound). In a
    version 2 spec a side may be rounded the other way to keep the aspect in range: by less than m then."""
    w = math.sqrt(spec.target_pixels * aspect)
    h = math.sqrt(spec.target_pixels / aspect)
    half = spec.multiple / 2 if spec.version < 2 else spec.multiple
    # a side below m/2 rounds up to m, which can add up to m - side
    dw = max(half, spec.multiple - w)
    dh = max(half, spec.multiple - h)
    return dw * h + dh * w + dw * dh


def aspects(spec: BucketSpec) -> list[float]:
    """`num_buckets` aspect ratios evenly spaced in log between min_ar and max_ar (inclusive)."""
    lo, hi = math.log(spec.min_ar), math.log(spec.max_ar)
    n = spec.num_buckets
    if n == 1:
        return [math.exp((lo + hi) / 2)]
    return [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]


@lru_cache(maxsize=64)
def make_buckets(spec: AnySpec) -> tuple[Bucket, ...]:
    """The bucket list for a spec: distinct sizes sorted by aspect ratio (tall to wide), then by width. For a
    TiedSpec, the DINO side: each DiT bucket scaled exactly (same order, same aspect ratios)."""
    if isinstance(spec, TiedSpec):
        return tuple(Bucket(*spec.dino_size(b.width, b.height)) for b in make_buckets(spec.dit))
    sizes = {size_for_aspect(a, spec) for a in aspects(spec)}
    return tuple(sorted(sizes, key=lambda b: (b.aspect, b.width)))


def table_rows(spec: BucketSpec, patch: int | None = None) -> list[dict[str, object]]:
    """The printable table: size, patch grid (rows x cols), token count and aspect ratio of every bucket."""
    p = patch or spec.multiple
    rows = []
    for b in make_buckets(spec):
        gh, gw = b.grid(p)
        rows.append(
            {
                "width": b.width,
                "height": b.height,
                "grid_h": gh,
                "grid_w": gw,
                "tokens": gh * gw,
                "aspect": round(b.aspect, 4),
                "area_ratio": round(b.width * b.height / spec.target_pixels, 4),
            }
        )
    return rows


def tied_table_rows(spec: TiedSpec, patch: int) -> list[dict[str, object]]:
    """Both tables side by side: each DiT bucket with its token grid, the DINO bucket it is tied to with its patch
    grid, and k (DiT tokens per DINO patch along a side)."""
    k = spec.grid_factor(patch)
    rows = []
    for dit, dino in zip(make_buckets(spec.dit), make_buckets(spec), strict=True):
        th, tw = dit.grid(spec.dit_token)
        gh, gw = dino.grid(patch)
        rows.append(
            {
                "dit": {"width": dit.width, "height": dit.height, "grid_h": th, "grid_w": tw, "tokens": th * tw},
                "dino": {"width": dino.width, "height": dino.height, "grid_h": gh, "grid_w": gw, "tokens": gh * gw},
                "grid_factor": k,
                "aspect": round(dit.aspect, 4),
            }
        )
    return rows


def table_document(spec: AnySpec, patch: int | None = None) -> dict[str, object]:
    """What `dinofeat buckets --out` writes and a DiT dataloader loads: the spec (`load_spec` rebuilds it), its
    hash, the table (both sides for a TiedSpec), and how the requested aspects became buckets (`rounding`)."""
    if isinstance(spec, TiedSpec):
        if patch is None:
            raise ValueError("a tied table needs the DINO patch size")
        rows = tied_table_rows(spec, patch)
        doc = {"spec": spec.to_dict(), "hash": spec.hash, "grid_factor": spec.grid_factor(patch), "buckets": rows}
        return doc | {"rounding": rounding_notes(spec.dit)}
    return {"spec": spec.to_dict(), "hash": spec.hash, "buckets": table_rows(spec, patch)} | {
        "rounding": rounding_notes(spec)
    }


def rounding_notes(spec: BucketSpec) -> dict[str, object]:
    """Why a table has fewer buckets than `num_buckets` (neighbouring aspects that round to the same size are one
    bucket), and which sizes were rounded the other way to stay inside the aspect range (version 2)."""
    if spec.mode == "fit":
        return {"aspects": None, "buckets": None, "merged": 0, "kept_in_range": []}
    ratios = aspects(spec)
    kept = []
    for a in ratios:
        w, h = math.sqrt(spec.target_pixels * a), math.sqrt(spec.target_pixels / a)
        plain = Bucket(round_to_multiple(w, spec.multiple), round_to_multiple(h, spec.multiple))
        b = size_for_aspect(a, spec)
        if b != plain and b.name not in kept:
            kept.append(b.name)
    n = len(make_buckets(spec))
    return {"aspects": len(ratios), "buckets": n, "merged": len(ratios) - n, "kept_in_range": kept}


def table_for(
    area: int,
    multiple: int | None,
    min_ar: float,
    max_ar: float,
    num_buckets: int,
    patch: int,
    dit_scale: str | None = None,
    dit_token: int = 16,
    out: str | os.PathLike[str] | None = None,
) -> tuple[AnySpec, dict[str, object]]:
    """`dinofeat buckets`: the spec of these settings and its table document, also written to `out` (JSON) when
    given. BucketSpecError for settings that give no valid table; OSError when `out` cannot be written."""
    spec = spec_for(area, multiple, min_ar, max_ar, num_buckets, "list", patch, dit_scale, dit_token)
    doc = table_document(spec, patch)
    if out is not None:
        try:
            Path(out).write_text(json.dumps(doc, indent=2) + "\n")
        except OSError as e:
            raise OSError(f"cannot write {out}: {e.strerror or e}") from None
    return spec, doc
