"""The shard writer of issue 31: rows copied once into reused host buffers, shards written from the rows in place by
several threads, statistics from per-row sums. The bytes on disk are what the single-threaded writer of 0.6.1 wrote;
the statistics differ by float rounding only."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dinofeat.cache import objects
from dinofeat.cache.objects import writev_all
from dinofeat.cache.stats import ChannelStats
from dinofeat.extraction import assemble
from dinofeat.extraction.hostbuffers import HostBuffers
from dinofeat.extraction.run import extract
from dinofeat.read.reader import FeatureCache
from tests.helpers import comparable_files, old_tree, write_images

BEFORE_WRITER = "0c01072"  # the last commit with the single-threaded writer (0.6.1's)
OPTS = {"area": 128, "shard_mb": 0.05, "flip": True, "num_workers": 0, "progress": False, "dtype": "fp32",
        "device": "cpu", "store_dtype": "fp16"}  # fmt: skip
OLD_RUN = (
    "import sys, json; from dinofeat.extraction.run import extract; "
    "extract(sys.argv[1], sys.argv[2], model=sys.argv[3], **json.loads(sys.argv[4]))"
)


def _stats_files(files: dict[str, object]) -> dict[str, object]:
    return {rel: files.pop(rel) for rel in [r for r in files if r.startswith("_dinofeat/stats/")]}


def _assert_close_stats(before: dict[str, object], after: dict[str, object], rtol: float) -> None:
    assert sorted(before) == sorted(after) and before
    for rel in before:
        with np.load(io.BytesIO(before[rel])) as a, np.load(io.BytesIO(after[rel])) as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=rtol, err_msg=f"{rel} {k}")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("writer") / "imgs"
    write_images(d, [(160, 120)] * 9 + [(120, 160)] * 5 + [(128, 128)] * 3)
    return d


@pytest.mark.slow
def test_the_cache_is_byte_identical_to_the_single_threaded_writers(tmp_path, images, dinov3_path):
    """Shards, index, done markers and metadata byte for byte as the 0.6.1 writer wrote them (shards of several
    rows, batches spanning shards, flipped variants); the statistics within float rounding."""
    import json

    old = tmp_path / "old"
    if not old_tree(old, BEFORE_WRITER):
        pytest.skip(f"commit {BEFORE_WRITER} is not in this checkout's history")
    opts = {**OPTS, "batch_size": 3}
    env = {**os.environ, "PYTHONPATH": str(old)}
    args = [sys.executable, "-c", OLD_RUN, str(images), str(tmp_path / "before"), str(dinov3_path), json.dumps(opts)]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    extract(images, tmp_path / "after", model=str(dinov3_path), **opts)
    before, after = comparable_files(tmp_path / "before"), comparable_files(tmp_path / "after")
    assert sum(rel.startswith("buckets/") and "/c/" in rel for rel in after) >= 12  # many shards were written
    stats_before, stats_after = _stats_files(before), _stats_files(after)
    assert sorted(before) == sorted(after)
    assert [rel for rel in before if before[rel] != after[rel]] == []
    _assert_close_stats(stats_before, stats_after, rtol=1e-12)


def test_statistics_from_device_moments_equal_the_writers_own(tmp_path, images, dinov3_path, monkeypatch):
    """The GPU path (per-row sums taken on the device before the copy), run on the CPU: the same features, and the
    statistics within float32 rounding of those the writer computes from the rows."""
    extract(images, tmp_path / "host", model=str(dinov3_path), **OPTS)
    monkeypatch.setattr(assemble, "moments_on_device", lambda device: True)
    extract(images, tmp_path / "device", model=str(dinov3_path), **OPTS)
    host, device = comparable_files(tmp_path / "host"), comparable_files(tmp_path / "device")
    stats_host, stats_device = _stats_files(host), _stats_files(device)
    features = [rel for rel in host if rel.startswith(("buckets/", "index/"))]  # markers and metadata hold stats crcs
    assert len(features) > 10 and [rel for rel in features if host[rel] != device[rel]] == []
    _assert_close_stats(stats_host, stats_device, rtol=1e-5)
    a, b = FeatureCache(tmp_path / "host"), FeatureCache(tmp_path / "device")
    sa, sb = a.channel_stats, b.channel_stats
    assert sa is not None and sb is not None and sorted(sa) == sorted(sb) and sa
    for name in sa:
        np.testing.assert_allclose(sb[name][0], sa[name][0], rtol=1e-5, atol=1e-6)  # mean
        np.testing.assert_allclose(sb[name][1], sa[name][1], rtol=1e-5)  # std


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 1000.0, 3000.0])  # channels whose mean dwarfs their spread (DINO has some)
def test_statistics_from_row_moments_equal_the_float64_ones(dtype, offset):
    x = (torch.randn(6, 1000, 16, dtype=torch.float64) * 2 + offset).to(dtype)
    ref = x.double().reshape(-1, 16)
    m = assemble.row_moments(x).numpy()
    via = ChannelStats.merge_rows(m, 1000)
    assert via.count == 6000
    np.testing.assert_allclose(via.mean, ref.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(via.std, ref.std(0, correction=0).numpy(), rtol=1e-5)
    direct = ChannelStats.of(x.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else x.numpy(),
                             bf16=dtype == torch.bfloat16)  # fmt: skip
    np.testing.assert_allclose(direct.std, ref.std(0, correction=0).numpy(), rtol=1e-5)


@pytest.mark.parametrize("cap", [None, 1, 7, 100])  # bytes one writev call writes at most (None: the kernel's)
@pytest.mark.parametrize("parts", [0, 3, 2500])  # 2500 > IOV_MAX buffers
def test_writev_all_writes_every_byte_in_order(tmp_path, monkeypatch, cap, parts):
    rng = np.random.default_rng(parts)
    chunks = [rng.integers(0, 255, int(rng.integers(0, 40)), dtype=np.uint8) for _ in range(parts)]
    bufs = [memoryview(c) if i % 2 else c.tobytes() for i, c in enumerate(chunks)]
    real = os.writev
    calls = []

    def capped(fd, views):
        calls.append(len(views))
        if cap is None:
            return real(fd, views)
        return os.write(fd, b"".join(bytes(v) for v in views)[:cap])

    monkeypatch.setattr(objects.os, "writev", capped)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        writev_all(fd, bufs)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(c.tobytes() for c in chunks)
    assert all(n <= objects.IOV_MAX for n in calls)


def test_host_buffers_are_reused_across_shapes_and_bounded():
    pool = HostBuffers(pinned=False, keep_bytes=3000)
    a = pool.take((10, 20), torch.float32)  # 800 bytes
    a.fill_(1)
    pool.give(a)
    b = pool.take((5, 40), torch.float16)  # 400 bytes: fits the 800-byte buffer
    assert pool.allocated == 1 and b.shape == (5, 40) and b.dtype == torch.float16
    c = pool.take((10, 20), torch.float32)  # the first is out: a second buffer
    assert pool.allocated == 2
    pool.give(b)
    pool.give(c)
    pool.give(c)  # twice: ignored
    assert pool.free_bytes == 1600
    big = pool.take((1000,), torch.float32)  # 4000 bytes > any free one
    pool.give(big)
    assert pool.free_bytes <= 3000 or pool.free_bytes == 4000  # the oldest free buffers dropped past the cap
    assert pool.allocated == 3


def test_a_write_error_stops_the_run_and_every_buffer_comes_back(tmp_path, images, dinov3_path, monkeypatch):
    """An error in one writer thread: the run raises it, later shards are not written, nothing is leaked."""
    from dinofeat.cache.shards import Shards

    given, taken = [], []
    real_take, real_give = HostBuffers.take, HostBuffers.give
    monkeypatch.setattr(HostBuffers, "take", lambda self, *a: taken.append(1) or real_take(self, *a))
    monkeypatch.setattr(HostBuffers, "give", lambda self, t: given.append(1) or real_give(self, t))
    real_write, writes = Shards.write, []

    def failing(self, bucket, start, arrays):
        writes.append(bucket)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, bucket, start, arrays)

    monkeypatch.setattr(Shards, "write", failing)
    with pytest.raises(Exception, match="No space left"):
        extract(images, tmp_path / "c", model=str(dinov3_path), **OPTS)
    assert len(given) == len(taken) > 0
    monkeypatch.undo()
    s = extract(images, tmp_path / "c", model=str(dinov3_path), **OPTS)  # the rerun finishes what is left
    assert s.sealed and s.done == 17


def test_a_failed_write_leaves_neither_the_file_nor_its_temp_file(tmp_path, monkeypatch):
    import errno

    from dinofeat.cache.objects import LocalFiles

    files = LocalFiles(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(objects.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        files.write_parts("a/b.bin", [b"x" * 10, memoryview(b"y" * 5)])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == []
    monkeypatch.undo()
    files.write_parts("a/b.bin", [b"x" * 10, memoryview(b"y" * 5)])
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"x" * 10 + b"y" * 5
