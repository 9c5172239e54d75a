"""Decoding (modes, EXIF, frames, bad files), header probing, no-crop resizing, and the recipe vs a float reference.

Stated tolerances:
- our uint8 resize + normalise vs the float recipe (rescale, bilinear antialias, normalise): at most 1 grey level
  per pixel (1/255 before normalisation, so <= 1/(255 * 0.224) after), mean at most 0.35 level (uint8 rounding
  alone contributes 0.25);
- JPEG draft (DCT-domain) decoding vs full decoding, same target size: mean |diff| <= 1.5 levels, 99th percentile
  <= 6 levels on worst-case high-frequency content (measured 1.1-1.4 and 5); photo-like content measures 0.2 and 1.
  `Recipe(jpeg_draft=False)` (`--no-jpeg-draft`) decodes in full.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinofeat.config import Recipe
from dinofeat.decode import BACKGROUND, decode_rgb
from dinofeat.errors import ImageError
from dinofeat.preprocess import load_resized
from dinofeat.probe import probe, probe_many
from dinofeat.resize import IMAGENET_MEAN, IMAGENET_STD, normalize_np, resize_uint8
from tests.helpers import bad_files, corner_image

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
    from dinofeat.model import normalize_on_device

    u8 = np.random.default_rng(1).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    dev = normalize_on_device(torch.from_numpy(u8), IMAGENET_MEAN, IMAGENET_STD, torch.float32).numpy()
    cpu = np.stack([normalize_np(x) for x in u8])
    assert np.array_equal(dev, cpu)


def test_jpeg_draft_tolerance_and_that_it_engages(tmp_path):
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    big = Image.fromarray(coarse).resize((1600, 1200), Image.Resampling.BICUBIC)
    p = tmp_path / "big.jpg"
    big.save(p, quality=92)
    with Image.open(p) as im:
        im.draft("RGB", (400, 300))
        assert im.size == (400, 300), "draft did not reduce: the fast path is not being exercised"
    a = load_resized(str(p), (400, 300), Recipe(jpeg_draft=True)).astype(int)
    b = load_resized(str(p), (400, 300), Recipe(jpeg_draft=False)).astype(int)
    d = np.abs(a - b)
    assert d.mean() <= 1.5 and np.percentile(d, 99) <= 6
    # below 2x the target no reduction is possible, so draft and full decoding agree exactly
    c = load_resized(str(p), (1000, 750), Recipe(jpeg_draft=True))
    e = load_resized(str(p), (1000, 750), Recipe(jpeg_draft=False))
    assert np.array_equal(c, e)


def test_draft_respects_exif_rotation(tmp_path):
    shown = np.asarray(Image.fromarray(corner_image(400, 200)).resize((1600, 800), Image.Resampling.NEAREST))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))).save(p, exif=exif, quality=95)
    out = load_resized(str(p), (256, 128))
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
