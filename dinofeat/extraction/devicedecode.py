"""JPEGs decoded and resized on the CUDA device (`--decode gpu`): past the CPU decoder for small models.

The split: a decode worker reads a JPEG's header (size, colour mode, EXIF orientation) and, when the device can take
it (an RGB or greyscale JPEG within the pixel limit), ships its bytes instead of pixels (`EncodedJpeg`). The main
process hands a batch's bytes to nvjpeg (torchvision's `decode_jpeg` on the device), turns each image upright
(`orient`, EXIF's eight orientations, as PIL's `exif_transpose`), resizes it to its bucket with the recipe's filter
(bilinear, antialiased, in float32: `resize_on_device`) and writes it into the batch. Any other file (PNG, WebP, CMYK,
16-bit) was decoded on the CPU by the worker as always, and a JPEG the device fails on is decoded on the CPU here.

The only importer of torchvision, and only on this path (it does not load beside the CPU torch of our test machine:
the device-side decode is tested with a CPU stand-in for nvjpeg, the rest of the path as it runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dinofeat.errors import ConfigError, ImageError
from dinofeat.images.decode import check_planned_size, open_image, orientation
from dinofeat.images.preprocess import load_resized
from dinofeat.images.recipe import Recipe
from dinofeat.sources.archive import Member, read_member

DEVICE_MODES = ("RGB", "L")  # what nvjpeg decodes as the CPU would; CMYK/YCCK JPEGs take the CPU path


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG's bytes and EXIF orientation (1-8), for the device to decode."""

    data: bytes
    orientation: int


def load_for_device(
    path: str | Member, size: tuple[int, int], recipe: Recipe, planned: tuple[int, int] | None = None
) -> np.ndarray | EncodedJpeg:
    """In a decode worker: the JPEG's bytes when the device can decode it, else the pixels as the CPU recipe makes
    them (HxWx3 uint8). Raises ImageError for a bad file, and ImageChangedError for an image whose size is not the
    `planned` one, as `load_resized` does."""
    with open_image(path, recipe.max_pixels, header_only=True) as im:
        if planned is not None:
            check_planned_size(im, planned)
        fits = im.format == "JPEG" and im.mode in DEVICE_MODES and getattr(im, "n_frames", 1) == 1
        turn = orientation(im) if fits else 1
    if not fits:
        return load_resized(path, size, recipe, planned)
    try:
        data = read_member(path) if isinstance(path, Member) else _read(path)
    except FileNotFoundError as e:
        raise ImageError(f"unreadable: {e}") from e
    return EncodedJpeg(data, turn)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# EXIF orientation -> how to make a [C, H, W] image upright (PIL's exif_transpose, in tensor terms)
_UPRIGHT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x,
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-1, -2),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-1, -2).flip(-1, -2),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


def orient(chw: torch.Tensor, turn: int) -> torch.Tensor:
    """A decoded [C, H, W] image as displayed (EXIF orientation `turn`; unknown values leave it as it is)."""
    return _UPRIGHT.get(turn, _UPRIGHT[1])(chw)


def resize_on_device(chw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] uint8 -> [h, w, 3] uint8 at `size` = (w, h): bilinear with antialiasing (the triangle filter widened
    by the downscale factor, as PIL's), in float32, rounded."""
    w, h = size
    x = chw[None].float()
    if (x.shape[-1], x.shape[-2]) != (w, h):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


Decode = Callable[[Sequence[bytes], torch.device], list[torch.Tensor]]
"""Decodes JPEG bytes to [3, H, W] uint8 tensors on the device (as stored: no orientation); raises if any fails."""


def nvjpeg(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched nvjpeg decode, RGB (greyscale expanded)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))


def decode_into(
    pixels: torch.Tensor,
    rows: dict[int, EncodedJpeg],
    size: tuple[int, int],
    recipe: Recipe,
    decode: Decode = nvjpeg,
) -> dict[int, str]:
    """Decode `rows` (batch row -> encoded JPEG) into `pixels` [B, H, W, 3] (on the device), upright and resized.
    A batch the device rejects is retried one image at a time; an image it still rejects is decoded on the CPU.
    Returns the rows that failed on the CPU too, with their reasons."""
    order = sorted(rows)
    try:
        images = decode([rows[r].data for r in order], pixels.device)
    except Exception:  # one bad image fails the whole nvjpeg batch: find it
        images = [_one(decode, rows[r].data, pixels.device) for r in order]
    failed: dict[int, str] = {}
    for r, chw in zip(order, images, strict=True):
        if chw is None:
            try:
                pixels[r] = torch.from_numpy(load_resized(rows[r].data, size, recipe)).to(pixels.device)
            except Exception as e:  # as in the workers: one bad file is a failed image, not the run's end
                failed[r] = str(e) if isinstance(e, ImageError) else f"decode error: {type(e).__name__}: {e}"
                pixels[r] = 0
            continue
        pixels[r] = resize_on_device(orient(chw, rows[r].orientation), size)
    return failed


def _one(decode: Decode, data: bytes, device: torch.device) -> torch.Tensor | None:
    try:
        return decode([data], device)[0]
    except Exception:
        return None


def check_device_decode(recipe: Recipe, device: torch.device) -> None:
    """ConfigError before any work when the recipe decodes on the GPU and this process cannot."""
    if recipe.decode != "gpu":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"--decode gpu decodes JPEGs with nvjpeg on a CUDA device; this run's device is {device.type} (a cache "
            "made with --decode gpu is extended on a CUDA machine)"
        )
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as e:
        raise ConfigError(f"--decode gpu needs torchvision (its nvjpeg decoder), which does not load here: {e}") from e
