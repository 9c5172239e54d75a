"""Issue 14's feature options end to end: chosen layers (against HF's output_hidden_states), features of the mirrored
image (against the model run on the mirror), the per-epoch flip coin through DataLoader workers, and the naming of
the arrays that hold them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dinofeat.cache.arrays import ArraySet, parse_layers
from dinofeat.errors import CacheMismatchError, ConfigError
from dinofeat.extraction.model import normalize_on_device
from dinofeat.extraction.run import extract
from dinofeat.images.preprocess import load_resized
from dinofeat.images.resize import IMAGENET_MEAN, IMAGENET_STD
from dinofeat.inspection.validate import validate
from dinofeat.read.collate import collate_features
from dinofeat.read.dataset import FeatureDataset
from dinofeat.read.flip import flip_coin
from dinofeat.read.reader import FeatureCache
from dinofeat.read.sampler import BucketBatchSampler
from tests.helpers import FAST, make_tiny, write_images


@pytest.mark.parametrize(
    ("spec", "num_layers", "want"),
    [
        ("-1", 12, (12,)),
        ("8,16,24", 24, (8, 16, 24)),
        ("24,8,-1,16", 24, (8, 16, 24)),  # sorted, -1 and 24 are the same block
        ("-2", 12, (11,)),
        ([1, 3], 4, (1, 3)),
        (" 2 , 4 ", 4, (2, 4)),
        ("-1", 0, (0,)),  # a block-less model: its only output
    ],
)
def test_parse_layers(spec, num_layers, want):
    assert parse_layers(spec, num_layers) == want


@pytest.mark.parametrize("spec", ["0", "13", "-13", "", "8;16", "a"])
def test_parse_layers_refuses(spec):
    with pytest.raises(ConfigError):
        parse_layers(spec, 12)


@pytest.mark.parametrize(
    ("arrays", "names"),
    [
        (ArraySet((12,)), ["cls", "patches"]),
        (ArraySet((12,), registers=True), ["cls", "patches", "registers"]),
        (ArraySet((12,), flip=True), ["cls", "patches", "cls_flip", "patches_flip"]),
        (ArraySet((4, 8)), ["cls_l4", "patches_l4", "cls", "patches"]),  # the deepest is the primary
        (
            ArraySet((4, 8), flip=True),
            ["cls_l4", "patches_l4", "cls", "patches", "cls_l4_flip", "patches_l4_flip", "cls_flip", "patches_flip"],
        ),
    ],
)
def test_array_names(arrays, names):
    assert arrays.names() == names
    assert arrays.copies == len(names) // len(arrays.bases)
    assert arrays.stat_names() == [n for n in names if not n.endswith("_flip") and not n.startswith("registers")]


def test_array_name_errors():
    a = ArraySet((4, 8))
    assert a.name("patches", 4) == "patches_l4"
    with pytest.raises(KeyError, match="layer 5 is not stored"):
        a.name("patches", 5)
    with pytest.raises(KeyError, match="--flip"):
        a.name("patches", flip=True)
    assert ArraySet.from_meta({"model": {"config": {"num_hidden_layers": 6}}, "registers_stored": 4}) == ArraySet(
        (6,), registers=True
    )


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    return make_tiny("dinov3", tmp_path_factory.mktemp("deep") / "m", num_hidden_layers=4)


def _hf_states(path: Path, u8: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """HF's output_hidden_states (index k = block k), the same with the model's final LayerNorm, last_hidden_state."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path)).eval()
    x = normalize_on_device(torch.from_numpy(u8.copy())[None], IMAGENET_MEAN, IMAGENET_STD, torch.float32)
    norm = model.norm if hasattr(model, "norm") else model.layernorm
    with torch.inference_mode():
        out = model(pixel_values=x, output_hidden_states=True)
        normed = [norm(h)[0].numpy() for h in out.hidden_states]
    return [h[0].numpy() for h in out.hidden_states], normed, out.last_hidden_state[0].numpy()


