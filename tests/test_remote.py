"""Caches on object storage, against a real S3-compatible server (moto's server mode, its own process, 127.0.0.1).

dinofeat reaches it through the standard AWS_* variables (tests/s3server.py), exactly as it would reach S3."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from dinofeat import FeatureCache, extract
from dinofeat.cache.lock import ObjectLock
from dinofeat.cache.objects import LocalFiles, RemoteFiles, open_files
from dinofeat.cache.shardcache import ShardCache
from dinofeat.cache.store import Store
from dinofeat.errors import CacheConflictError, CacheLockedError, ChecksumError, ConfigError
from dinofeat.inspection.info import info
from dinofeat.inspection.validate import validate
from dinofeat.read.dataset import FeatureDataset
from tests.helpers import (
    FAST,
    assert_same_caches,
    kill_9_once,
    kill_test_args,
    make_parquet,
    make_shards,
    run_cli,
    write_image_dir,
    write_images,
)
from tests.s3server import S3Server, serve


@pytest.fixture(scope="module")
def s3():
    yield from serve(S3Server())


_BUCKETS = iter(range(10_000))


@pytest.fixture
def bucket(s3) -> str:
    """A fresh bucket per test: no test sees another's objects."""
    return s3.bucket(f"dinofeat-test-{os.getpid()}-{next(_BUCKETS)}")


@pytest.fixture(scope="module")
def _template(s3, tmp_path_factory, dinov3_path):
    """The same images precomputed once into a local cache and into s3://<template bucket>/feats."""
    kw = {**FAST, "model": str(dinov3_path), "area": 64, "shard_mb": 0.01, "keep_registers": True}
    root = tmp_path_factory.mktemp("template")
    image_dir = write_image_dir(root / "images")
    local = root / "local"
    s_local = extract(image_dir, local, **kw)
    bucket = s3.bucket(f"dinofeat-template-{os.getpid()}")
    s_remote = extract(image_dir, f"s3://{bucket}/feats", **kw)
    assert s_local.sealed and s_remote.sealed and s_remote.done == s_local.done == 10
    return local, bucket, image_dir


@pytest.fixture
def template_images(_template):
    """The source the template caches were made from (a rerun must name the same source)."""
    return _template[2]


@pytest.fixture
def remote_and_local(_template, s3, tmp_path, bucket):
    """A private copy of the template caches (local folder, objects in this test's bucket): tests may damage it."""
    template_local, template_bucket, _ = _template
    local = tmp_path / "local"
    shutil.copytree(template_local, local)
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=template_bucket):
        for obj in page.get("Contents", []):
            src = {"Bucket": template_bucket, "Key": obj["Key"]}
            client.copy_object(CopySource=src, Bucket=bucket, Key=obj["Key"])
    return local, f"s3://{bucket}/feats"


def _shards_in(folder):
    """The shard files of a local shard cache (the kept metadata under .meta is not counted by its cap)."""
    return [p for p in folder.rglob("*") if p.is_file() and ".meta" not in p.relative_to(folder).parts]


def test_remote_cache_reads_back_bit_identical_to_local(remote_and_local, tmp_path):
    local, url = remote_and_local
    assert_same_caches(FeatureCache(local), FeatureCache(url))
    shards = tmp_path / "shard-cache"
    fc = FeatureCache(url, local_cache=shards)
    assert_same_caches(FeatureCache(local), fc)
    fetched = _shards_in(shards)
    assert fetched, "local_cache kept no shards"
    assert {p.relative_to(shards).parts[0] for p in fetched} == {fc.meta["cache_id"]}
    kept = {p.parent.name for p in (shards / ".meta" / fc.meta["cache_id"]).rglob("zarr.json")}
    assert {"cls", "patches"} <= kept  # the arrays' zarr.json, beside the shards (not counted, never evicted)


