"""Whole-shard fetches into a local shard cache (`FeatureCache(url, local_cache=DIR)`), against the real
S3-compatible server the remote tests use (moto's server mode, its own process, 127.0.0.1): streamed to the temp
file, never held in memory whole; one download per shard across threads; nothing left behind by a failed one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dinofeat import filesystems
from dinofeat.cache.objects import LocalBlob, RemoteFiles
from dinofeat.cache.shardcache import ShardCache
from tests.s3server import S3Server, serve

MIB = 2**20
REL = "buckets/64x64/patches/c/0/0"


@pytest.fixture(scope="module")
def s3():
    filesystems._FILESYSTEMS.clear()  # an s3fs made while another module's server ran would still reach that one
    yield from serve(S3Server())
    filesystems._FILESYSTEMS.clear()


_BUCKETS = iter(range(10_000))


def _shard(s3: S3Server, size: int) -> tuple[str, bytes]:
    """A fresh bucket holding one shard object of `size` random bytes at feats/REL."""
    bucket = s3.bucket(f"dinofeat-fetch-{os.getpid()}-{next(_BUCKETS)}")
    data = os.urandom(size)
    s3.client().put_object(Bucket=bucket, Key=f"feats/{REL}", Body=data)
    return bucket, data


def _read_all(blob: LocalBlob) -> bytes:
    return blob.read_at(0, blob.size)


def test_a_shard_fetch_streams_to_disk_and_never_holds_the_shard_in_memory(s3, tmp_path):
    """32 MiB fetched into the shard cache with at most 1/8 of it in Python memory at any moment (reading it
    whole, as `cat_file` did, peaks at twice its size); the file holds exactly the object's bytes."""
    size = 32 * MIB
    bucket, data = _shard(s3, size)
    files = RemoteFiles("s3", bucket, "feats", ShardCache(tmp_path, "id"))
    assert files.exists(REL)  # client, connection and botocore's service model loaded outside the measurement
    tracemalloc.start()
    try:
        blob = files.open(REL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(blob, LocalBlob) and blob.size == size
    assert hashlib.sha256(_read_all(blob)).digest() == hashlib.sha256(data).digest()
    assert peak < size // 8, f"fetching a {size // MIB} MiB shard peaked at {peak / MIB:.1f} MiB of Python memory"
    assert files.shard_cache is not None and files.shard_cache.fetches == 1
    assert [p.name for p in (tmp_path / "id").rglob("*") if p.is_file()] == ["0"]  # no temp file left


def test_threads_missing_the_same_shard_download_it_once(s3, tmp_path, monkeypatch):
    """Eight threads that all find a shard absent at the same moment: one downloads it, the others wait and read
    the complete copy (without the per-shard lock they would stream into one temp file together)."""
    bucket, data = _shard(s3, 2 * MIB)
    files = RemoteFiles("s3", bucket, "feats", ShardCache(tmp_path, "id"))
    downloads: list[str] = []
    together = threading.Barrier(8, timeout=2)
    real = RemoteFiles.download

    def download(self: RemoteFiles, rel: str, dest: Path) -> None:
        downloads.append(rel)
        with contextlib.suppress(threading.BrokenBarrierError):
            together.wait()  # no thread writes before all eight missed the shard (or two seconds passed)
        real(self, rel, dest)

    monkeypatch.setattr(RemoteFiles, "download", download)
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda _: _read_all(files.open(REL)), range(8)))
    assert downloads == [REL]
    assert all(g == data for g in got)


def test_an_absent_shard_is_file_not_found_and_leaves_no_temp_file(s3, tmp_path):
    bucket, _ = _shard(s3, 1024)
    files = RemoteFiles("s3", bucket, "feats", ShardCache(tmp_path, "id"))
    with pytest.raises(FileNotFoundError):
        files.open("buckets/64x64/patches/c/0/1")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
