"""`precompute` end to end on tiny real-config models loaded by path (the hub-id code path)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from dinofeat.cache.layout import STATUS_DONE, STATUS_FAILED
from dinofeat.cache.store import Store
from dinofeat.errors import CacheMismatchError, ConfigError, TokenCountError
from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.model import normalize_on_device
from dinofeat.extraction.run import extract
from dinofeat.images.preprocess import load_resized
from dinofeat.images.resize import IMAGENET_MEAN, IMAGENET_STD
from tests.helpers import FAST, bad_files, kill_9_once, kill_test_args, make_tiny, run_cli, write_images


def rows_by_key(cache: Path) -> dict[str, tuple[str, int]]:
    st = Store(cache)
    ix = st.index.read()
    names = [b.name for b in st.index.bucket_plans()]
    return {str(k): (names[b], int(r)) for k, b, r in zip(ix["key"], ix["bucket"], ix["row"], strict=True) if b >= 0}


def stored(cache: Path, key: str, name: str) -> np.ndarray:
    bucket, row = rows_by_key(cache)[key]
    return zarr.open_array(str(cache / "buckets" / bucket / name), mode="r")[row]


BACKBONES = {"dinov3": "DINOv3ViTBackbone", "dinov2": "Dinov2Backbone", "dinov2reg": "Dinov2WithRegistersBackbone"}


@pytest.mark.parametrize("kind", ["dinov3", "dinov2", "dinov2reg"])
def test_stored_features_equal_hf_outputs(tmp_path, tiny_models, kind):
    import transformers
    from transformers import AutoConfig, AutoModel

    # concrete classes: AutoBackbone in transformers 5.x asks the hub about local paths, which fails offline
    backbone_cls = getattr(transformers, BACKBONES[kind])
    path = str(tiny_models[kind])
    cfg = AutoConfig.from_pretrained(path)
    p, R = cfg.patch_size, getattr(cfg, "num_register_tokens", 0)
    assert (0 if kind == "dinov2" else 4) == R
    imgs = tmp_path / "imgs"
    write_images(imgs, [(90, 60), (60, 90), (70, 70)])
    cache = tmp_path / "c"
    s = extract(
        imgs, cache, model=str(path), area=4 * p, store_dtype="fp32", batch_size=1, keep_registers=R > 0, **FAST
    )
    assert (s.done, s.failed, s.sealed) == (3, 0, True)
    model = AutoModel.from_pretrained(path).eval()
    backbone = backbone_cls.from_pretrained(path, out_features=[f"stage{cfg.num_hidden_layers}"]).eval()
    for key, (bucket, _) in rows_by_key(cache).items():
        w, h = map(int, bucket.split("x"))
        u8 = load_resized(str(imgs / key), (w, h))
        x = normalize_on_device(torch.from_numpy(u8)[None], IMAGENET_MEAN, IMAGENET_STD, torch.float32)
        with torch.inference_mode():
            out = model(pixel_values=x)
            fmap = backbone(pixel_values=x).feature_maps[-1]
        hs = out.last_hidden_state[0].numpy()
        gh, gw = h // p, w // p
        assert hs.shape[0] == 1 + R + gh * gw
        patches = stored(cache, key, "patches")
        assert patches.shape == (gh, gw, cfg.hidden_size)
        np.testing.assert_array_equal(patches, hs[1 + R :].reshape(gh, gw, -1))
        np.testing.assert_allclose(patches, fmap[0].permute(1, 2, 0).numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(stored(cache, key, "cls"), out.pooler_output[0].numpy())
        if R:
            np.testing.assert_array_equal(stored(cache, key, "registers"), hs[1 : 1 + R])


def test_patch_ij_depends_only_on_region_ij(tmp_path):
    """With no attention layers every token is a function of its own patch: change one 16x16 region of the image
    and exactly that patch (and the CLS, which is independent of patches here, not at all) changes."""
    model = make_tiny("dinov3", tmp_path / "noattn", num_hidden_layers=0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = a.copy()
    b[16:32, 32:48] = 255 - b[16:32, 32:48]  # region (1, 2)
    Image.fromarray(a).save(imgs / "a.png")
    Image.fromarray(b).save(imgs / "b.png")
    cache = tmp_path / "c"
    extract(imgs, cache, model=str(model), area=64, num_buckets=1, store_dtype="fp32", **FAST)
    pa, pb = stored(cache, "a.png", "patches"), stored(cache, "b.png", "patches")
    assert pa.shape[:2] == (4, 4)
    changed = np.abs(pa - pb).max(axis=-1) > 0
    expect = np.zeros((4, 4), bool)
    expect[1, 2] = True
    assert np.array_equal(changed, expect)


def test_bad_files_are_recorded_and_the_run_finishes(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48), (48, 64), (80, 40)])
    reasons = bad_files(imgs)
    s = extract(imgs, tmp_path / "c", model=str(dinov3_path), area=64, **FAST)
    assert (s.total, s.done, s.failed, s.pending, s.sealed) == (8, 3, 5, 0, True)
    st = Store(tmp_path / "c")
    failures = st.index.failures()
    assert set(failures) == set(reasons)
    for name, prefix in reasons.items():
        assert failures[name].startswith(prefix), (name, failures[name])
    ix = st.index.read()
    status = dict(zip((str(k) for k in ix["key"]), ix["status"], strict=True))
    assert all(status[k] == STATUS_FAILED for k in reasons)
    assert sum(v == STATUS_DONE for v in status.values()) == 3


def test_failed_decode_rows_are_zero_and_marked(tmp_path, dinov3_path):
    """A file whose header is fine but whose pixels are not fails at decode time, inside a shard."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64), (64, 64)], fmt="jpg")
    data = (imgs / "im_001.jpg").read_bytes()
    (imgs / "im_001.jpg").write_bytes(data[: len(data) * 2 // 3])  # header intact, scan truncated
    s = extract(imgs, tmp_path / "c", model=str(dinov3_path), area=64, num_buckets=1, **FAST)
    assert (s.done, s.failed) == (1, 1)
    assert np.count_nonzero(stored(tmp_path / "c", "im_001.jpg", "patches")) == 0
    assert np.count_nonzero(stored(tmp_path / "c", "im_000.jpg", "patches")) > 0
    assert Store(tmp_path / "c").index.failures()["im_001.jpg"].startswith("corrupt or truncated")


def test_rerun_resumes_and_mismatch_is_refused(tmp_path, image_dir, dinov3_path, tiny_models):
    cache = tmp_path / "c"
    s1 = extract(image_dir, cache, model=str(dinov3_path), area=64, **FAST)
    assert s1.done == 10 and s1.processed == 10
    s2 = extract(image_dir, cache, model=str(dinov3_path), area=64, **FAST)
    assert s2.processed == 0 and s2.done == 10
    for change, field in [
        ({"area": 128}, "bucket_spec"),
        ({"model": str(tiny_models["dinov2reg"])}, "model_id"),
        ({"store_dtype": "fp32"}, "store_dtype"),
        ({"dtype": "bf16"}, "compute_dtype"),
    ]:
        kw = {**FAST, "model": str(dinov3_path), "area": 64, **change}
        with pytest.raises(CacheMismatchError, match=field):
            extract(image_dir, cache, **kw)
    s3 = extract(image_dir, cache, overwrite=True, **{**FAST, "model": str(dinov3_path), "area": 128})
    assert s3.processed == 10


def test_config_errors_before_any_work(tmp_path, image_dir, dinov3_path):
    with pytest.raises(ConfigError, match="patch size"):
        extract(image_dir, tmp_path / "c", model=str(dinov3_path), multiple=14, **FAST)
    with pytest.raises(ConfigError, match="random model"):
        extract(image_dir, tmp_path / "c", model="random:vitz99", **FAST)
    with pytest.raises(ConfigError, match="neither a local directory"):
        extract(image_dir, tmp_path / "c", model=str(tmp_path / "nope"), **FAST)
    with pytest.raises(ConfigError, match="does not exist"):
        extract(tmp_path / "no-images", tmp_path / "c", model=str(dinov3_path), **FAST)
    with pytest.raises(ConfigError, match="dtype"):
        ExtractConfig(dtype="fp8")
    assert not (tmp_path / "c").exists()


def test_token_count_mismatch_stops_the_run(tmp_path, image_dir, dinov3_path):
    """A config that lies about its registers must stop the run, not shift every patch by a few tokens."""
    bad = tmp_path / "liar"
    bad.mkdir()
    for f in dinov3_path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_register_tokens"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    from dinofeat.extraction import model as model_mod

    real = model_mod.load_model_info

    def lying(spec, revision=None):
        info = real(spec, revision)
        return model_mod.ModelInfo(**{**info.__dict__, "num_register_tokens": 3})

    import dinofeat.extraction.prepare as pre

    orig = pre.load_model_info
    pre.load_model_info = lying
    try:
        with pytest.raises(TokenCountError, match="expected 1 CLS \\+ 3 registers"):
            extract(image_dir, tmp_path / "c", model=str(bad), area=64, **FAST)
    finally:
        pre.load_model_info = orig


def test_dry_run_writes_nothing(tmp_path, image_dir, dinov3_path):
    s = extract(image_dir, tmp_path / "c", model=str(dinov3_path), area=64, dry_run=True, **FAST)
    assert s.dry_run and s.total == 10 and sum(n for _, n in s.histogram) == 10 and s.projected_bytes > 0
    assert not (tmp_path / "c").exists()


def test_limit_and_bf16_storage(tmp_path, image_dir, dinov3_path):
    cache = tmp_path / "c"
    s = extract(image_dir, cache, model=str(dinov3_path), area=64, limit=4, store_dtype="bf16", **FAST)
    assert s.total == 4 and s.done == 4
    bits = stored(cache, "im_000.png", "patches")
    assert bits.dtype == np.uint16
    ref = tmp_path / "ref"
    extract(image_dir, ref, model=str(dinov3_path), area=64, limit=4, store_dtype="fp32", **FAST)
    as_float = (bits.astype(np.uint32) << 16).view(np.float32)
    want = torch.from_numpy(stored(ref, "im_000.png", "patches")).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(as_float, want)


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    st = Store(cache)
    return {
        f"{b.name}/{n}": st.shards.read_rows(b.name, n, 0, b.rows)
        for b in st.index.bucket_plans()
        for n in st.shards.names(b.name)
    }


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 120 + [(96, 48)] * 40)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    opts = kill_test_args(dinov3_path)
    assert run_cli(["precompute", str(imgs), str(ref), *opts]).wait(timeout=300) == 0
    proc = run_cli(["precompute", str(imgs), str(cut), *opts])
    done_dir = cut / "_dinofeat" / "done"
    kill_9_once(proc, lambda: done_dir.is_dir() and sum(len(list(d.iterdir())) for d in done_dir.iterdir()) >= 3)
    st = Store(cut)
    assert st.meta["state"] == "planned"
    n_marked = len(st.markers.read())
    total = sum(b.num_shards for b in st.index.bucket_plans())
    assert 0 < n_marked < total
    out = run_cli(["precompute", str(imgs), str(cut), *opts])
    text = out.communicate(timeout=300)[0].decode()
    assert out.returncode == 0, text
    assert Store(cut).meta["state"] == "sealed"
    a, b = _arrays(ref), _arrays(cut)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not list(cut.rglob("*.partial"))


@pytest.mark.slow
def test_compiled_encoder_matches_eager(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64), (64, 64), (96, 48)])
    kw = {**FAST, "model": str(dinov3_path), "area": 64}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    extract(imgs, eager, **kw)
    s = extract(imgs, compiled, compile=True, **kw)
    assert s.sealed and s.done == 3
    for key in rows_by_key(eager):
        np.testing.assert_allclose(stored(compiled, key, "patches"), stored(eager, key, "patches"), atol=2e-3, rtol=0)