def test_a_capped_local_cache_reads_everything_within_its_size(remote_and_local, tmp_path):
    """`local_cache_bytes` of two shards over a cache of many: every row still reads back bit-identical, the
    folder never ends above the cap, and shards were removed and fetched again to get there."""
    local, url = remote_and_local
    full = tmp_path / "full"
    assert_same_caches(FeatureCache(local), FeatureCache(url, local_cache=full))
    sizes = [p.stat().st_size for p in _shards_in(full)]
    assert len(sizes) > 4
    cap = 2 * max(sizes)
    fc = FeatureCache(url, local_cache=tmp_path / "capped", local_cache_bytes=cap, max_open_files=1)
    assert_same_caches(FeatureCache(local), fc)
    held = sum(p.stat().st_size for p in _shards_in(tmp_path / "capped"))
    assert 0 < held <= cap
    assert fc._files.shard_cache.evicted > 0 and fc._files.shard_cache.fetches > len(sizes)
    with pytest.raises(ConfigError, match="needs a local_cache folder"):
        FeatureCache(url, local_cache_bytes=cap)


def test_remote_cache_is_objects_under_its_prefix_and_a_lock_is_gone_after_the_run(remote_and_local, s3):
    _, url = remote_and_local
    bucket = url.split("/")[2]
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "feats/zarr.json" in keys and any(k.startswith("feats/_dinofeat/done/") for k in keys)
    assert all(k.startswith("feats/") for k in keys), "the lock object must be released (and nothing else outside)"
    assert not any(k.endswith(".partial") or k.endswith(".tmp") for k in keys)


def test_validate_and_info_on_a_remote_cache(remote_and_local):
    local, url = remote_and_local
    rep = validate(url, progress=False)
    assert rep.ok, rep.problems
    assert rep.checked["value_shards"] == validate(local, progress=False).checked["value_shards"] > 0
    d = info(url, stats_images=4)
    assert d["images"] == 10 and d["disk_bytes"] > 0


def test_rerun_on_a_sealed_remote_cache_resumes_with_nothing_to_do(remote_and_local, dinov3_path, template_images):
    _, url = remote_and_local
    s = extract(template_images, url, **FAST, model=str(dinov3_path), area=64, shard_mb=0.01, keep_registers=True)
    assert s.sealed and s.processed == 0 and s.done == 10


def test_mismatched_remote_cache_is_refused(remote_and_local, dinov3_path, template_images):
    _, url = remote_and_local
    with pytest.raises(Exception, match="different settings"):
        extract(template_images, url, **FAST, model=str(dinov3_path), area=96, shard_mb=0.01, keep_registers=True)


def test_flipped_byte_in_a_remote_shard_is_caught(remote_and_local, s3):
    _, url = remote_and_local
    bucket = url.split("/")[2]
    fc = FeatureCache(url)
    key = fc.keys()[0]
    b = fc._bucket_plans[int(fc._bucket[0])].name
    obj = f"feats/buckets/{b}/patches/c/{int(fc._row[0]) // fc._bucket_plans[int(fc._bucket[0])].shard_rows}/0/0/0"
    c = s3.client()
    data = bytearray(c.get_object(Bucket=bucket, Key=obj)["Body"].read())
    data[int(fc._row[0]) % 1 + 10] ^= 0x10  # a byte inside the shard's first stored chunk
    c.put_object(Bucket=bucket, Key=obj, Body=bytes(data))
    with pytest.raises(ChecksumError):
        for i in range(len(fc)):
            FeatureCache(url).read(i, "patches")
    assert not validate(url, progress=False).ok
    assert key  # the damaged row belongs to a key the cache lists


def test_dataloader_with_two_workers_over_a_remote_cache(remote_and_local):
    local, url = remote_and_local
    ds_remote, ds_local = FeatureDataset(url), FeatureDataset(local)
    loader = torch.utils.data.DataLoader(ds_remote, batch_size=None, num_workers=2, shuffle=False)
    got = {s["key"]: s for s in loader}
    assert len(got) == len(ds_local) == 10
    for i in range(len(ds_local)):
        want = ds_local[i]
        assert torch.equal(got[want["key"]]["patches"], want["patches"])
        assert torch.equal(got[want["key"]]["cls"], want["cls"])


