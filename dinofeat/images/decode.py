"""Decode one file to an RGB PIL image, the way every later stage expects it.

EXIF orientation is applied; alpha is composited on `BACKGROUND`; 16-bit data is scaled, not clipped; animated
and multipage files give their first frame. Large JPEGs can be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any, NoReturn

import numpy as np
from PIL import Image, ImageFile, ImageOps

from dinofeat.errors import CHANGED_SINCE_PLANNED, ImageChangedError, ImageError
from dinofeat.sources.archive import Member, header_reader, read_member

BACKGROUND = (255, 255, 255)  # alpha is composited on white: documented in docs/format.md (recipe.background)
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb threshold; ours fails cleanly instead of warning

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failed image, not a grey-bottomed one
ROTATING = {5, 6, 7, 8}  # EXIF orientations that swap width and height


ImageSource = str | os.PathLike[str] | Member | bytes  # a file, an archive member, or a file's bytes already read


def open_image(path: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, header_only: bool = False) -> Image.Image:
    """Open lazily (header only) and refuse bombs before any pixel is decoded. An archive member is read whole into
    memory, or, with `header_only`, only as far as the header parser asks."""
    try:
        if isinstance(path, bytes):
            size = len(path)
        else:
            size = path.size if isinstance(path, Member) else os.path.getsize(path)
        if size == 0:
            raise ImageError("empty file")
        if isinstance(path, bytes):
            src: Any = io.BytesIO(path)
        elif isinstance(path, Member):
            src = header_reader(path) if header_only else io.BytesIO(read_member(path))
        else:
            src = path
    except Exception as e:
        _raise_as_image_error(e)
    return open_header(src, max_pixels)


def open_header(src: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """PIL's lazy open of a path or a binary file object (read from where it stands), with open_image's errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src)
    except Exception as e:
        _raise_as_image_error(e)
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise ImageError(f"invalid size {w}x{h}")
    if w * h > max_pixels:
        im.close()
        raise ImageError(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    return im


def _raise_as_image_error(e: Exception) -> NoReturn:
    """Raise what a failure to open an image is recorded as (an unexpected error as it is)."""
    if isinstance(e, ImageError):
        raise e
    if isinstance(e, Image.DecompressionBombError):
        raise ImageError(f"decompression bomb: {e}") from e
    if isinstance(e, Image.UnidentifiedImageError):
        raise ImageError("not an image (unidentified format)") from e
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
        raise ImageError(f"unreadable: {e}") from e
    if isinstance(e, OSError | SyntaxError | ValueError | EOFError):  # header parse failures: damaged file
        raise ImageError(f"corrupt or truncated: {e}") from e
    raise e


def orientation(im: Image.Image) -> int:
    """EXIF orientation (1..8), read from the already-parsed header; 1 when absent or invalid.

    PNG: only an eXIf chunk before the pixel data counts (where encoders put it, and where PIL finds it while
    parsing the header). PIL's PNG `getexif()` would otherwise decode the whole image to look for one after it,
    which made every PNG probe a full decode."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF must not fail an otherwise good image
        return 1
    return value if 1 <= value <= 8 else 1


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF rotation."""
    w, h = im.size
    return (h, w) if orientation(im) in ROTATING else (w, h)


def to_rgb(im: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any PIL mode to 8-bit RGB (pixels must already be loaded or loadable)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        a8 = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255, linear
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "F":
        a8 = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def check_planned_size(im: Image.Image, planned: tuple[int, int]) -> None:
    """ImageChangedError unless the header gives the (width, height) the image was planned with, computed as the
    probe computes it (`oriented_size`, before any pixel is decoded), so an unchanged image always passes."""
    w, h = oriented_size(im)
    if (w, h) != (int(planned[0]), int(planned[1])):
        raise ImageChangedError(f"{CHANGED_SINCE_PLANNED}: now {w}x{h}, planned as {planned[0]}x{planned[1]}")


def decode_rgb(
    path: ImageSource,
    draft_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = BACKGROUND,
    planned: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode the first frame to upright RGB.

    `draft_size` is the smallest (width, height), as displayed, the decoded image may have. For JPEGs at least twice
    that size, PIL's draft mode decodes at a reduced DCT scale that is still >= it on both sides. None (the
    default recipe) decodes in full. `planned`: the displayed size the plan recorded; an image whose header says
    otherwise (replaced since it was planned) raises ImageChangedError before its pixels are decoded.
    """
    im = open_image(path, max_pixels)
    try:
        if planned is not None:
            check_planned_size(im, planned)
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        if draft_size is not None and im.format == "JPEG":
            tw, th = draft_size
            if orientation(im) in ROTATING:
                tw, th = th, tw
            im.draft("RGB", (tw, th))
        im.load()
        upright = ImageOps.exif_transpose(im)
        return to_rgb(upright if upright is not None else im, background)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated: {e}") from e
    finally:
        im.close()
