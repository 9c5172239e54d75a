"""The preprocessing recipe: how an image's pixels become model input. Recorded in every cache (its metadata and
fingerprint), so a rerun or `validate --recompute` uses exactly the pixels the cache was made from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dinofeat.errors import ConfigError
from dinofeat.images.decode import BACKGROUND, DEFAULT_MAX_PIXELS
from dinofeat.images.resize import IMAGENET_MEAN, IMAGENET_STD

DECODERS = ("cpu", "gpu")


@dataclass(frozen=True)
class Recipe:
    """How pixels become model input: whole image -> bucket size (no crop) -> x/255 -> (x - mean) / std.

    `jpeg_draft` = 0 (the default) decodes every JPEG in full, so the pixels are the reference recipe's (within 1
    grey level). k >= 1 is a speed option: JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, as far as
    the remaining resize still downsamples by at least k. That changes pixels near hard edges (measured bounds in
    docs/format.md); 1 is what dinofeat 0.1 did by default (stored then as `true`, which equals 1).

    `decode` = "gpu" decodes RGB and greyscale JPEGs on the CUDA device (nvjpeg, through torchvision) and resizes
    them there (bilinear, antialiased: the same filter in float32); every other file, and any JPEG the device cannot
    decode, takes the CPU path. A speed option for small models, whose pixels differ slightly from the CPU's
    (measured bounds in docs/format.md). Recorded only when not "cpu", so caches made before it keep their
    fingerprint.
    """

    resample: str = "bilinear-antialias"
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    background: tuple[int, int, int] = BACKGROUND
    jpeg_draft: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.jpeg_draft, bool) or not isinstance(self.jpeg_draft, int) or self.jpeg_draft < 0:
            raise ConfigError(f"jpeg_draft must be 0 (exact decoding) or a reduction gap >= 1, got {self.jpeg_draft!r}")
        if self.decode not in DECODERS:
            raise ConfigError(f"decode must be one of {', '.join(DECODERS)}, got {self.decode!r}")
        if self.decode == "gpu" and self.jpeg_draft:
            raise ConfigError(
                "--jpeg-draft is a CPU decoding option; --decode gpu decodes JPEGs in full on the device: give one"
            )

    @classmethod
    def from_options(cls, jpeg_draft: bool = False, draft_gap: int | None = None, decode: str = "cpu") -> Recipe:
        """The recipe of the CLI's --jpeg-draft / --draft-gap / --decode: a gap without --jpeg-draft, or a gap below
        1, is refused instead of silently meaning exact decoding."""
        if draft_gap is not None and not jpeg_draft:
            raise ConfigError("--draft-gap applies only with --jpeg-draft (JPEGs are decoded exactly without it)")
        gap = 2 if draft_gap is None else draft_gap
        if jpeg_draft and gap < 1:
            raise ConfigError(
                f"--draft-gap must be >= 1 (the resize after the DCT reduction shrinks by >= it), got {gap}"
            )
        return cls(jpeg_draft=gap if jpeg_draft else 0, decode=decode)

    def to_dict(self) -> dict[str, Any]:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        if d["decode"] == "cpu":
            del d["decode"]  # the recipe of every cache made before --decode: their fingerprints stay equal
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        d["jpeg_draft"] = int(d.get("jpeg_draft", 0))  # caches of dinofeat 0.1 stored a bool (true = gap 1)
        return cls(**d)