def _evict_right_after_each_rename(_: int) -> None:
    """A DataLoader worker_init_fn: in this worker, the moment a fetched shard is renamed into place, another reader
    of the folder evicts everything in it, as a second worker's fetch under the cap does (here always at the worst
    moment, instead of once in a few runs)."""
    shards = torch.utils.data.get_worker_info().dataset.cache._files.shard_cache
    rename = os.replace

    def replace(src, dst, *args, **kw):
        rename(src, dst, *args, **kw)
        ShardCache(shards.root, shards.dir.name, 1).evict()

    os.replace = replace  # this worker process only


@pytest.mark.parametrize("interleave", [False, True])
def test_dataloader_workers_sharing_a_local_cache_smaller_than_a_shard_never_miss_one(
    remote_and_local, tmp_path, interleave
):
    """Issue 32.3: four workers, one shard file open each, a cap below one shard: every fetch evicts every other
    shard, the one another worker has just fetched included. Epoch after epoch, every sample is served and equal
    to the local cache's (before the fix, a worker whose fresh shard was evicted before it opened it failed with
    `shard file missing`; `interleave` makes that happen at every fetch)."""
    local, url = remote_and_local
    fc = FeatureCache(url, local_cache=tmp_path / "shards", local_cache_bytes=1, max_open_files=1)
    want = {s["key"]: s for s in FeatureDataset(local)}
    loader = torch.utils.data.DataLoader(
        FeatureDataset(fc),
        batch_size=None,
        num_workers=4,
        shuffle=True,
        persistent_workers=True,
        timeout=120,
        worker_init_fn=_evict_right_after_each_rename if interleave else None,
    )
    for _ in range(4):
        got = {s["key"]: s for s in loader}
        assert sorted(got) == sorted(want)
        for k, s in got.items():
            assert torch.equal(s["patches"], want[k]["patches"]) and torch.equal(s["cls"], want[k]["cls"])
    assert not [p for p in (tmp_path / "shards").rglob(".*.tmp")]


@pytest.mark.slow
def test_kill_9_then_rerun_into_s3_equals_local(tmp_path, s3, bucket, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 72 + [(96, 48)] * 24)
    opts, env = kill_test_args(dinov3_path), s3.env

    def run(cache: str) -> subprocess.Popen[bytes]:
        return run_cli(["precompute", str(imgs), cache, *opts], env)

    ref = tmp_path / "ref"
    assert run(str(ref)).wait(timeout=300) == 0
    url = f"s3://{bucket}/feats"
    proc = run(url)
    c = s3.client()
    kill_9_once(proc, lambda: c.list_objects_v2(Bucket=bucket, Prefix="feats/_dinofeat/done/").get("KeyCount", 0) >= 3)
    st = Store(url)
    assert st.meta["state"] == "planned"
    assert 0 < len(st.markers.read()) < sum(b.num_shards for b in st.index.bucket_plans())
    # the killed run's lock object is still there: a new run is refused until it expires or is removed
    lock_key = "feats.dinofeat-lock"
    assert c.head_object(Bucket=bucket, Key=lock_key)
    out = run(url)
    text = out.communicate(timeout=300)[0].decode()
    assert out.returncode == 1 and "in use by another dinofeat run" in text, text
    c.delete_object(Bucket=bucket, Key=lock_key)  # what the operator does (or waits for the expiry)
    out = run(url)
    text = out.communicate(timeout=300)[0].decode()
    assert out.returncode == 0, text
    assert_same_caches(FeatureCache(ref), FeatureCache(url))


# ---- the pieces: conditional writes, the lock, locations --------------------------------------------------------
@pytest.fixture(params=["local", "remote"])
def files(request, tmp_path):
    if request.param == "local":
        return LocalFiles(tmp_path / "root")
    bucket = request.getfixturevalue("bucket")
    return RemoteFiles("s3", bucket, "root")


def test_create_is_exclusive_and_replace_is_conditional(files):
    assert files.create("a.json", b"1") is not None
    assert files.create("a.json", b"2") is None
    data, v1 = files.read_versioned("a.json")
    assert data == b"1"
    v2 = files.replace("a.json", b"3", v1)
    assert v2 is not None and files.read("a.json") == b"3"
    assert files.replace("a.json", b"4", v1) is None, "a stale version must not overwrite"
    assert files.read("a.json") == b"3"


