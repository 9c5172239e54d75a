"""Decoding (modes, EXIF, frames, bad files), header probing, no-crop resizing, and the recipe vs a float reference.

Stated tolerances:
- our uint8 resize + normalise vs the float recipe (rescale, bilinear antialias, normalise): at most 1 grey level
  per pixel (1/255 before normalisation, so <= 1/(255 * 0.224) after), mean at most 0.35 level (uint8 rounding
  alone contributes 0.25);
- the default decodes JPEGs in full: on real photographs with hard edges (text, a rocket on its gantry, a brick
  wall, ...) at several areas, the same max 1 level against the float reference of a full decode;
- the `--jpeg-draft` speed option (DCT-domain reduction, remaining resize >= 2x): max <= 40, p99 <= 16 levels on
  the same photos (measured 35 and 13.5); dinofeat 0.1's draft default (gap 1) measured 85 and 39.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinofeat.buckets import BucketSpec, assign
from dinofeat.errors import ConfigError, ImageError
from dinofeat.images.decode import BACKGROUND, decode_rgb
from dinofeat.images.preprocess import load_resized
from dinofeat.images.probe import probe, probe_many
from dinofeat.images.recipe import Recipe
from dinofeat.images.resize import IMAGENET_MEAN, IMAGENET_STD, normalize_np, resize_uint8
from tests.helpers import bad_files, corner_image, real_photos

# stored pixels for each EXIF orientation, given the displayed image D (EXIF 2.3, "0th row / 0th column" table)
STORE_FOR_ORIENTATION = {
    1: lambda d: d,
    2: lambda d: d[:, ::-1],
    3: lambda d: d[::-1, ::-1],
    4: lambda d: d[::-1, :],
    5: lambda d: d.transpose(1, 0, 2),
    6: lambda d: np.rot90(d, 1),
    7: lambda d: d.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda d: np.rot90(d, -1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_exif_orientation_all_eight(tmp_path, orientation, fmt):
    shown = corner_image()
    stored = np.ascontiguousarray(STORE_FOR_ORIENTATION[orientation](shown))
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.{fmt}"
    Image.fromarray(stored).save(p, exif=exif, **({"quality": 95} if fmt == "jpg" else {}))
    got = np.asarray(decode_rgb(p)).astype(int)
    assert got.shape == shown.shape
    tol = 0 if fmt == "png" else 40  # JPEG is lossy at block edges; the corner colours are still unmistakable
    for sl in [np.s_[2:8, 2:12], np.s_[2:8, -12:-2], np.s_[-8:-2, 2:12], np.s_[-8:-2, -12:-2]]:
        assert np.abs(got[sl] - shown[sl].astype(int)).max() <= tol
    pr = probe(str(p))
    assert (pr.width, pr.height, pr.error) == (60, 40, None)


def _save_mode(path: Path, mode: str) -> None:
    if mode == "L":
        Image.new("L", (8, 6), 77).save(path)
    elif mode == "LA":
        Image.new("LA", (8, 6), (77, 0)).save(path)
    elif mode == "RGBA":
        a = np.zeros((6, 8, 4), np.uint8)
        a[:, :4] = (10, 20, 30, 255)
        a[:, 4:] = (10, 20, 30, 0)
        Image.fromarray(a, "RGBA").save(path)
    elif mode == "P":
        im = Image.new("P", (8, 6), 1)
        im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
        im.save(path, transparency=0)
    elif mode == "P-transparent":
        im = Image.new("P", (8, 6), 0)
        im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
        im.save(path, transparency=0)
    elif mode == "CMYK":
        Image.new("CMYK", (8, 6), (0, 0, 0, 0)).save(path)
    elif mode == "I;16":
        a = np.full((6, 8), 65535, np.uint16)
        a[:, :4] = 32896
        Image.fromarray(a).save(path)
    elif mode == "1":
        Image.new("1", (8, 6), 1).save(path)
    elif mode == "gif-animated":
        frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=10, loop=0)
    elif mode == "tiff-multipage":
        frames = [Image.new("RGB", (8, 6), c) for c in [(0, 0, 255), (0, 255, 0)]]
        frames[0].save(path, save_all=True, append_images=frames[1:])
    else:
        raise ValueError(mode)


@pytest.mark.parametrize(
    ("mode", "ext", "left", "right"),
    [
        ("L", "png", (77, 77, 77), (77, 77, 77)),
        ("LA", "png", BACKGROUND, BACKGROUND),  # fully transparent grey -> background
        ("RGBA", "png", (10, 20, 30), BACKGROUND),
        ("P", "png", (200, 100, 50), (200, 100, 50)),
        ("P-transparent", "png", BACKGROUND, BACKGROUND),
        ("CMYK", "jpg", (255, 255, 255), (255, 255, 255)),
        ("I;16", "png", (128, 128, 128), (255, 255, 255)),  # 16-bit scaled by 1/257, not clipped
        ("1", "png", (255, 255, 255), (255, 255, 255)),
        ("gif-animated", "gif", (255, 0, 0), (255, 0, 0)),  # first frame
        ("tiff-multipage", "tif", (0, 0, 255), (0, 0, 255)),  # first page
    ],
)
def test_modes_become_rgb(tmp_path, mode, ext, left, right):
    p = tmp_path / f"x.{ext}"
    _save_mode(p, mode)
    im = decode_rgb(p)
    assert im.mode == "RGB" and im.size == (8, 6)
    a = np.asarray(im).astype(int)
    tol = 3 if ext == "jpg" else 1
    assert np.abs(a[3, 1] - left).max() <= tol
    assert np.abs(a[3, 6] - right).max() <= tol


def test_16bit_png_is_really_16bit(tmp_path):
    p = tmp_path / "deep.png"
    Image.fromarray((np.arange(48).reshape(6, 8) * 1365).astype(np.uint16)).save(p)
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    a = np.asarray(decode_rgb(p))[..., 0].astype(int)
    want = np.rint(np.arange(48).reshape(6, 8) * 1365 / 257)
    assert np.abs(a - want).max() <= 0


@pytest.mark.parametrize(("w", "h", "size"), [(300, 100, (256, 96)), (100, 300, (96, 256)), (37, 91, (48, 112))])
def test_no_crop_corners_stay_in_their_corners(tmp_path, w, h, size):
    p = tmp_path / "c.png"
    Image.fromarray(corner_image(w, h)).save(p)
    out = load_resized(str(p), size)
    assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
    for (y, x), colour in {
        (0, 0): (255, 0, 0),
        (0, -1): (0, 255, 0),
        (-1, 0): (0, 0, 255),
        (-1, -1): (255, 255, 0),
    }.items():
        assert np.abs(out[y, x].astype(int) - colour).max() <= 2, f"corner {(y, x)} lost: cropped?"


def _float_reference(u8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The documented recipe, independently: rescale 1/255, bilinear antialias resize in float, normalise."""
    x = torch.from_numpy(u8.copy()).permute(2, 0, 1)[None].double() / 255.0
    y = torch.nn.functional.interpolate(
        x, size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False
    )
    m = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return ((y - m) / s)[0].numpy()


