"""Real photographs through the whole default pipeline (issue 11): stored features equal DINO's features of the
documented recipe computed independently (full decode, float64 antialiased bilinear, ImageNet normalisation), and a
cache made with dinofeat 0.1's draft default is refused by name instead of being extended with other pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinofeat.cache.store import Store
from dinofeat.errors import CacheMismatchError
from dinofeat.extraction.run import extract
from dinofeat.images.decode import decode_rgb
from dinofeat.images.recipe import Recipe
from dinofeat.images.resize import IMAGENET_MEAN, IMAGENET_STD
from dinofeat.read.reader import FeatureCache
from tests.helpers import FAST, real_photos

NAMES = ("text.png", "rocket.jpg", "brick.png", "camera.png", "motorcycle_left.png", "retina.jpg")


def _reference_patches(model, u8: np.ndarray, size: tuple[int, int], registers: int, patch: int) -> np.ndarray:
    x = torch.from_numpy(np.array(u8)).permute(2, 0, 1)[None].double() / 255.0
    x = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bilinear", antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).double()) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        h = model(pixel_values=x.float()).last_hidden_state[0, 1 + registers :]
    return h.reshape(size[1] // patch, size[0] // patch, -1).numpy()


@pytest.mark.parametrize("kind", ["dinov3", "dinov2"])
def test_default_features_match_full_decode_reference(tmp_path, tiny_models, kind):
    from transformers import AutoModel

    path = tiny_models[kind]
    model = AutoModel.from_pretrained(path).eval()
    patch, registers = model.config.patch_size, getattr(model.config, "num_register_tokens", 0)
    imgs = tmp_path / "photos"
    photos = real_photos(imgs, NAMES)
    area = 16 * patch  # buckets of ~224-256 px: the photos are 1.7x to 6x the bucket side
    extract(imgs, tmp_path / "c", model=str(path), area=area, store_dtype="fp32", **FAST)
    fc = FeatureCache(tmp_path / "c")
    worst = 1.0
    for p in photos:
        f = fc[p.name]
        ref = _reference_patches(model, np.asarray(decode_rgb(p)), f.bucket, registers, patch)
        a, b = f.patches.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        worst = min(worst, float(cos.min()))
    assert worst >= 0.99, worst


def test_cache_of_the_old_draft_default_is_refused_by_name(tmp_path, dinov3_path):
    imgs = tmp_path / "photos"
    real_photos(imgs, ("rocket.jpg", "text.png"))
    kw = {**FAST, "model": str(dinov3_path), "area": 64}
    old, exact = tmp_path / "old", tmp_path / "exact"
    for cache, draft in ((old, True), (exact, False)):  # what dinofeat 0.1 wrote: a bool
        extract(imgs, cache, recipe=Recipe(jpeg_draft=int(draft)), limit=1, **kw)
        st = Store(cache, mode="r+")
        fp = st.meta["fingerprint"]
        st.metafile.update(fingerprint={**fp, "recipe": {**fp["recipe"], "jpeg_draft": draft}})
    with pytest.raises(CacheMismatchError, match=r"recipe\.jpeg_draft: cache has True, this run wants 0") as e:
        extract(imgs, old, recipe=Recipe(), limit=1, **kw)  # today's exact decoding, asked for
    assert "--overwrite" in str(e.value) and "--draft-gap 1" in str(e.value)
    assert extract(imgs, old, recipe=Recipe(jpeg_draft=1), limit=1, **kw).done == 1  # the old recipe resumes
    rerun = extract(imgs, old, limit=1, **kw)  # a rerun that names no recipe finishes the cache with its own
    assert rerun.processed == 0 and rerun.inherited["recipe"].jpeg_draft == 1
    assert extract(imgs, exact, limit=1, **kw).processed == 0  # 0.1's --no-jpeg-draft is today's default
