"""Helpers shared by several test modules: tiny models from the real HF configs (saved with save_pretrained and
loaded by path, the same code path as a hub id), generated images, bad files, and the fast CPU run settings.

A module of its own, so that no test module imports another (and `tests` resolves under plain `pytest`)."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from dinofeat.read.reader import FeatureCache

FAST = {"num_workers": 0, "progress": False, "dtype": "fp32", "device": "cpu"}
ROOT = Path(__file__).resolve().parents[1]

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _save(config, path: Path) -> Path:
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(path)
    return path


def make_tiny(kind: str, path: Path, **overrides) -> Path:
    from transformers import Dinov2Config, Dinov2WithRegistersConfig, DINOv3ViTConfig

    kw = {**TINY, **overrides}
    if kind == "dinov3":
        cfg = DINOv3ViTConfig(patch_size=16, num_register_tokens=4, **kw)
    elif kind == "dinov2":
        cfg = Dinov2Config(
            patch_size=14, image_size=56, mlp_ratio=2, **{k: v for k, v in kw.items() if k != "intermediate_size"}
        )
    elif kind == "dinov2reg":
        cfg = Dinov2WithRegistersConfig(
            patch_size=14,
            image_size=56,
            num_register_tokens=4,
            mlp_ratio=2,
            **{k: v for k, v in kw.items() if k != "intermediate_size"},
        )
    else:
        raise ValueError(kind)
    return _save(cfg, path)


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


def write_images(folder: Path, sizes: list[tuple[int, int]], fmt: str = "png", start_seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"im_{i:03d}.{fmt}"
        noise_image(w, h, start_seed + i).save(p)
        out.append(p)
    return out


def write_image_dir(d: Path) -> Path:
    """The tests' standard source: 8 PNGs of mixed aspect at the top, 2 JPEGs in a nested folder."""
    write_images(d, [(64, 48), (48, 64), (96, 32), (40, 40), (80, 60), (32, 96), (64, 64), (50, 70)])
    (d / "nested").mkdir()
    write_images(d / "nested", [(70, 50), (60, 60)], fmt="jpg", start_seed=100)
    return d