def test_a_range_read_that_fails_raises_instead_of_returning_the_error(bucket):
    """fsspec's cat_ranges hands a failed range back as an exception object in its list by default: a shard's
    checksums were then read from an exception (a TypeError traceback in the middle of an outage). (A local file
    stays readable through its open descriptor after it is deleted: there is nothing to fail.)"""
    files = RemoteFiles("s3", bucket, "root")
    files.write("blob", bytes(range(64)))
    blob = files.open("blob")
    assert blob.read_ranges([0, 10], [4, 2]) == [bytes(range(4)), bytes([10, 11])]
    files.delete("blob")  # gone between the open and the reads, as an object is while the store is unreachable
    with pytest.raises(FileNotFoundError):
        blob.read_ranges([0, 10], [4, 2])


def test_files_list_children_delete(files):
    for rel in ("x/1", "x/y/2", "z/3", "top"):
        files.write(rel, rel.encode())
    assert files.list("x") == ["x/1", "x/y/2"]
    assert files.children("") == ["x", "z"]
    assert files.open("x/y/2").read_at(2, 3) == b"y/2"
    assert files.delete_tree("x") == 2 and files.list("x") == []
    files.delete("top")
    assert not files.exists("top") and files.exists("z/3")
    with pytest.raises(FileNotFoundError):
        files.read("top")


def test_two_metadata_updates_from_the_same_generation_one_wins(remote_and_local):
    _, url = remote_and_local
    a, b = Store(url, mode="r+"), Store(url, mode="r+")
    a.metafile.update(note="a")
    with pytest.raises(CacheConflictError):
        b.metafile.update(note="b")
    assert Store(url).meta["note"] == "a"


def test_metadata_write_is_conditional_even_after_the_generation_check(remote_and_local, monkeypatch):
    """Two runs that both pass the generation check: only the conditional PUT stops the second."""
    _, url = remote_and_local
    a, b = Store(url, mode="r+"), Store(url, mode="r+")
    real = b.files.read_versioned
    raced = {}

    def read_then_other_writes(rel):
        got = real(rel)
        if rel == "zarr.json" and not raced:
            raced[1] = True
            a.metafile.update(note="a")  # lands between b's read and b's write
        return got

    monkeypatch.setattr(b.files, "read_versioned", read_then_other_writes)
    with pytest.raises(CacheConflictError):
        b.metafile.update(note="b")
    assert Store(url).meta["note"] == "a"


def test_object_lock_excludes_a_second_run_and_expires(bucket):
    files = RemoteFiles("s3", bucket, "feats")
    with ObjectLock(files, "first"), pytest.raises(CacheLockedError, match="first"), ObjectLock(files, "second"):
        pass
    with ObjectLock(files, "third"):  # released: free again
        pass
    stale = ObjectLock(files, "crashed", ttl_s=0.5, beat_s=60)
    stale.__enter__()
    stale._stop.set()  # the holder dies: no renewal, no release
    deadline = time.monotonic() + 10
    while True:
        try:
            with ObjectLock(files, "after"):
                break
        except CacheLockedError:
            assert time.monotonic() < deadline, "an expired lock was never taken over"
            time.sleep(0.1)  # waiting out the lock's 0.5 s expiry


def test_renewal_keeps_a_lock(bucket):
    files = RemoteFiles("s3", bucket, "feats")
    with ObjectLock(files, "long", ttl_s=1.0, beat_s=0.2) as held:
        time.sleep(1.5)  # longer than the ttl: only the renewals keep it
        with pytest.raises(CacheLockedError), ObjectLock(files, "other"):
            pass
        assert not held.lost


@pytest.mark.parametrize(
    "url, why",
    [
        ("s3://bucket", "prefix inside the bucket"),
        ("s3://bucket/", "prefix inside the bucket"),
        ("nosuchscheme://host/feats", "not nosuchscheme://"),
        ("ftp://host/feats", "not ftp://"),  # fsspec has a filesystem for it, but it is no object store
        ("http://host/feats", "not http://"),
        ("s3:///feats", "prefix inside the bucket"),
    ],
)
def test_unsupported_cache_urls_are_configuration_errors(url, why, tmp_path, dinov3_path, image_dir):
    with pytest.raises(ConfigError, match=why):
        open_files(url)
    with pytest.raises(ConfigError, match=why):
        extract(image_dir, url, **FAST, model=str(dinov3_path), area=64)


