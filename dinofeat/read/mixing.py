"""The arithmetic of a mix of caches, pure: how many samples of each cache and bucket an epoch holds, which images
fill them in a given epoch, and the channel statistics of the mix.

The counts never depend on the epoch (so a mix's bucket of each sample index is fixed and BucketBatchSampler deals
it exactly as it deals one cache); only which images fill the fractional part of a weight changes, per epoch.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Sequence
from fractions import Fraction
from numbers import Real

import numpy as np

from dinofeat.errors import ConfigError


def parse_weights(weights: Sequence[float | int | Fraction] | None, n: int) -> tuple[Fraction, ...]:
    """One exact weight per cache (None: all 1). Floats are read as the decimal they print as (0.1 is 1/10), so
    `weight * images` rounds as written, not as its binary approximation."""
    if weights is None:
        return (Fraction(1),) * n
    if len(weights) != n:
        raise ConfigError(f"weights has {len(weights)} entries for {n} caches: give one per cache")
    out = []
    for w in weights:
        w = w.item() if hasattr(w, "item") and getattr(w, "ndim", None) == 0 else w  # numpy and torch scalars
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w) or not 0 < w <= MAX_WEIGHT:
            raise ConfigError(f"a cache's weight must be a finite number > 0 and at most {MAX_WEIGHT}, got {w!r}")
        out.append(w if isinstance(w, Fraction) else Fraction(w) if isinstance(w, int) else Fraction(str(float(w))))
    return tuple(out)


MAX_WEIGHT = 10**6  # a repeat count beyond this is a typo, and would make an epoch too large to index


def cache_samples(weight: Fraction, images: int) -> int:
    """Samples of a cache of `images` images per epoch: weight * images, rounded half up."""
    return math.floor(weight * images + Fraction(1, 2))


def least_weight(images: int) -> str:
    """The smallest weight, written as a decimal of 6 significant digits rounded up, that gives a cache of `images`
    images a sample per epoch (round(w * n) >= 1, half up: w >= 1 / 2n): what a refusal can advise and be taken
    at its word (1/12 printed as 0.0833333 is below 1/12 and would be refused again)."""
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.rounding = 6, decimal.ROUND_CEILING
        return format(+(decimal.Decimal(1) / (2 * max(images, 1))), "g")


def apportion(weight: Fraction, counts: Sequence[int]) -> list[int]:
    """Samples per epoch of each bucket of one cache (images per bucket in `counts`): floor(weight * n_b), then the
    buckets with the largest remainders (ties: the earlier bucket) get one more until the cache's total is
    `cache_samples(weight, sum(counts))`. An integer weight r gives exactly r * n_b."""
    exact = [weight * n for n in counts]
    out = [math.floor(x) for x in exact]
    left = cache_samples(weight, sum(counts)) - sum(out)
    for b in sorted(range(len(counts)), key=lambda b: (-(exact[b] - out[b]), b))[:left]:
        out[b] += 1
    return out


def extra_draw(images: int, slots: int, seed: int, epoch: int, cache: int, bucket: int) -> np.ndarray:
    """Which images of a cache's bucket take its `slots % images` slots beyond the whole repeats in this epoch:
    distinct, a seeded choice per (seed, epoch, cache, bucket), the same in every process."""
    rng = np.random.default_rng([seed, epoch, cache, bucket])
    return rng.permutation(images)[: slots % images]


def fill(images: int, slots: int, j: int, draw: np.ndarray) -> int:
    """The image (0..images-1) in slot j of a bucket: slots below q * images (q = slots // images) hold every image
    q times; the rest hold `draw`, this epoch's extra images."""
    whole = slots // images * images
    return j % images if j < whole else int(draw[j - whole])


def pooled_stats(
    stats: Sequence[dict[str, dict[str, Sequence[float]]]], weights: Sequence[Fraction]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, std) of the mix, from each cache's recorded {'cls' | 'patches': {count, mean, std}}: the
    population statistics of all their vectors, each cache's counted `weight` times (as an epoch serves them)."""
    out = {}
    for name in stats[0]:
        n = np.array([float(s[name]["count"] * w) for s, w in zip(stats, weights, strict=True)])
        means = np.array([s[name]["mean"] for s in stats], np.float64)
        var = np.array([s[name]["std"] for s in stats], np.float64) ** 2
        share = n[:, None] / n.sum()
        mean = (share * means).sum(0)
        std = np.sqrt((share * (var + (means - mean) ** 2)).sum(0))
        out[name] = (mean.astype(np.float32), std.astype(np.float32))
    return out
