"""DINO buckets tied to a DiT's: the tables (pure), the alignment DiT token (i, j) -> DINO patch (i // k, j // k)
through the real pipeline, and the JSON that `dinofeat buckets --out` writes and `precompute --bucket-spec` reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dinofeat.buckets import (
    BucketSpec,
    BucketSpecError,
    TiedSpec,
    assign,
    load_spec,
    make_buckets,
    min_tied_multiple,
    table_document,
)
from dinofeat.cli import app
from dinofeat.errors import ConfigError
from dinofeat.extraction.run import extract
from dinofeat.read.reader import FeatureCache
from tests.helpers import FAST, make_tiny, write_images

VALID = [
    # dit area, dit multiple, scale, dit token, DINO patch -> k
    (1024, 32, "1/2", 16, 16, 2),  # the example: f8 VAE x DiT patch 2, DINO at half resolution
    (1024, 16, "1", 16, 16, 1),  # same resolution, one token per patch
    (512, 64, "1/4", 16, 16, 4),
    (1024, 48, "2/3", 8, 16, 3),
    (896, 28, "1/2", 14, 14, 2),  # DINOv2's patch 14
    (768, 64, "1/2", 8, 16, 4),  # f8 VAE x DiT patch 1
]


@pytest.mark.parametrize(("area", "multiple", "scale", "token", "patch", "k"), VALID)
def test_tied_tables_align(area, multiple, scale, token, patch, k):
    spec = TiedSpec(BucketSpec(area, multiple), scale, token)
    assert spec.grid_factor(patch) == k
    dit, dino = make_buckets(spec.dit), make_buckets(spec)
    assert len(dit) == len(dino)
    for a, b in zip(dit, dino, strict=True):
        assert (b.width, b.height) == spec.dino_size(a.width, a.height)
        assert b.width * spec.ratio.denominator == a.width * spec.ratio.numerator  # exact scale
        assert math.isclose(a.aspect, b.aspect)
        th, tw = a.grid(token)
        gh, gw = b.grid(patch)  # raises unless DINO sides are multiples of the patch
        assert (th, tw) == (k * gh, k * gw)  # the DiT token grid is k x the DINO grid
    rows = table_document(spec, patch)["buckets"]
    assert [(r["dit"]["width"], r["dino"]["width"]) for r in rows] == [
        (a.width, b.width) for a, b in zip(dit, dino, strict=True)
    ]


@pytest.mark.parametrize(
    ("multiple", "scale", "token", "patch", "match"),
    [
        (64, "3/4", 16, 16, "not a whole number"),  # k = 4/3
        (24, "1/2", 16, 16, "multiple of the DiT token"),
        (32, "1/3", 16, 16, "whole pixel count"),
        (16, "1/2", 16, 16, "not multiples of the patch"),  # DINO sides 8k: use multiple 32
        (32, "-1/2", 16, 16, "positive"),
        (32, "half", 16, 16, "fraction"),
    ],
)
def test_tied_specs_that_cannot_align_are_refused(multiple, scale, token, patch, match):
    with pytest.raises(BucketSpecError, match=match):
        TiedSpec(BucketSpec(1024, multiple), scale, token).grid_factor(patch)


@pytest.mark.parametrize(
    ("patch", "scale", "token", "want"),
    [(16, "1/2", 16, 32), (16, "1", 16, 16), (16, "1/4", 16, 64), (14, "1/2", 14, 28), (16, "2/3", 8, 24)],
)
def test_min_tied_multiple(patch, scale, token, want):
    from fractions import Fraction

    m = min_tied_multiple(patch, Fraction(scale), token)
    assert m == want
    TiedSpec(BucketSpec(1024, m), scale, token).grid_factor(patch)  # aligns
    for smaller in range(1, m):  # and nothing smaller does
        with pytest.raises(BucketSpecError):
            TiedSpec(BucketSpec(1024, smaller), scale, token).grid_factor(patch)


@pytest.mark.parametrize("mode", ["list", "fit"])
def test_an_image_lands_in_the_same_aspect_bucket_on_both_sides(mode):
    spec = TiedSpec(BucketSpec(512, 32, mode=mode), "1/2", 16)
    rng = np.random.default_rng(0)
    for w, h in rng.integers(16, 4000, (500, 2)):
        a, b = assign(spec.dit, int(w), int(h)), assign(spec, int(w), int(h))
        assert (b.bucket.width, b.bucket.height) == spec.dino_size(a.bucket.width, a.bucket.height)
        assert a.index == b.index and a.distortion == b.distortion


def test_spec_round_trip_and_canonical_scale():
    a = TiedSpec(BucketSpec(1024, 32), "2/4", 16)
    assert a.scale == "1/2" and a == TiedSpec(BucketSpec(1024, 32), "0.5", 16)
    assert load_spec(a.to_dict()) == a and load_spec(json.loads(json.dumps(table_document(a, 16)))) == a
    assert a.hash == TiedSpec(BucketSpec(1024, 32), "1/2", 16).hash != TiedSpec(BucketSpec(1024, 32), "1/2", 8).hash
    plain = BucketSpec(512, 16)
    assert load_spec(plain.to_dict()) == plain and a.hash != plain.hash


def _perturbed_tokens(folder: Path, size: tuple[int, int], token: int, margin: int) -> dict[str, tuple[int, int]]:
    """One image per DiT token (i, j), differing from a base image only inside that token's region (less a margin
    the resize filter's reach): key -> (i, j). Plus the base image itself."""
    w, h = size
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    folder.mkdir(parents=True)
    Image.fromarray(base).save(folder / "base.png")
    out = {}
    for i in range(h // token):
        for j in range(w // token):
            x = base.copy()
            y0, x0 = i * token + margin, j * token + margin
            x[y0 : y0 + token - 2 * margin, x0 : x0 + token - 2 * margin] ^= 0xFF
            Image.fromarray(x).save(folder / f"t_{i:02d}_{j:02d}.png")
            out[f"t_{i:02d}_{j:02d}.png"] = (i, j)
    return out


def test_dit_token_lies_in_dino_patch_i_div_k(tmp_path):
    """A block-less model makes each patch token a function of its own pixels. An image at the DiT bucket's size
    (192x96: 6x12 DiT tokens of 16 px) is cached at half size (96x48: 3x6 DINO patches, k = 2). Changing DiT token
    (i, j) changes exactly DINO patch (i // k, j // k), for every one of the 72 tokens."""
    model = make_tiny("dinov3", tmp_path / "noattn", num_hidden_layers=0)
    tokens = _perturbed_tokens(tmp_path / "imgs", (192, 96), 16, margin=2)
    cache = tmp_path / "c"
    s = extract(
        tmp_path / "imgs", cache, model=str(model), area=128, dit_scale="1/2", num_buckets=5, store_dtype="fp32", **FAST
    )
    assert s.done == len(tokens) + 1
    c = FeatureCache(cache)
    k = c.grid_factor
    assert k == 2 and isinstance(c.bucket_spec, TiedSpec)
    base = c["base.png"].patches
    assert base.shape[:2] == (3, 6)
    for key, (i, j) in tokens.items():
        pos = c.index_of(key)
        assert c.dit_size(pos) == (192, 96) and c.size(pos) == (96, 48)
        changed = np.argwhere(np.abs(c[key].patches - base).max(-1) > 0)
        assert changed.tolist() == [[i // k, j // k]], (key, changed.tolist())


def test_buckets_out_feeds_precompute(tmp_path, dinov3_path):
    """`dinofeat buckets --out` writes the JSON the DiT side loads; `precompute --bucket-spec` builds the same
    buckets from it, and the cache records every image's DiT bucket from that table."""
    spec_file = tmp_path / "buckets.json"
    r = CliRunner().invoke(
        app, ["buckets", "--area", "128", "--dit-scale", "1/2", "--num-buckets", "5", "--out", str(spec_file)]
    )
    assert r.exit_code == 0, r.output
    assert "DINO W x H" in r.output and "k = 2" in r.output
    doc = json.loads(spec_file.read_text())
    imgs = tmp_path / "imgs"
    write_images(imgs, [(200, 100), (100, 200), (120, 120), (300, 90)])
    r = CliRunner().invoke(
        app,
        [
            *("precompute", str(imgs), str(tmp_path / "c"), "--model", str(dinov3_path)),
            *("--bucket-spec", str(spec_file), "--device", "cpu", "--dtype", "fp32", "--workers", "0", "--json"),
        ],
    )
    assert r.exit_code == 0, r.output
    c = FeatureCache(tmp_path / "c")
    assert c.bucket_spec == load_spec(doc)
    table = {(t["dino"]["width"], t["dino"]["height"]): (t["dit"]["width"], t["dit"]["height"]) for t in doc["buckets"]}
    for i in range(len(c)):
        assert table[c.size(i)] == c.dit_size(i)
    same = extract(imgs, tmp_path / "c", model=str(dinov3_path), area=128, dit_scale="1/2", num_buckets=5, **FAST)
    assert same.processed == 0  # the flags give the same fingerprint as the file: nothing to redo
    r = CliRunner().invoke(app, ["info", str(tmp_path / "c")])
    assert r.exit_code == 0 and "tied to the DiT buckets x 1/2" in r.output
    assert f"DiT {c.dit_size(0)[0]}x{c.dit_size(0)[1]}" in r.output


def test_unalignable_tie_is_refused_before_any_work(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)])
    with pytest.raises(ConfigError, match="not a whole number"):
        extract(imgs, tmp_path / "c", model=str(dinov3_path), area=128, dit_scale="3/4", **FAST)
    assert not (tmp_path / "c").exists()
    r = CliRunner().invoke(app, ["buckets", "--dit-scale", "3/4"])
    assert r.exit_code == 1 and "not a whole number" in r.output


@pytest.mark.parametrize(
    ("multiple", "patch", "scale", "want"),
    [
        (None, 16, None, BucketSpec(1024, 16)),  # untied: the patch
        (None, 14, None, BucketSpec(1024, 14)),
        (32, 16, None, BucketSpec(1024, 32)),
        (20, 16, None, "patch size"),
        (None, 16, "1/2", TiedSpec(BucketSpec(1024, 32), "1/2", 16)),  # tied: the smallest that aligns
        (64, 16, "1/2", TiedSpec(BucketSpec(1024, 64), "1/2", 16)),
        (None, 16, "3/4", "not a whole number"),
    ],
)
def test_spec_for(multiple, patch, scale, want):
    from dinofeat.buckets import spec_for

    if isinstance(want, str):
        with pytest.raises(BucketSpecError, match=want):
            spec_for(1024, multiple, 0.25, 4.0, 33, "list", patch, scale)
    else:
        assert spec_for(1024, multiple, 0.25, 4.0, 33, "list", patch, scale) == want