def corner_image(w: int = 60, h: int = 40) -> np.ndarray:
    """Four flat corner blocks of distinct colours on grey, so orientation and cropping are visible."""
    d = np.full((h, w, 3), 128, np.uint8)
    bh, bw = h // 4, w // 4
    d[:bh, :bw] = (255, 0, 0)
    d[:bh, -bw:] = (0, 255, 0)
    d[-bh:, :bw] = (0, 0, 255)
    d[-bh:, -bw:] = (255, 255, 0)
    return d


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h (a decompression bomb's signature) with no real pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def png_chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def bad_files(folder: Path) -> dict[str, str]:
    """One of each kind of bad file -> the reason prefix it must be recorded with."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "_tmp_good.jpg"
    Image.fromarray(corner_image(64, 64)).save(good, quality=90)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    _png_header_only(folder / "bomb.png", 40000, 40000)
    return {
        "truncated.jpg": "corrupt or truncated",
        "zero.jpg": "empty file",
        "text.png": "not an image",
        "garbage.jpg": "",
        "bomb.png": "decompression bomb",
    }


# Real photographs with hard edges, from scikit-image's wheel (a test dependency; read as files, never imported):
# text, a printed page, a rocket on its gantry, a brick wall (a fence-like grid), a cameraman with a tripod, a
# motorcycle, a portrait, a cat, coffee, a galaxy field and a 1411^2 retina scan (sources up to 8x the buckets).
PHOTOS = (
    "text.png",
    "page.png",
    "rocket.jpg",
    "brick.png",
    "camera.png",
    "motorcycle_left.png",
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
)


def photo_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("the real-photo tests need scikit-image's bundled images: pip install -e '.[test]'")
    return Path(spec.origin).parent / "data"


def real_photos(folder: Path, names: tuple[str, ...] = PHOTOS, quality: int = 92) -> list[Path]:
    """The photos as RGB JPEGs in `folder` (rocket, hubble and retina are JPEGs already and are copied as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        src = photo_dir() / name
        dst = folder / f"{Path(name).stem}.jpg"
        if src.suffix == ".jpg":
            dst.write_bytes(src.read_bytes())
        else:
            Image.open(src).convert("RGB").save(dst, quality=quality)
        out.append(dst)
    return out


# ---- comparing caches ------------------------------------------------------------------------------------------
def _all_features(fc: FeatureCache) -> dict[str, dict[str, np.ndarray]]:
    return {k: {n: fc.read(fc.index_of(k), n) for n in fc.arrays.names()} for k in fc.keys()}  # noqa: SIM118 (iterating yields Features)


def assert_same_caches(a: FeatureCache, b: FeatureCache) -> None:
    """Two FeatureCaches hold the same keys, in the same order, and every stored array bit for bit."""
    assert list(a.keys()) == list(b.keys())
    fa, fb = _all_features(a), _all_features(b)
    assert fa.keys() == fb.keys() and len(fa) > 0
    for k in fa:
        for n in fa[k]:
            np.testing.assert_array_equal(fa[k][n], fb[k][n], err_msg=f"{k} {n}")
            assert fa[k][n].tobytes() == fb[k][n].tobytes()


def assert_same_pairs(a: FeatureCache, b: FeatureCache, pairs: dict[str, str]) -> None:
    """The image keyed k in cache `a` has the bucket and features of the one keyed pairs[k] in `b`."""
    for key_a, key_b in pairs.items():
        fa, fb = a[key_a], b[key_b]
        assert fa.bucket == fb.bucket
        np.testing.assert_array_equal(fa.patches, fb.patches)
        np.testing.assert_array_equal(fa.cls, fb.cls)


# ---- tar shards ------------------------------------------------------------------------------------------------
def png_bytes(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    noise_image(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tf.addfile(info, io.BytesIO(data))


SHARD_SIZES = [(64, 48), (48, 64), (64, 64), (80, 60)]


def make_shards(root: Path, folder: Path, shards: int = 2) -> dict[str, str]:
    """webdataset shards (image + caption per sample) and the same images as files in `folder`; returns tar key ->
    folder key. Shard 0 also holds one corrupt image and one non-image member."""
    root.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = {}
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tf:
            for i, (w, h) in enumerate(SHARD_SIZES):
                data = png_bytes(w, h, 10 * s + i)
                add_member(tf, f"{i:06d}.png", data)
                add_member(tf, f"{i:06d}.txt", b"a caption")
                (folder / f"s{s}_{i}.png").write_bytes(data)
                pairs[f"shard-{s:06d}/{i:06d}"] = f"s{s}_{i}.png"
            if s == 0:
                add_member(tf, "000099.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # not a decodable JPEG
                add_member(tf, "meta.json", b"{}")
    return pairs


# ---- parquet files ---------------------------------------------------------------------------------------------
PARQUET_LAYOUTS = ("img2dataset", "hf", "paths")


def make_parquet(root: Path, folder: Path, layout: str, files: int = 2, group_rows: int = 3) -> dict[str, str]:
    """Parquet files in one of three layouts, and the same images as files in `folder`; returns parquet key ->
    folder key. img2dataset: `key` + `png` bytes + caption; hf: an Image struct {bytes, path} + label, keys are
    row numbers; paths: a `path` column naming the files in `folder`. The byte layouts' file 0 also holds a null
    row and a row of bytes that are not an image (keys `.../bad_null`, `.../bad_bytes`, or their row numbers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = {}
    for f in range(files):
        keys, images, paths = [], [], []
        for i, (w, h) in enumerate(SHARD_SIZES):
            data = png_bytes(w, h, 100 + 10 * f + i)
            name = f"p{f}_{i}.png"
            (folder / name).write_bytes(data)
            keys.append(f"{f:03d}{i:06d}")
            images.append(data)
            paths.append(f"{os.path.relpath(folder, root)}/{name}")
        if f == 0 and layout != "paths":
            keys += ["bad_null", "bad_bytes"]
            images += [None, b"\x00not an image" * 10]
        stem = f"part-{f:05d}"
        for row, k in enumerate(keys[: len(SHARD_SIZES)]):
            pairs[f"{stem}/{k if layout == 'img2dataset' else f'{row:06d}'}"] = f"p{f}_{row}.png"
        if layout == "img2dataset":
            table = pa.table({"key": keys, "png": pa.array(images, pa.binary()), "caption": ["a caption"] * len(keys)})
        elif layout == "hf":
            image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            pairs_kb = zip(keys, images, strict=True)
            values = [None if b is None else {"bytes": b, "path": f"{k}.png"} for k, b in pairs_kb]
            table = pa.table({"image": pa.array(values, image), "label": list(range(len(keys)))})
        else:
            pairs = {f"{os.path.relpath(folder, root)}/{v}": v for v in pairs.values()}
            table = pa.table({"path": paths, "caption": ["a caption"] * len(paths)})
        pq.write_table(table, root / f"{stem}.parquet", row_group_size=group_rows)
    return pairs


# ---- the CLI in a subprocess (kill -9 tests) ----------------------------------------------------------------------
def kill_test_args(model: Path) -> list[str]:
    """precompute options of the kill -9 tests: small shards and batches, so a run has many marked shards early."""
    return ["--model", str(model), "--area", "64", "--dtype", "fp32", "--workers", "0", "--shard-mb", "0.01",
            "--batch-size", "4", "--device", "cpu"]  # fmt: skip


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m dinofeat ARGS` from the repository root, unbuffered, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "dinofeat", *args],
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def kill_9_once(proc: subprocess.Popen, progressed: Callable[[], bool], timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as `progressed()` says it got far enough (polled), and check it had not finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not progressed():
        time.sleep(0.05)  # polling another process's progress
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"


def edit_metadata(cache: Path, change: Callable[[dict], None], *, restamp: bool = False) -> None:
    """Edit a cache's dinofeat metadata in place. `restamp` recomputes its field checksums, as a dinofeat writer
    would have (a consistent cache made with other settings); without it the edit is damage, as a hand edit is."""
    from dinofeat.cache.metadata import stamp

    path = cache / "zarr.json"
    doc = json.loads(path.read_text())
    change(doc["attributes"]["dinofeat"])
    if restamp:
        doc["attributes"]["dinofeat"] = stamp(doc["attributes"]["dinofeat"])
    path.write_text(json.dumps(doc, indent=2))


# ---- caches made by an older commit (byte-identity tests) ----------------------------------------------------------
VOLATILE = {  # ids, times, the version that wrote it
    "cache_id",
    "created",
    "sealed_at",
    "meta_checksums",
    "dinofeat_version",
    "record_checksums",  # added since (issue 32): the crc32c of the plan's records
}


def old_tree(dest: Path, commit: str) -> bool:
    """The package as it was at `commit` (from git), or False where the history is not at hand."""
    try:
        archive = subprocess.run(["git", "archive", commit, "dinofeat", "buckets"], cwd=ROOT, capture_output=True,
                                 timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    if archive.returncode != 0:
        return False
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return True


def comparable_files(cache: Path) -> dict[str, object]:
    """Every file of a cache by path: its bytes, except for what holds ids and times (compared without them)."""
    out: dict[str, object] = {}
    for p in sorted(cache.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(cache).as_posix()
        if rel == "zarr.json":
            doc = json.loads(p.read_text())
            meta = doc["attributes"]["dinofeat"]
            meta = {k: v for k, v in meta.items() if k not in VOLATILE}
            meta["last_sealed"] = {k: v for k, v in meta["last_sealed"].items() if k != "sealed_at"}
            out[rel] = {**doc, "attributes": {"dinofeat": meta}}
        elif rel.startswith("_dinofeat/done/"):
            out[rel] = {k: v for k, v in json.loads(p.read_text()).items() if k != "time"}
        else:
            out[rel] = p.read_bytes()
    return out