def _stored(cache: FeatureCache, key: str, name: str) -> np.ndarray:
    return cache.read(cache.index_of(key), name)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_layers_equal_hf_hidden_states(tmp_path, deep_model, layer_norm):
    """Blocks 1 and 3 of a 4-block model: each stored array is HF's output_hidden_states[k] (with the final
    LayerNorm applied when asked), and block 4 is never run (the model is cut after block 3)."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48), (48, 64)])
    cache = tmp_path / "c"
    extract(
        imgs, cache, model=str(deep_model), area=64, store_dtype="fp32", layers=(1, 3), layer_norm=layer_norm, **FAST
    )
    c = FeatureCache(cache)
    assert c.arrays.layers == (1, 3) and c.arrays.primary == 3
    for key in list(c.keys()):
        w, h = c.size(c.index_of(key))
        u8 = load_resized(str(imgs / key), (w, h), _recipe())
        states, normed, last = _hf_states(deep_model, u8)
        gh, gw = h // 16, w // 16
        for k, name in ((1, "_l1"), (3, "")):
            want = normed[k] if layer_norm else states[k]
            np.testing.assert_allclose(_stored(c, key, "cls" + name), want[0], rtol=0, atol=2e-5)
            np.testing.assert_allclose(
                _stored(c, key, "patches" + name), want[5:].reshape(gh, gw, -1), rtol=0, atol=2e-5
            )
        # block 3 is not the model's output: what a default cache stores differs from it
        assert not np.allclose(_stored(c, key, "patches"), last[5:].reshape(gh, gw, -1), atol=1e-3)
        f = c.get(key)
        assert set(f.layers) == {"cls_l1", "patches_l1"}
        assert c.get(key, layers=()).layers == {} and set(c.get(key, layers=(1,)).layers) == set(f.layers)
        with pytest.raises(KeyError, match="layer 2 is not stored"):
            c.get(key, layers=(2,))
        np.testing.assert_array_equal(f.layers["patches_l1"], _stored(c, key, "patches_l1"))
    assert validate(cache).ok


def _recipe():
    from dinofeat.images.recipe import Recipe

    return Recipe()


def test_last_layer_through_hooks_equals_the_default(tmp_path, deep_model):
    """--layers 2,-1 stores the last block through a hook + the final norm: bit-equal to last_hidden_state."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48), (48, 64), (64, 64)])
    extract(imgs, tmp_path / "a", model=str(deep_model), area=64, store_dtype="fp32", **FAST)
    extract(imgs, tmp_path / "b", model=str(deep_model), area=64, store_dtype="fp32", layers="2,-1", **FAST)
    a, b = FeatureCache(tmp_path / "a"), FeatureCache(tmp_path / "b")
    for key in list(a.keys()):
        np.testing.assert_allclose(_stored(b, key, "patches"), _stored(a, key, "patches"), rtol=0, atol=1e-6)
    assert "patches_l2" in b.arrays.names() and "patches_l2" not in a.arrays.names()


def test_layer_list_is_in_the_fingerprint(tmp_path, deep_model):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48), (48, 64)])
    extract(imgs, tmp_path / "c", model=str(deep_model), area=64, layers=(1, 4), **FAST)
    for other in ({"layers": (2, 4)}, {"layers": (4,)}, {"layers": (1, 4), "layer_norm": False}, {"flip": True}):
        with pytest.raises(CacheMismatchError, match="features"):
            extract(imgs, tmp_path / "c", model=str(deep_model), area=64, **{"layers": (1, 4), **other, **FAST})
    s = extract(imgs, tmp_path / "c", model=str(deep_model), area=64, layers="1,-1", **FAST)  # same blocks: resumes
    assert s.sealed and s.processed == 0