# ---- tar shards as a remote source ---------------------------------------------------------------------------------
def test_tar_shards_on_s3_give_the_same_cache_as_local_shards(tmp_path, s3, bucket, dinov3_path):
    pairs = make_shards(tmp_path / "shards", tmp_path / "folder", shards=3)
    c = s3.client()
    for f in sorted((tmp_path / "shards").iterdir()):
        c.upload_file(str(f), bucket, f"shards/{f.name}")
    local_pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    url_pattern = f"s3://{bucket}/shards/shard-{{000000..000002}}.tar"
    kw = {**FAST, "model": str(dinov3_path), "area": 64}
    a = extract(local_pattern, tmp_path / "from-local", **kw)
    b = extract(url_pattern, tmp_path / "from-s3", **kw)
    assert (b.done, b.failed) == (a.done, a.failed) == (len(pairs), 1)
    fa, fb = FeatureCache(tmp_path / "from-local"), FeatureCache(tmp_path / "from-s3")
    assert fa.keys() == fb.keys() and set(pairs) <= set(fb.keys())
    assert_same_caches(fa, fb)
    assert fb.failures.keys() == fa.failures.keys() == {"shard-000000/000099"}
    assert fb.meta["source_root"] == url_pattern  # not folded into a local path
    assert validate(tmp_path / "from-s3", images=url_pattern, recompute=2, progress=False).ok
    with pytest.raises(ConfigError, match="1 of 4 tar shards do not exist"):
        extract(f"s3://{bucket}/shards/shard-{{000000..000003}}.tar", tmp_path / "x", **kw)


def test_parquet_on_s3_gives_the_same_cache_as_local_parquet(tmp_path, s3, bucket, dinov3_path):
    """img2dataset-style parquet files read from the server (footer, key column, then row groups by range): the
    same cache as from the local files, bad rows recorded alike; a glob finds the files by one listing."""
    pytest.importorskip("pyarrow", reason="parquet sources need pyarrow (the test extra installs it)")
    pairs = make_parquet(tmp_path / "pq", tmp_path / "folder", "img2dataset", files=3)
    c = s3.client()
    for f in sorted((tmp_path / "pq").glob("*.parquet")):
        c.upload_file(str(f), bucket, f"pq/{f.name}")
    kw = {**FAST, "model": str(dinov3_path), "area": 64}
    a = extract(str(tmp_path / "pq" / "*.parquet"), tmp_path / "from-local", **kw)
    url = f"s3://{bucket}/pq/*.parquet"
    b = extract(url, f"s3://{bucket}/feats", **kw)
    assert (b.done, b.failed) == (a.done, a.failed) == (len(pairs), 2)
    fa, fb = FeatureCache(tmp_path / "from-local"), FeatureCache(f"s3://{bucket}/feats")
    assert set(pairs) <= set(fb.keys())
    assert_same_caches(fa, fb)
    assert fb.failures.keys() == fa.failures.keys()
    assert validate(f"s3://{bucket}/feats", images=url, recompute=2, progress=False).ok