def test_fifo_named_like_an_image_fails_cleanly(tmp_path, dinov3_path):
    """A FIFO blocks whoever opens it: planning must record it, not hang on it."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 2)
    os.mkfifo(imgs / "pipe.jpg")
    s = extract(imgs, tmp_path / "c", model=str(dinov3_path), area=64, **FAST)
    assert s.sealed and s.done == 2 and s.failures_by_reason == {"unreadable": 1}


def test_a_hung_decode_worker_stops_the_run_resumably(tmp_path, dinov3_path, monkeypatch):
    """A read that never returns (a hung network mount) must end the run with a clear error, not stall it."""
    import threading

    import dinofeat.extraction.loader
    from dinofeat.errors import DinofeatError

    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 3)
    kw = {**FAST, "model": str(dinov3_path), "area": 64, "num_workers": 1, "decode_timeout_s": 1.0}
    monkeypatch.setattr(
        dinofeat.extraction.loader, "load_resized", lambda *a, **k: threading.Event().wait()
    )  # forked workers
    with pytest.raises(DinofeatError, match="no decoded batch for 1s"):
        extract(imgs, tmp_path / "c", **kw)
    monkeypatch.undo()
    s = extract(imgs, tmp_path / "c", **kw)
    assert s.sealed and s.done == 3


def test_images_gone_from_unfinished_shards_are_refused_before_work(tmp_path, dinov3_path):
    """Rank 0 checks the images of every unfinished shard (its own and the other ranks') before anyone starts."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 6)
    opts = {"model": str(dinov3_path), "area": 64, "num_buckets": 1, "shard_mb": 0.001, **FAST}
    extract(imgs, tmp_path / "c", rank=0, world_size=2, **opts)  # rank 0's shards only; rank 1's stay unfinished
    st = Store(tmp_path / "c")
    done = {u for (_, u) in st.markers.read()}
    plan = st.index.plan()
    b = plan.buckets[0]
    gone = next(
        k for i, k in enumerate(plan.keys) if int(plan.row[i]) // b.shard_rows not in done
    )  # an image of a shard rank 1 owns
    (imgs / gone).unlink()
    with pytest.raises(ConfigError, match="gone from"):  # rank 0 itself has nothing left to do
        extract(imgs, tmp_path / "c", rank=0, world_size=2, **opts)
    with pytest.raises(ConfigError, match="gone from"):
        extract(imgs, tmp_path / "c", **opts)
