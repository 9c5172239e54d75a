"""`--decode gpu` (issue 31.4) on a machine without one: the whole path but nvjpeg itself, which a CPU stand-in
replaces (PIL's decoder, giving what nvjpeg gives: the stored pixels, not yet upright). Which files go to the
device, EXIF orientation, the resize's bound against the CPU recipe, fallbacks, and the recipe record. The device
decoder itself is checked by the gpu-marked test in tests/test_gpu.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dinofeat.errors import ConfigError
from dinofeat.extraction.devicedecode import EncodedJpeg, decode_into, load_for_device, orient, resize_on_device
from dinofeat.extraction.loader import BatchDecodeDataset, BatchJob, batches
from dinofeat.images.decode import decode_rgb
from dinofeat.images.preprocess import load_resized
from dinofeat.images.recipe import Recipe
from tests.helpers import noise_image, real_photos

GPU = Recipe(decode="gpu")


def stand_in(datas, device):
    """nvjpeg's contract on the CPU: [3, H, W] uint8 as stored (no EXIF rotation), RGB; raises on a bad JPEG."""
    out = []
    for d in datas:
        with Image.open(io.BytesIO(d)) as im:
            out.append(torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1).contiguous().to(device))
    return out


def _jpeg(im: Image.Image, turn: int = 1, **kw) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if turn != 1:
        exif[0x0112] = turn
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes(), **kw)
    return buf.getvalue()


@pytest.mark.parametrize("turn", range(1, 9))
def test_orient_turns_an_image_upright_as_pil_does(turn):
    data = _jpeg(noise_image(40, 24, turn), turn)
    raw = stand_in([data], torch.device("cpu"))[0]
    upright = np.asarray(decode_rgb(data))  # PIL: decode, then exif_transpose
    np.testing.assert_array_equal(orient(raw, turn).permute(1, 2, 0).numpy(), upright)


def test_the_device_resize_is_within_one_grey_level_of_the_cpu_recipe(tmp_path):
    """Same decoded pixels, PIL's antialiased bilinear vs the device's (float32): the bound docs/format.md gives for
    the resize alone (nvjpeg's own difference from libjpeg is measured on a GPU: benchmarks/gpu.sh)."""
    worst = 0
    for p in real_photos(tmp_path):
        im = decode_rgb(str(p))
        for size in ((224, 160), (160, 224), (96, 96), (im.width, im.height)):
            cpu = load_resized(str(p), size)
            dev = resize_on_device(torch.from_numpy(np.asarray(im)).permute(2, 0, 1), size).numpy()
            assert dev.shape == cpu.shape
            worst = max(worst, int(np.abs(dev.astype(int) - cpu.astype(int)).max()))
    assert worst <= 1


def test_workers_ship_jpegs_the_device_can_take_and_decode_the_rest(tmp_path):
    files = {
        "rgb.jpg": _jpeg(noise_image(64, 48, 1)),
        "turned.jpg": _jpeg(noise_image(48, 64, 2), 6),
        "grey.jpg": _jpeg(noise_image(64, 48, 3).convert("L")),
        "cmyk.jpg": _jpeg(noise_image(64, 48, 4).convert("CMYK")),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    noise_image(64, 48, 5).save(tmp_path / "flat.png")
    got = {p.name: load_for_device(str(p), (32, 32), GPU) for p in sorted(tmp_path.iterdir())}
    assert {n for n, g in got.items() if isinstance(g, EncodedJpeg)} == {"rgb.jpg", "turned.jpg", "grey.jpg"}
    assert got["turned.jpg"].orientation == 6 and got["rgb.jpg"].data == files["rgb.jpg"]
    assert all(g.shape == (32, 32, 3) for g in got.values() if isinstance(g, np.ndarray))


def test_a_batch_decoded_on_the_device_matches_the_cpu_recipe(tmp_path):
    """Through the loader and `batches`: the same rows, failures and shapes as CPU decoding; JPEG rows within one
    grey level (the stand-in decodes as libjpeg does), PNG and CMYK rows exactly the CPU's."""
    (tmp_path / "a.jpg").write_bytes(_jpeg(noise_image(64, 48, 1)))
    (tmp_path / "b.jpg").write_bytes(_jpeg(noise_image(48, 64, 2), 6))
    (tmp_path / "c.jpg").write_bytes(_jpeg(noise_image(64, 48, 3).convert("CMYK")))
    noise_image(64, 48, 4).save(tmp_path / "d.png")
    whole = _jpeg(noise_image(64, 48, 5))
    (tmp_path / "e.jpg").write_bytes(whole[: len(whole) // 2])  # header fine, data cut: the device fails, then the CPU
    paths = tuple(str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg", "d.png", "e.jpg"))
    job = BatchJob("48x48", 20, 25, (48, 48), paths)
    cpu = BatchDecodeDataset([job], Recipe())[0]
    tasks = BatchDecodeDataset([job], GPU, task_images=2)
    assert sum(len(tasks[i].encoded) for i in range(len(tasks))) == 3  # a, b, e
    (dev,) = list(batches((tasks[i] for i in range(len(tasks))), torch.device("cpu"), GPU, decode=stand_in))
    assert set(cpu.failed) == set(dev.failed) == {24} and dev.pixels.shape == cpu.pixels.shape
    diff = (dev.pixels.int() - cpu.pixels.int()).abs()
    assert diff[:2].max() <= 1 and diff[2:].max() == 0


def test_a_device_that_rejects_a_batch_is_retried_image_by_image():
    calls = []

    def picky(datas, device):
        calls.append(len(datas))
        if len(datas) > 1:
            raise RuntimeError("nvjpeg: batch failed")
        return stand_in(datas, device)

    rows = {0: EncodedJpeg(_jpeg(noise_image(32, 32, 1)), 1), 2: EncodedJpeg(_jpeg(noise_image(32, 32, 2)), 1)}
    pixels = torch.zeros(3, 32, 32, 3, dtype=torch.uint8)
    assert decode_into(pixels, rows, (32, 32), GPU, picky) == {}
    assert calls == [2, 1, 1] and pixels[0].any() and not pixels[1].any() and pixels[2].any()


def test_the_recipe_records_gpu_decoding_only_when_chosen():
    assert "decode" not in Recipe().to_dict()  # caches made before --decode keep their fingerprint
    assert Recipe.from_dict(GPU.to_dict()) == GPU and GPU.to_dict()["decode"] == "gpu"
    with pytest.raises(ConfigError, match="give one"):
        Recipe(decode="gpu", jpeg_draft=2)
    with pytest.raises(ConfigError, match="decode must be one of"):
        Recipe(decode="tpu")


def test_a_jpeg_replaced_with_other_dimensions_is_refused_before_it_reaches_the_device(tmp_path):
    from dinofeat.errors import ImageChangedError

    p = tmp_path / "a.jpg"
    p.write_bytes(_jpeg(noise_image(48, 64, 1)))
    assert isinstance(load_for_device(str(p), (32, 32), GPU, planned=(48, 64)), EncodedJpeg)
    with pytest.raises(ImageChangedError, match="changed since planned"):
        load_for_device(str(p), (32, 32), GPU, planned=(64, 48))
