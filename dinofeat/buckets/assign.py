"""Assigning an image to a size: nearest bucket in log aspect ratio, or a per-image fit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dinofeat.buckets.spec import AnySpec, BucketSpec, TiedSpec
from dinofeat.buckets.table import Bucket, make_buckets, size_for_aspect

_TIE_DIGITS = 12  # distances equal to 12 decimals are ties, broken by the lower bucket index


@dataclass(frozen=True)
class Assignment:
    bucket: Bucket
    index: int  # position in the spec's bucket list; -1 in fit mode
    distortion: float  # |log(bucket AR / image AR)|: how much the resize stretches the image


def log_distortion(bucket: Bucket, width: int, height: int) -> float:
    return abs(math.log(bucket.aspect) - math.log(width / height))


def nearest_bucket(buckets: Sequence[Bucket], width: int, height: int) -> Assignment:
    """The bucket nearest in log aspect ratio; exact ties go to the lower index, so results are reproducible."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("empty bucket list")
    best = min(range(len(buckets)), key=lambda i: (round(log_distortion(buckets[i], width, height), _TIE_DIGITS), i))
    b = buckets[best]
    return Assignment(b, best, log_distortion(b, width, height))


def fit_size(spec: BucketSpec, width: int, height: int) -> Assignment:
    """Keep the aspect ratio (clamped to the spec's range), fit the target area, round each side to the multiple."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = min(max(width / height, spec.min_ar), spec.max_ar)
    b = size_for_aspect(aspect, spec)
    return Assignment(b, -1, log_distortion(b, width, height))


def assign(spec: AnySpec, width: int, height: int) -> Assignment:
    """Dispatch on the spec's mode. A TiedSpec assigns on the DiT side and returns the tied DINO bucket (same
    aspect ratio, so the same distortion); `assign(spec.dit, ...)` gives the DiT bucket of the same image."""
    if isinstance(spec, TiedSpec):
        a = assign(spec.dit, width, height)
        return Assignment(Bucket(*spec.dino_size(a.bucket.width, a.bucket.height)), a.index, a.distortion)
    if spec.mode == "fit":
        return fit_size(spec, width, height)
    return nearest_bucket(make_buckets(spec), width, height)