@pytest.mark.parametrize("local_cache", [False, True])
def test_batched_fetch_threads_over_a_remote_cache(tmp_path, bucket, dinov3_path, local_cache):
    """A batch's rows fetched 16 at a time (what DataLoader's batched path does) give the same samples as a local
    read, also when all 16 threads want the same shard from an empty local shard cache at once (one bucket, one
    shard of 48 rows)."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 48)
    kw = {**FAST, "model": str(dinov3_path), "area": 64}
    url = f"s3://{bucket}/one-shard"
    extract(imgs, tmp_path / "local", **kw)
    extract(imgs, url, **kw)
    fc = FeatureCache(url, local_cache=tmp_path / "shards") if local_cache else FeatureCache(url)
    assert sum(b.num_shards for b in fc._bucket_plans) == 1
    remote, ref = FeatureDataset(fc), FeatureDataset(tmp_path / "local")
    assert remote.fetch_threads == 16 and ref.fetch_threads == 0
    got = remote.__getitems__(list(range(len(remote))))
    want = ref.__getitems__(list(range(len(ref))))
    assert [g["key"] for g in got] == [w["key"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g["patches"], w["patches"]) and torch.equal(g["cls"], w["cls"])


def test_threads_missing_the_same_shard_fetch_it_once(remote_and_local, tmp_path, monkeypatch):
    """Eight threads that all find a shard absent from the local shard cache at the same moment: one fetches it,
    the others wait and read the complete copy (without the per-shard lock they wrote one temp file together)."""
    _, url = remote_and_local
    fc = FeatureCache(url, local_cache=tmp_path / "shards")
    fetched: list[str] = []
    together = threading.Barrier(8, timeout=2)
    real = RemoteFiles.download

    def download(self, rel, dest):
        if "/c/" in rel:
            fetched.append(rel)
            with contextlib.suppress(threading.BrokenBarrierError):
                together.wait()  # no thread writes before all eight missed the shard (or two seconds passed)
        return real(self, rel, dest)

    monkeypatch.setattr(RemoteFiles, "download", download)
    with ThreadPoolExecutor(8) as ex:
        rows = list(ex.map(lambda _: fc.read(0, "patches"), range(8)))
    assert len(fetched) == 1, fetched
    for r in rows:
        np.testing.assert_array_equal(r, FeatureCache(remote_and_local[0]).read(0, "patches"))


def test_incremental_run_on_a_remote_cache_keeps_finished_shards_and_equals_local(tmp_path, s3, bucket, dinov3_path):
    """New images in the folder: new bucket groups and a new index beside the old, one conditional metadata switch;
    no finished shard object is rewritten (their ETags are unchanged), and the result equals the same run locally."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48), (48, 64), (64, 64)] * 2)
    kw = {**FAST, "model": str(dinov3_path), "area": 64, "shard_mb": 0.002, "batch_size": 1}
    url, local = f"s3://{bucket}/inc", tmp_path / "local"
    assert extract(imgs, url, **kw).sealed and extract(imgs, local, **kw).sealed
    c = s3.client()

    def etags() -> dict[str, str]:
        got = c.list_objects_v2(Bucket=bucket, Prefix="inc/buckets/").get("Contents", [])
        return {o["Key"]: o["ETag"] for o in got if "/c/" in o["Key"]}

    before = etags()
    write_images(imgs / "later", [(80, 60), (64, 64)], start_seed=50)
    s = extract(imgs, url, **kw)
    assert s.appended == 2 and s.processed == 2 and s.sealed
    extract(imgs, local, **kw)
    after = etags()
    assert {k: after[k] for k in before} == before, "a finished shard was rewritten"
    assert len(after) > len(before)
    assert_same_caches(FeatureCache(local), FeatureCache(url))
    assert validate(url, imgs, progress=False).ok


@pytest.mark.slow
def test_two_processes_into_s3_equal_one_local(tmp_path, bucket, dinov3_path):
    """A process group (gloo on CPU) writing one remote cache: rank 0 holds the lock object and plans, every rank
    PUTs its own shards; the result equals one local process."""
    from dinofeat.extraction.config import ExtractConfig
    from dinofeat.extraction.launch import extract_processes

    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 64)] * 10 + [(96, 48)] * 6)
    cfg = ExtractConfig(model=str(dinov3_path), area=64, shard_mb=0.002, batch_size=3, **FAST)
    url = f"s3://{bucket}/mp"
    s = extract_processes(imgs, url, cfg, 2)
    assert s.world_size == 2 and s.sealed and s.done == 16
    assert extract(imgs, tmp_path / "local", cfg).sealed
    assert_same_caches(FeatureCache(tmp_path / "local"), FeatureCache(url))


def test_a_manual_split_is_refused_on_a_remote_cache(bucket, dinov3_path, image_dir):
    with pytest.raises(ConfigError, match="process group"):
        extract(image_dir, f"s3://{bucket}/split", **FAST, model=str(dinov3_path), area=64, rank=0, world_size=2)
