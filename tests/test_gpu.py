"""The CUDA path (issue 10): fp16 on the GPU against an fp32 reference, the process-group paths (nccl), resume after
a kill, and --compile. Marked `gpu` and skipped without a CUDA device, so CI (CPU only) skips them; a lent GPU
machine runs them through benchmarks/gpu.sh.

The model is random:vits16 (DINOv3 ViT-S/16's real config, random weights): real shapes, so the fp16 kernels are
the ones a user's run takes, at a size that runs in seconds."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dinofeat import FeatureCache, extract
from dinofeat.cache.store import Store
from dinofeat.images.synthetic import make_images
from tests.helpers import ROOT, kill_9_once, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)"),
]

MODEL = "random:vits16"
AREA = 256
COSINE = 0.999


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Photo-like JPEGs of several aspect ratios (several buckets), 0.5 MP."""
    d = tmp_path_factory.mktemp("gpu-images")
    make_images(d, 48, 0.5)
    return d


def _patch_cosines(a: FeatureCache, b: FeatureCache) -> np.ndarray:
    """Per image: mean over patches of the cosine between the two caches' patch vectors."""
    assert a.keys() == b.keys() and len(a) > 0
    out = []
    for i in range(len(a)):
        x = a.read(i, "patches").astype(np.float32).reshape(-1, a.read(i, "patches").shape[-1])
        y = b.read(i, "patches").astype(np.float32).reshape(x.shape)
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12)
        out.append(cos.mean())
    return np.array(out)


def test_fp16_cuda_matches_an_fp32_reference(tmp_path, photos):
    """The same random weights (random:vits16 is seeded) in fp16 on CUDA and fp32 on the CPU, on the same images."""
    kw = {"model": MODEL, "area": AREA, "progress": False, "store_dtype": "fp32"}
    gpu = extract(photos, tmp_path / "fp16", device="cuda", dtype="fp16", **kw)
    ref = extract(photos, tmp_path / "fp32", device="cpu", dtype="fp32", num_workers=0, **kw)
    assert gpu.sealed and ref.sealed and gpu.done == ref.done == 48
    cos = _patch_cosines(FeatureCache(tmp_path / "fp16"), FeatureCache(tmp_path / "fp32"))
    assert cos.mean() >= COSINE, f"mean patch cosine {cos.mean():.5f}, worst image {cos.min():.5f}"


def _cli(args: list[str], timeout: float = 600) -> str:
    proc = run_cli(args)
    out = proc.communicate(timeout=timeout)[0].decode()
    assert proc.returncode == 0, out
    return out


def test_num_processes_1_and_accelerate_launch_match_a_plain_run(tmp_path, photos):
    """The process-group path (nccl on CUDA) with one process, both ways of starting it, against a plain run."""
    opts = ["--model", MODEL, "--area", str(AREA), "--device", "cuda", "--dtype", "fp16"]
    _cli(["precompute", str(photos), str(tmp_path / "plain"), *opts])
    _cli(["precompute", str(photos), str(tmp_path / "np1"), *opts, "--num-processes", "1"])
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not installed")
    cmd = ["accelerate", "launch", "--num_processes", "1", "-m", "dinofeat", "precompute", str(photos),
           str(tmp_path / "acc"), *opts]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plain = FeatureCache(tmp_path / "plain")
    for other in ("np1", "acc"):
        assert Store(tmp_path / other).meta["state"] == "sealed"
        assert _patch_cosines(plain, FeatureCache(tmp_path / other)).min() >= 0.9999


def test_a_killed_cuda_run_resumes_to_the_same_cache(tmp_path, photos):
    opts = ["--model", MODEL, "--area", str(AREA), "--device", "cuda", "--dtype", "fp16", "--shard-mb", "0.5",
            "--batch-size", "4"]  # fmt: skip
    _cli(["precompute", str(photos), str(tmp_path / "ref"), *opts])
    cut = tmp_path / "cut"
    proc = run_cli(["precompute", str(photos), str(cut), *opts])
    done = cut / "_dinofeat" / "done"
    kill_9_once(proc, lambda: done.is_dir() and sum(len(list(d.iterdir())) for d in done.iterdir()) >= 2)
    assert Store(cut).meta["state"] == "planned"
    _cli(["precompute", str(photos), str(cut), *opts])
    assert Store(cut).meta["state"] == "sealed"
    assert _patch_cosines(FeatureCache(tmp_path / "ref"), FeatureCache(cut)).min() >= 0.9999


def test_compile_gives_the_features_of_eager(tmp_path, photos):
    kw = {"model": MODEL, "area": AREA, "progress": False, "device": "cuda", "dtype": "fp16"}
    eager = extract(photos, tmp_path / "eager", **kw)
    compiled = extract(photos, tmp_path / "compiled", compile=True, **kw)
    assert eager.done == compiled.done == 48
    cos = _patch_cosines(FeatureCache(tmp_path / "eager"), FeatureCache(tmp_path / "compiled"))
    assert cos.min() >= COSINE, f"worst image {cos.min():.5f}"


def test_the_gpu_is_what_ran(tmp_path, photos):
    """The cache records the device dtype it was computed in: fp16 on CUDA means the GPU path ran."""
    extract(photos, tmp_path / "c", model=MODEL, area=AREA, device="cuda", dtype="fp16", progress=False, limit=4)
    assert Store(tmp_path / "c").meta["dtypes"]["compute"] == "fp16"
    assert sys.modules["torch"].cuda.is_initialized()


def test_gpu_decode_stays_within_its_documented_bounds_of_the_cpu_recipe(tmp_path):
    """--decode gpu (nvjpeg + the device resize) against the CPU recipe on the real photographs the tests use (JPEG
    quality 92): pixels, then features. The bounds printed here are what docs/format.md records."""
    from dinofeat.extraction.devicedecode import decode_into, load_for_device, nvjpeg
    from dinofeat.images.preprocess import load_resized
    from dinofeat.images.recipe import Recipe
    from tests.helpers import real_photos

    photos = real_photos(tmp_path / "photos")
    gpu = Recipe(decode="gpu")
    worst, means = 0, []
    for p in photos:
        for size in ((256, 192), (192, 256), (512, 384)):
            cpu = torch.from_numpy(load_resized(str(p), size))
            enc = load_for_device(str(p), size, gpu)
            pixels = torch.zeros(1, size[1], size[0], 3, dtype=torch.uint8, device="cuda")
            assert decode_into(pixels, {0: enc}, size, gpu, nvjpeg) == {}
            diff = (pixels[0].cpu().int() - cpu.int()).abs()
            worst, means = max(worst, int(diff.max())), [*means, float(diff.float().mean())]
    print(f"gpu decode vs cpu recipe: max {worst} grey levels, mean {np.mean(means):.3f}")
    assert np.mean(means) <= 2.0 and worst <= 64
    kw = {"model": MODEL, "area": AREA, "progress": False, "device": "cuda", "dtype": "fp16"}
    extract(tmp_path / "photos", tmp_path / "cpu", **kw)
    extract(tmp_path / "photos", tmp_path / "gpu", **kw, recipe=gpu)
    cos = _patch_cosines(FeatureCache(tmp_path / "cpu"), FeatureCache(tmp_path / "gpu"))
    print(f"gpu decode vs cpu recipe: patch cosine mean {cos.mean():.5f}, worst image {cos.min():.5f}")
    assert cos.min() >= 0.99
