"""decode + resize for one image: the work DataLoader workers do. Output stays uint8 (4x less to ship)."""

from __future__ import annotations

import numpy as np

from dinofeat.images.decode import ImageSource, decode_rgb
from dinofeat.images.recipe import Recipe
from dinofeat.images.resize import resize_uint8

DEFAULT_RECIPE = Recipe()


def load_resized(
    path: ImageSource, size: tuple[int, int], recipe: Recipe = DEFAULT_RECIPE, planned: tuple[int, int] | None = None
) -> np.ndarray:
    """HxWx3 uint8 of the whole image resized to `size` = (width, height). Raises ImageError for a bad file, and
    ImageChangedError when `planned` (the displayed size its bucket was chosen for) is not the image's size now."""
    im = decode_rgb(
        path,
        draft_size=(size[0] * recipe.jpeg_draft, size[1] * recipe.jpeg_draft) if recipe.jpeg_draft else None,
        max_pixels=recipe.max_pixels,
        background=recipe.background,
        planned=planned,
    )
    return resize_uint8(im, size)
