"""Resize the whole image to its bucket (never crop), and the normalisation that runs later on the device."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_uint8(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The WHOLE RGB image to exactly (width, height): antialiased bilinear (PIL's triangle filter, whose
    support widens with the downscale factor). Returns HxWx3 uint8, the form shipped to the device."""
    if im.mode != "RGB":
        raise ValueError(f"expected RGB, got {im.mode}")
    if im.size != size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def normalize_np(u8: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
    """HxWx3 uint8 -> 3xHxW float32: (x/255 - mean) / std, computed as (x - 255 mean) / (255 std) in float32 with
    the same operations as `model.normalize_on_device`, so both give bit-identical input."""
    x = u8.astype(np.float32)
    m = np.asarray(mean, np.float32) * np.float32(255.0)
    s = np.asarray(std, np.float32) * np.float32(255.0)
    return np.ascontiguousarray(((x - m) / s).transpose(2, 0, 1))
