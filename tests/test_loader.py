"""Decode tasks of a few images (issue 31.3): every worker busy whatever the model batch, and the batches the model
sees, and so the cache, exactly those of whole-batch decoding."""

from __future__ import annotations

import pytest
import torch

from dinofeat.extraction.loader import BatchDecodeDataset, BatchJob, batches, make_loader, task_images
from dinofeat.extraction.run import extract
from dinofeat.images.recipe import Recipe
from tests.helpers import FAST, comparable_files, write_images


def _job(start: int, n: int, folder) -> BatchJob:
    paths = tuple(str(folder / f"{i:03d}.png") for i in range(start, start + n))
    return BatchJob("32x32", start, start + n, (32, 32), paths)


@pytest.mark.parametrize(
    ("sizes", "workers", "want"),
    [
        ([7], 0, None),  # inline decoding: whole batches
        ([127, 127, 46], 15, 9),  # GPU batches on 15 workers: every worker takes a part of each batch
        ([8, 8], 4, 2),
        ([23], 2, 12),
        ([3], 8, 1),
        ([], 2, None),
    ],
)
def test_task_images(sizes, workers, want, tmp_path):
    jobs = [_job(0, n, tmp_path) for n in sizes]
    assert task_images(jobs, workers) == want


@pytest.mark.parametrize("per_task", [None, 1, 3, 4, 10])
def test_tasks_cover_every_image_once_in_plan_order(per_task, tmp_path):
    write_images(tmp_path, [(32, 32)] * 11, fmt="png")
    names = sorted(p.name for p in tmp_path.iterdir())
    jobs = [
        BatchJob("32x32", 0, 5, (32, 32), tuple(str(tmp_path / n) for n in names[:5])),
        BatchJob("32x32", 5, 11, (32, 32), tuple(str(tmp_path / n) for n in names[5:])),
    ]
    ds = BatchDecodeDataset(jobs, Recipe(), per_task)
    covered = [(t.job.start + k) for t in ds.tasks for k in range(t.a, t.b)]
    assert covered == list(range(11))
    assert all(t.b - t.a <= (per_task or 6) for t in ds.tasks)
    whole = list(batches((BatchDecodeDataset(jobs, Recipe(), None)[i] for i in range(2)), torch.device("cpu")))
    joined = list(batches((ds[i] for i in range(len(ds))), torch.device("cpu")))
    assert [b.job for b in joined] == jobs
    for a, b in zip(whole, joined, strict=True):
        assert torch.equal(a.pixels, b.pixels)


def test_a_failed_image_inside_a_task_keeps_its_row(tmp_path):
    write_images(tmp_path, [(32, 32)] * 4, fmt="png")
    names = sorted(p.name for p in tmp_path.iterdir())
    (tmp_path / names[2]).write_bytes(b"not an image")
    job = BatchJob("32x32", 10, 14, (32, 32), tuple(str(tmp_path / n) for n in names))
    loader = make_loader([job], Recipe(), num_workers=2, pin_memory=False)
    (batch,) = list(batches(loader, torch.device("cpu")))
    assert set(batch.failed) == {12} and batch.pixels.shape == (4, 32, 32, 3)
    assert not batch.pixels[2].any() and batch.pixels[1].any()


@pytest.mark.slow
def test_workers_with_decode_tasks_give_the_cache_of_inline_decoding(tmp_path, dinov3_path, monkeypatch):
    """Decode tasks joined into batches (what a CUDA run does), forced on the CPU: the same cache, byte for byte."""
    from dinofeat.extraction import loop

    monkeypatch.setattr(loop, "SPLIT_BATCHES", True)
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 13 + [(48, 64)] * 6)
    opts = {**FAST, "model": str(dinov3_path), "area": 64, "shard_mb": 0.004, "batch_size": 5}
    extract(imgs, tmp_path / "inline", **opts)
    extract(imgs, tmp_path / "workers", **{**opts, "num_workers": 2})
    a, b = comparable_files(tmp_path / "inline"), comparable_files(tmp_path / "workers")
    assert sorted(a) == sorted(b) and [rel for rel in a if a[rel] != b[rel]] == []


@pytest.mark.parametrize(
    ("device", "images", "shapes", "want"),
    [
        ("cuda", 300, 5, False),  # the baseline's 300 images: compiling 5 shapes costs more than it saves
        ("cuda", 99_999, 5, False),
        ("cuda", 100_000, 5, True),
        ("cuda", 10_000_000, 33, True),
        ("cpu", 10_000_000, 1, False),
        ("cuda", 0, 0, False),
    ],
)
def test_compile_only_where_it_pays(device, images, shapes, want):
    from dinofeat.extraction.loop import should_compile

    assert should_compile(torch.device(device), images, shapes) is want


def test_random_weights_are_drawn_once_then_loaded_bit_identical(tmp_path, monkeypatch):
    """random: models (benchmarks, the README's demo): the seeded draw is saved and loaded on later runs, the same
    bits; a damaged copy is drawn again."""
    from dinofeat.extraction import model as model_module

    monkeypatch.setenv("DINOFEAT_CACHE_DIR", str(tmp_path))
    drawn = model_module.random_model("random:vits16").state_dict()
    (saved,) = (tmp_path / "random").iterdir()
    loaded = model_module.random_model("random:vits16").state_dict()
    assert drawn.keys() == loaded.keys()
    assert all(torch.equal(drawn[k], loaded[k]) for k in drawn)
    (saved / "model.safetensors").write_bytes(b"damaged")
    again = model_module.random_model("random:vits16").state_dict()
    assert all(torch.equal(drawn[k], again[k]) for k in drawn)
    assert (saved / "model.safetensors").read_bytes() != b"damaged"  # the damaged copy was replaced
    reloaded = model_module.random_model("random:vits16").state_dict()
    assert all(torch.equal(drawn[k], reloaded[k]) for k in drawn)
