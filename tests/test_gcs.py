"""Caches and sources on gs://, against a real Google Cloud Storage API server (gcp-storage-emulator, its own
process, 127.0.0.1), reached by gcsfs through STORAGE_EMULATOR_HOST. The second object store the cache is tested
on. The emulator ignores GCS's generation preconditions, so the tests' server adds the one upload precondition
dinofeat uses (tests/s3server.py): the tests prove what dinofeat sends and how it takes a refusal, not GCS itself."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import fsspec
import numpy as np
import pytest
import torch

pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (the test extra installs it)")
pytest.importorskip("gcp_storage_emulator", reason="the GCS test server comes from the test extra")

from dinofeat import FeatureCache, extract
from dinofeat.cache.lock import ObjectLock
from dinofeat.cache.objects import RemoteFiles
from dinofeat.cache.store import Store
from dinofeat.errors import CacheConflictError, CacheLockedError
from dinofeat.inspection.info import info
from dinofeat.inspection.validate import validate
from dinofeat.read.dataset import FeatureDataset
from tests.helpers import FAST, assert_same_caches, make_parquet
from tests.s3server import GCSServer, serve

BUCKET = "dinofeat-test"


@pytest.fixture(scope="module")
def gcs():
    yield from serve(GCSServer((BUCKET,), preconditions=True))  # GCS's ifGenerationMatch, which the emulator lacks


def test_gs_cache_reads_back_bit_identical_and_resumes(tmp_path, gcs, dinov3_path, image_dir):
    kw = {**FAST, "model": str(dinov3_path), "area": 64, "shard_mb": 0.01}
    url = f"gs://{BUCKET}/{os.getpid()}/feats"
    local = extract(image_dir, tmp_path / "local", **kw)
    remote = extract(image_dir, url, **kw)
    assert remote.sealed and remote.done == local.done == 10
    assert_same_caches(FeatureCache(tmp_path / "local"), FeatureCache(url))
    assert_same_caches(FeatureCache(tmp_path / "local"), FeatureCache(url, local_cache=tmp_path / "shards"))
    again = extract(image_dir, url, **kw)
    assert again.sealed and again.processed == 0  # a sealed cache has nothing left to do
    report = validate(url, progress=False)
    assert report.ok, report.problems
    assert info(url)["done"] == 10


def test_gs_dataloader_with_two_workers(tmp_path, gcs, dinov3_path, image_dir):
    """Forked workers each make their own gcsfs client (fsspec resets its event loop after a fork)."""
    url = f"gs://{BUCKET}/{os.getpid()}/dl"
    extract(image_dir, url, **{**FAST, "model": str(dinov3_path), "area": 64})
    ds = FeatureDataset(url)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = {s["key"]: s["patches"] for s in loader}
    ref = FeatureCache(url)
    assert set(got) == set(ref.keys())
    for k, v in got.items():
        np.testing.assert_array_equal(v.numpy(), ref[k].patches)


def test_parquet_on_gs_gives_the_same_cache_as_local(tmp_path, gcs, dinov3_path):
    pytest.importorskip("pyarrow", reason="parquet sources need pyarrow (the test extra installs it)")
    make_parquet(tmp_path / "pq", tmp_path / "folder", "hf", files=2)
    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    prefix = f"{BUCKET}/{os.getpid()}/pq"
    for f in sorted((tmp_path / "pq").glob("*.parquet")):
        fs.put_file(str(f), f"{prefix}/{f.name}")
    kw = {**FAST, "model": str(dinov3_path), "area": 64}
    a = extract(str(tmp_path / "pq" / "*.parquet"), tmp_path / "from-local", **kw)
    b = extract(f"gs://{prefix}/part-{{00000..00001}}.parquet", tmp_path / "from-gs", **kw)
    assert (b.done, b.failed) == (a.done, a.failed) == (8, 2)
    assert_same_caches(FeatureCache(tmp_path / "from-local"), FeatureCache(tmp_path / "from-gs"))


# the command, with gcsfs's retry sleeps (1, 2, 4, 8, 16 s: it has no setting for them) 50 times shorter
_FAST_RETRIES = (
    "import asyncio, sys, types, gcsfs.retry as r; "
    "r.asyncio = types.SimpleNamespace(sleep=lambda s: asyncio.sleep(s / 50)); "
    "from dinofeat.cli import main; sys.argv[0] = 'dinofeat'; main()"
)


def test_an_outage_mid_run_ends_in_one_line(tmp_path, gcs, dinov3_path):
    """Issue 32.10: the store goes down as the run writes its first done marker and stays down past gcsfs's retries.
    The run prints dinofeat's one line, exit 1 (before, gcsfs logged each request out of retries with its
    traceback: 137 lines before it), and releases its lock once the store answers again."""
    from tests.cutproxy import CutProxy
    from tests.helpers import write_images

    write_images(tmp_path / "images", [(64, 64)] * 6)
    url = f"gs://{BUCKET}/{os.getpid()}/outage"
    proxy = CutProxy(gcs.port)
    proxy.cut_on = b"_dinofeat/done/64x64/0.json"  # in the first marker's upload (the emulator serves one request
    # at a time: watching the run through it would stall it)
    proxy.restore_when = lambda refused: "outage.dinofeat-lock" in refused[-1]  # the run is releasing its lock
    args = ["precompute", str(tmp_path / "images"), url, "--model", str(dinov3_path), "--area", "64", "--json",
            "--dtype", "fp32", "--workers", "0", "--shard-mb", "0.002", "--batch-size", "1"]  # fmt: skip
    env = {**os.environ, "STORAGE_EMULATOR_HOST": proxy.endpoint, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _FAST_RETRIES, *args], env=env, capture_output=True, timeout=180)
        restored = proxy.restored.is_set()
    finally:
        proxy.close()
    text = (done.stdout + done.stderr).decode()
    assert done.returncode == 1 and proxy.cut_on is None and restored, text
    assert text.strip().splitlines() == [
        f"error: object store {url} failed: ClientOSError: [Errno 104] Connection reset by peer; finished shards "
        "are kept: rerun the same command to resume"
    ], text
    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    assert not fs.exists(f"{BUCKET}/{os.getpid()}/outage.dinofeat-lock"), "the lock was not released"


def _take_at_once(files: RemoteFiles) -> list[str]:
    """Two runs take the lock at the same moment: what each got. A holder lets go once both have tried."""
    start, tried, outcomes = threading.Barrier(2), threading.Barrier(2), []

    def take(name: str) -> None:
        lock = ObjectLock(files, name)
        start.wait()
        try:
            lock.__enter__()
        except CacheLockedError:
            outcomes.append("refused")
            tried.wait()
            return
        outcomes.append("held")
        tried.wait()
        lock.__exit__(None, None, None)

    threads = [threading.Thread(target=take, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return sorted(outcomes)


def test_two_runs_that_take_the_lock_at_once_never_both_get_it(gcs):
    """Issue 32.11: two runs create the lock object at the same moment, 12 times: each time exactly one holds it
    and the other is refused (before, a check followed by a write let both through in 1 of 3 tries)."""
    files = RemoteFiles("gs", BUCKET, f"{os.getpid()}/race")
    for attempt in range(12):
        assert _take_at_once(files) == ["held", "refused"], f"try {attempt}"


def test_a_metadata_write_from_a_stale_generation_is_refused_by_the_store(gcs, dinov3_path, image_dir):
    """The metadata's compare-and-swap is GCS's own: a write conditional on a generation that is no longer the
    object's is refused by the store (412), so two writers that both passed the generation check cannot both write."""
    url = f"gs://{BUCKET}/{os.getpid()}/cas"
    extract(image_dir, url, **{**FAST, "model": str(dinov3_path), "area": 64})
    a, b = Store(url, mode="r+"), Store(url, mode="r+")
    _, stale = b.files.read_versioned("zarr.json")
    a.metafile.update(note="a")
    assert b.files.replace("zarr.json", b"{}", stale) is None
    with pytest.raises(CacheConflictError):
        b.metafile.update(note="b")
    assert Store(url).meta["note"] == "a"