@pytest.mark.parametrize(
    ("src", "dst"),
    [((640, 480), (256, 192)), ((1000, 300), (512, 160)), ((300, 300), (512, 512)), ((97, 211), (64, 144))],
)
def test_recipe_matches_float_reference(src, dst):
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (src[1] // 8 + 1, src[0] // 8 + 1, 3), dtype=np.uint8)
    u8 = np.asarray(Image.fromarray(coarse).resize(src, Image.Resampling.BICUBIC))
    ours = normalize_np(resize_uint8(Image.fromarray(u8), dst))
    ref = _float_reference(u8, dst)
    assert ours.shape == ref.shape == (3, dst[1], dst[0])
    level = 1 / (255 * np.asarray(IMAGENET_STD))[:, None, None]
    err = np.abs(ours - ref) / level  # in grey levels
    assert err.max() <= 1.0 + 1e-4
    assert err.mean() <= 0.35


def test_normalize_twins_are_bit_identical():
    from dinofeat.extraction.model import normalize_on_device

    u8 = np.random.default_rng(1).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    dev = normalize_on_device(torch.from_numpy(u8), IMAGENET_MEAN, IMAGENET_STD, torch.float32).numpy()
    cpu = np.stack([normalize_np(x) for x in u8])
    assert np.array_equal(dev, cpu)


PHOTO_AREAS = (128, 192, 256, 384)  # sources from 1.2x to 11x the bucket side; rocket at 256 is 2.1x


def _photo_errors(photos: list[Path], recipe: Recipe) -> list[tuple[str, int, float, float]]:
    """(photo, area, max, p99) |error| in grey levels of `recipe` against the float reference of a full decode."""
    out = []
    for p in photos:
        full = np.asarray(decode_rgb(p))
        for area in PHOTO_AREAS:
            b = assign(BucketSpec(area, 16), full.shape[1], full.shape[0]).bucket
            size = (b.width, b.height)
            ours = normalize_np(load_resized(str(p), size, recipe))
            level = 1 / (255 * np.asarray(IMAGENET_STD))[:, None, None]
            err = np.abs(ours - _float_reference(full, size)) / level
            out.append((p.name, area, float(err.max()), float(np.percentile(err, 99))))
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return real_photos(tmp_path_factory.mktemp("photos"))


def test_default_recipe_matches_reference_on_real_photos(photos):
    """Issue 11's bound (p99 <= 2, max <= 16 grey levels per image) on real photographs with hard edges; what
    the default actually achieves is the reference within rounding: max 1 level."""
    assert Recipe().jpeg_draft == 0
    for name, area, worst, p99 in _photo_errors(photos, Recipe()):
        assert worst <= 1.0 + 1e-3 and p99 <= 1.0 + 1e-3, (name, area, worst, p99)


def test_the_bound_catches_the_old_draft_default(photos):
    """The photo test has teeth: dinofeat 0.1's default (draft, gap 1) breaks the bound on these photos."""
    errs = _photo_errors(photos, Recipe(jpeg_draft=1))
    assert max(e[2] for e in errs) > 16 and max(e[3] for e in errs) > 2


def test_draft_option_engages_and_stays_within_its_documented_bound(tmp_path, photos):
    big = Image.open(photos[-1])  # 1411^2 retina
    assert big.size == (1411, 1411)
    with Image.open(photos[-1]) as im:
        im.draft("RGB", (2 * 320, 2 * 320))
        assert im.size[0] < 1411, "draft did not reduce: the speed option is not being exercised"
    errs = _photo_errors(photos, Recipe(jpeg_draft=2))
    # docs/format.md: gap 2 measured max 35, p99 13.5 grey levels over these photos
    assert max(e[2] for e in errs) <= 40 and max(e[3] for e in errs) <= 16
    # below `gap` x the target no reduction is possible, so draft and full decoding agree exactly
    a = load_resized(str(photos[-1]), (1024, 1024), Recipe(jpeg_draft=2))
    b = load_resized(str(photos[-1]), (1024, 1024), Recipe())
    assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_recipe_refuses_bad_draft_values(bad):
    with pytest.raises(ConfigError):
        Recipe(jpeg_draft=bad)


def test_recipe_reads_old_bool_draft():
    assert Recipe.from_dict({**Recipe().to_dict(), "jpeg_draft": True}).jpeg_draft == 1
    assert Recipe.from_dict({**Recipe().to_dict(), "jpeg_draft": False}).jpeg_draft == 0


def test_draft_respects_exif_rotation(tmp_path):
    shown = np.asarray(Image.fromarray(corner_image(400, 200)).resize((1600, 800), Image.Resampling.NEAREST))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))).save(p, exif=exif, quality=95)
    out = load_resized(str(p), (256, 128), Recipe(jpeg_draft=1))
    assert out.shape == (128, 256, 3)
    assert np.abs(out[5, 5].astype(int) - (255, 0, 0)).max() <= 40


def test_bad_files_raise_image_error_with_reason(tmp_path):
    for name, reason in bad_files(tmp_path).items():
        with pytest.raises(ImageError) as e:
            load_resized(str(tmp_path / name), (64, 64))
        assert str(e.value).startswith(reason), (name, str(e.value))


def test_probe_reads_headers_only_and_reports_failures(tmp_path):
    bad = bad_files(tmp_path / "bad")
    Image.new("RGB", (123, 45)).save(tmp_path / "ok.png")
    out = probe_many([str(tmp_path / "ok.png"), str(tmp_path / "bad" / "bomb.png"), str(tmp_path / "missing.png")])
    assert (out[0].width, out[0].height, out[0].error) == (123, 45, None)
    assert out[1].error.startswith("decompression bomb")  # caught from the header, nothing decoded
    assert out[2].error.startswith("unreadable")
    assert probe(str(tmp_path / "bad" / "zero.jpg")).error == "empty file"
    assert len(bad) == 5


def test_max_pixels_is_configurable(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="decompression bomb"):
        load_resized(str(tmp_path / "a.png"), (16, 16), Recipe(max_pixels=5000))