def test_default_fingerprint_has_no_features_entry(tmp_path, dinov3_path):
    """A default run's fingerprint is the one dinofeat 0.3 wrote, so existing caches still resume."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)])
    extract(imgs, tmp_path / "c", model=str(dinov3_path), area=64, **FAST)
    c = FeatureCache(tmp_path / "c")
    assert "features" not in c.meta["fingerprint"]
    assert c.meta["arrays"]["names"] == ["cls", "patches"]


@pytest.fixture(scope="module")
def flip_cache(tmp_path_factory, deep_model) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("flip")
    imgs = root / "imgs"
    write_images(imgs, [(64, 48)] * 3 + [(48, 64)] * 3 + [(64, 64)] * 2)
    extract(
        imgs,
        root / "c",
        model=str(deep_model),
        area=64,
        store_dtype="fp32",
        flip=True,
        layers="2,-1",
        keep_registers=True,
        **FAST,
    )
    return imgs, root / "c"


def test_flipped_features_are_the_model_on_the_mirrored_image(flip_cache, deep_model):
    imgs, cache = flip_cache
    c = FeatureCache(cache)
    assert c.arrays.flip and "patches_flip" in c.arrays.names() and "patches_l2_flip" in c.arrays.names()
    for key in list(c.keys()):
        w, h = c.size(c.index_of(key))
        u8 = load_resized(str(imgs / key), (w, h), _recipe())
        _, normed, last = _hf_states(deep_model, u8[:, ::-1])  # the mirrored image, run through HF
        gh, gw = h // 16, w // 16
        flipped = _stored(c, key, "patches_flip")
        np.testing.assert_allclose(flipped, last[5:].reshape(gh, gw, -1), rtol=0, atol=2e-5)
        np.testing.assert_allclose(_stored(c, key, "cls_flip"), last[0], rtol=0, atol=2e-5)
        np.testing.assert_allclose(_stored(c, key, "registers_flip"), last[1:5], rtol=0, atol=2e-5)
        l2 = normed[2][5:].reshape(gh, gw, -1)
        np.testing.assert_allclose(_stored(c, key, "patches_l2_flip"), l2, rtol=0, atol=2e-5)
        # DINO is not flip-equivariant: mirroring the original grid is not the mirrored image's features
        mirrored_grid = _stored(c, key, "patches")[:, ::-1]
        assert np.abs(flipped - mirrored_grid).max() > 0.05
        f = c.get(key, flip=True)
        assert (
            f.flipped
            and np.array_equal(f.patches, flipped)
            and np.array_equal(f.layers["patches_l2"], _stored(c, key, "patches_l2_flip"))
        )


def test_flip_statistics_pool_both_variants(flip_cache):
    _, cache = flip_cache
    c = FeatureCache(cache)
    for name in ("cls", "patches", "cls_l2", "patches_l2"):
        rows = [c.read(i, v) for i in range(len(c)) for v in (name, name + "_flip")]
        x = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows]).astype(np.float64)
        mean, std = c.channel_stats[name]
        np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std, x.std(0), rtol=1e-5, atol=1e-6)
    assert set(c.channel_stats) == {"cls", "patches", "cls_l2", "patches_l2"}


@pytest.mark.parametrize(("seed", "epoch"), [(0, 0), (0, 1), (1, 0), (7, 3)])
def test_flip_coin_is_a_pure_fair_function(seed, epoch):
    keys = [f"img_{i}.jpg" for i in range(2000)]
    coins = [flip_coin(seed, epoch, k) for k in keys]
    assert coins == [flip_coin(seed, epoch, k) for k in keys]
    assert 0.45 < np.mean(coins) < 0.55
    other = [flip_coin(seed + 1, epoch, k) for k in keys]
    assert 0.4 < np.mean(np.array(coins) != np.array(other)) < 0.6  # a new seed is a new draw


def test_dataset_flip_modes(flip_cache):
    _, cache = flip_cache
    c = FeatureCache(cache)
    for mode, want in ((False, False), (True, True)):
        ds = FeatureDataset(c, flip=mode)
        for i in range(len(ds)):
            s = ds[i]
            assert s["flipped"] is want
            name = "patches_flip" if want else "patches"
            np.testing.assert_array_equal(s["patches"].numpy(), c.read(i, name))
    with pytest.raises(ConfigError, match="flip"):
        FeatureDataset(c, flip="sometimes")
    with pytest.raises(ConfigError, match="layer 3 is not stored"):
        FeatureDataset(c, layers=(3,))


def test_random_flip_reaches_persistent_workers_per_epoch(flip_cache):
    """2 persistent DataLoader workers: each epoch's samples follow flip_coin(seed, epoch, key) exactly, and the
    features served are the variant the coin named."""
    _, cache = flip_cache
    ds = FeatureDataset(cache, flip="random", seed=5, normalize=True)
    sampler = BucketBatchSampler(ds.bucket_ids, batch_size=2, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_features, num_workers=2, persistent_workers=True)
    raw = FeatureCache(cache)
    mean, std = raw.channel_stats["patches"]
    seen = set()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        for batch in loader:
            for key, flipped, patches in zip(batch["key"], batch["flipped"].tolist(), batch["patches"], strict=True):
                assert flipped == flip_coin(5, epoch, key), (epoch, key)
                stored = raw.read(raw.index_of(key), "patches_flip" if flipped else "patches")
                want = (stored.reshape(-1, stored.shape[-1]) - mean) / np.maximum(std, 1e-6)
                np.testing.assert_allclose(patches.numpy(), want, rtol=1e-5, atol=1e-5)
                seen.add((key, flipped))
            assert batch["patches_l2"].shape == batch["patches"].shape
    assert {f for _, f in seen} == {False, True}


def test_validate_recomputes_every_layer_and_variant(flip_cache):
    imgs, cache = flip_cache
    report = validate(cache, images=str(imgs), recompute=2)
    assert report.ok, report.problems
    assert report.checked["recomputed"] == 2


def test_non_default_feature_sets_are_format_4_which_older_readers_refuse(
    flip_cache, tmp_path, dinov3_path, monkeypatch
):
    """A cache whose `patches` is not the last block of the image must not be served by a reader that does not know
    `metadata.arrays` (dinofeat <= 0.3 read versions 1-3); default caches stay version 3."""
    from dinofeat.cache import metafile, store
    from dinofeat.errors import CacheFormatError

    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)])
    extract(imgs, tmp_path / "plain", model=str(dinov3_path), area=64, keep_registers=True, **FAST)
    assert store.Store(tmp_path / "plain").format_version == 3
    extract(imgs, tmp_path / "early", model=str(dinov3_path), area=64, layers="1", **FAST)
    assert store.Store(tmp_path / "early").format_version == 4
    assert store.Store(flip_cache[1]).format_version == 4
    monkeypatch.setattr(metafile, "READABLE_VERSIONS", (1, 2, 3))  # what dinofeat 0.3 shipped
    store.Store(tmp_path / "plain")
    for cache in (tmp_path / "early", flip_cache[1]):
        with pytest.raises(CacheFormatError, match="format version 4"):
            store.Store(cache)
