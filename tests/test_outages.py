"""Object-storage outages, with real parts only: moto's S3 server (its own process, 127.0.0.1) and, between
dinofeat and it, a TCP proxy of our own that a test cuts and restores. Cut, the proxy resets every connection
(the client sees what it sees when a server stops: `Connection reset by peer`, then `Could not connect to the
endpoint URL`) while moto keeps its data in memory. The tests watch the run through moto's own endpoint, never
through the proxy, and restore the proxy on events (a request it refused), never after a sleep."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from dinofeat import FeatureCache, extract, filesystems
from dinofeat.cache.lock import ObjectLock
from dinofeat.cache.objects import RemoteFiles
from dinofeat.errors import DinofeatError
from tests.cutproxy import CutProxy
from tests.helpers import FAST, assert_same_caches, run_cli, write_images
from tests.s3server import S3Server, serve

LOCK = "feats.dinofeat-lock"
MARKERS = "feats/_dinofeat/done/"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    import fsspec.config
    import s3fs

    before = fsspec.config.conf.get("s3", {}).get("config_kwargs", {}).get("retries")
    filesystems._FILESYSTEMS.clear()  # an s3fs made while another module's server ran would still reach that one
    s3fs.S3FileSystem.clear_instance_cache()  # zarr's own, too
    yield from serve(S3Server())
    filesystems._FILESYSTEMS.clear()
    s3fs.S3FileSystem.clear_instance_cache()
    config = fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", {})
    if before is None:  # the retry settings these tests chose (one attempt) do not outlive them
        config.pop("retries", None)
    else:
        config["retries"] = before


_BUCKETS = iter(range(10_000))


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.bucket(f"dinofeat-outage-{os.getpid()}-{next(_BUCKETS)}")


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[CutProxy]:
    p = CutProxy(s3.port)
    yield p
    p.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("outage-images")
    write_images(d, [(64, 64)] * 8 + [(96, 48)] * 4)
    return d


@pytest.fixture(scope="module")
def reference(images, dinov3_path, tmp_path_factory) -> Path:
    """The same images precomputed into a local cache: what every remote run must equal, bit for bit."""
    ref = tmp_path_factory.mktemp("outage-ref") / "ref"
    assert extract(images, ref, **FAST, model=str(dinov3_path), area=64, shard_mb=0.002, batch_size=1).sealed
    return ref


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`python -m dinofeat ARGS`, without transformers' "Loading weights" bar, and dumping its threads on SIGABRT."""
    return run_cli(args, {**env, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONFAULTHANDLER": "1"})


def _precompute(images: Path, url: str, model: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`precompute` with small shards and one image per batch: a run of a few seconds, many marked shards."""
    args = ["precompute", str(images), url, "--model", str(model), "--area", "64", "--dtype", "fp32",
            "--workers", "0", "--shard-mb", "0.002", "--batch-size", "1", "--device", "cpu", "--json"]  # fmt: skip
    return _cli(args, env)


def _output(proc: subprocess.Popen[bytes], timeout: float = 120) -> str:
    """Everything the command printed; a command that hangs fails the test with every thread's stack."""
    try:
        return proc.communicate(timeout=timeout)[0].decode()
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        pytest.fail(f"the command hung:\n{proc.communicate(timeout=30)[0].decode()}")


def _keys(s3: S3Server, bucket: str, prefix: str = "") -> list[str]:
    got = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [o["Key"] for o in got]


def _cut_at_the_first_marker(s3: S3Server, bucket: str, proxy: CutProxy, proc: subprocess.Popen[bytes]) -> None:
    """Cut the proxy as soon as moto (asked directly) holds the run's first done marker."""
    deadline = time.monotonic() + 120
    while not _keys(s3, bucket, MARKERS):
        assert proc.poll() is None, proc.communicate()[0].decode()
        assert time.monotonic() < deadline, "the run marked no shard"
        time.sleep(0.05)  # polling the server for the run's progress
    proxy.cut()


def _through(proxy: CutProxy, s3: S3Server, **extra: str) -> dict[str, str]:
    return {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint, **extra}


@contextlib.contextmanager
def _without(*names: str) -> Iterator[None]:
    """run_cli passes this process's environment on: take these out of it meanwhile."""
    old = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(old)


def _lock_body(s3: S3Server, bucket: str) -> dict:
    return json.loads(s3.client().get_object(Bucket=bucket, Key=LOCK)["Body"].read())


@pytest.mark.slow
def test_an_outage_past_the_retries_ends_in_one_line_releases_the_lock_and_the_rerun_resumes(
    s3, bucket, proxy, images, reference, dinov3_path
):
    """Cut mid-run, for longer than the client retries (one attempt per request here): exit 1 with one line that
    names the store's error and says to rerun. The cut lasts until the run, on its way out, asks for its lock
    object; then the store answers again, the release (retried) deletes it, and the same command resumes and
    seals a cache bit-identical to a local run."""
    url = f"s3://{bucket}/feats"
    proxy.restore_when = lambda refused: LOCK in refused[-1]  # the run gave up and is releasing its lock
    proc = _precompute(images, url, dinov3_path, _through(proxy, s3, DINOFEAT_STORE_ATTEMPTS="1"))
    _cut_at_the_first_marker(s3, bucket, proxy, proc)
    text = _output(proc)
    lines = text.strip().splitlines()
    assert proc.returncode == 1, text
    assert len(lines) == 1, text
    assert lines[0].startswith(f"error: object store {url} failed: ") and "Could not connect to the endpoint" in text
    assert "rerun the same command to resume" in lines[0]
    assert proxy.restored.is_set() and any(LOCK in r for r in proxy.refused)
    assert LOCK not in _keys(s3, bucket), "the lock object was not released once the store answered again"
    marked = len(_keys(s3, bucket, MARKERS))
    assert 0 < marked < 12, "the run was cut mid-run"
    rerun = _precompute(images, url, dinov3_path, _through(proxy, s3))
    text = _output(rerun)
    assert rerun.returncode == 0, text
    summary = json.loads(text)
    assert summary["sealed"] and 0 < summary["processed"] < 12, "the rerun did not resume"
    assert_same_caches(FeatureCache(reference), FeatureCache(url))
    assert LOCK not in _keys(s3, bucket)


@pytest.fixture
def even_backoff_env(tmp_path) -> dict[str, str]:
    """`even_backoff` for a dinofeat process the test starts: a sitecustomize on its PYTHONPATH takes the jitter out
    of botocore's backoff (0.1 x 2^n s), so waiting out 8 attempts takes seconds, not up to a minute."""
    site = tmp_path / "even-backoff"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import types\nimport botocore.retryhandler\n"
        "botocore.retryhandler.random = types.SimpleNamespace(random=lambda: 0.1)\n"
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_an_outage_shorter_than_the_retries_is_waited_out(
    s3, bucket, proxy, images, reference, dinov3_path, even_backoff_env
):
    """Cut mid-run until one request has been refused 11 times: past botocore's default (5 attempts, and aiohttp
    tries each attempt's connection twice: 10), within the attempts the run is given (8 here; 6 by default). The
    run waits it out and seals a cache bit-identical to a local run."""
    url = f"s3://{bucket}/feats"
    proxy.restore_when = lambda refused: max(Counter(refused).values()) >= 11
    env = _through(proxy, s3, DINOFEAT_STORE_ATTEMPTS="8", **even_backoff_env)
    proc = _precompute(images, url, dinov3_path, env)
    _cut_at_the_first_marker(s3, bucket, proxy, proc)
    text = _output(proc, timeout=180)
    assert proc.returncode == 0, text
    assert proxy.restored.is_set(), "the run ended before the outage did"
    assert_same_caches(FeatureCache(reference), FeatureCache(url))
    assert LOCK not in _keys(s3, bucket)


def _one_line_refusal(proc: subprocess.Popen[bytes]) -> str:
    text = _output(proc)
    assert proc.returncode == 1, text
    assert len(text.strip().splitlines()) == 1, text
    return text.strip()


def test_missing_credentials_end_in_one_line_and_create_nothing(s3, bucket, images, dinov3_path, tmp_path):
    env = {k: v for k, v in s3.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    nowhere = str(tmp_path / "no-aws-files")
    env |= {"AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere, "AWS_EC2_METADATA_DISABLED": "true"}
    with _without("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        proc = _cli(["precompute", str(images), f"s3://{bucket}/feats", "--model", str(dinov3_path), "--json"], env)
    line = _one_line_refusal(proc)
    assert line == (
        f"error: no credentials for s3://{bucket}/feats (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
        "or an instance role)"
    )
    assert _keys(s3, bucket) == []


def test_a_missing_bucket_ends_in_one_line_and_creates_nothing(s3, images, dinov3_path):
    url = f"s3://no-such-bucket-{os.getpid()}/feats"
    proc = _cli(["precompute", str(images), url, "--model", str(dinov3_path), "--json"], s3.env)
    assert _one_line_refusal(proc) == f"error: bucket 'no-such-bucket-{os.getpid()}' does not exist ({url})"
    assert f"no-such-bucket-{os.getpid()}" not in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]


@pytest.fixture
def via_proxy(proxy, monkeypatch) -> Iterator[CutProxy]:
    """This process's clients go through the proxy, one attempt per request (an outage fails at once)."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("DINOFEAT_STORE_ATTEMPTS", "1")
    monkeypatch.setattr(filesystems, "_FILESYSTEMS", {})
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy
    s3fs.S3FileSystem.clear_instance_cache()


def test_lock_renewal_survives_an_outage(s3, bucket, via_proxy):
    """Renewals the store does not answer are tried again at the next beat: once it answers, renewals go on
    (before, the first one that failed ended the renewing thread, and the lock expired under a live run)."""
    proxy = via_proxy
    with ObjectLock(RemoteFiles("s3", bucket, "feats"), "long", ttl_s=30, beat_s=0.1) as held:
        # 12 refused requests for the lock object: several renewals failed (one attempt each here), more than one
        # renewal with botocore's default retries (5 attempts, 2 connections each) would ever make
        proxy.restore_when = lambda refused: sum(LOCK in r for r in refused) >= 12
        proxy.cut()
        assert proxy.restored.wait(20), "renewals stopped during the outage"
        restored_at = time.time()
        deadline = time.monotonic() + 10
        while float(_lock_body(s3, bucket).get("renewed", 0)) <= restored_at:
            assert time.monotonic() < deadline, "renewals stopped after the outage"
            time.sleep(0.05)  # polling the server for the next renewal
        assert not held.lost
    assert LOCK not in _keys(s3, bucket)


@pytest.mark.parametrize("lock_outside", [True, False])
def test_a_lock_the_store_cannot_release_says_when_it_expires(s3, bucket, via_proxy, lock_outside):
    """The store stays down past the release's retries: the error's second line names the lock object, when it
    expires and how to take over sooner; the object is still there once the store answers. Either nesting: the
    store's error already turned into one line when the lock lets go, or (as in a run) still the client's own."""
    from dinofeat.storeerrors import store_errors

    files = RemoteFiles("s3", bucket, "feats")
    lock, lines_of = ObjectLock(files, "run", release_s=1.0), store_errors(files.location)
    outer, inner = (lock, lines_of) if lock_outside else (lines_of, lock)
    with pytest.raises(DinofeatError) as err, outer, inner:
        via_proxy.cut()
        files.read("zarr.json")
    lines = str(err.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"object store s3://{bucket}/feats failed: Could not connect to the endpoint URL")
    assert f"the lock object s3://{bucket}/{LOCK} could not be released" in lines[1]
    assert re.search(r"it expires at \d\d:\d\d:\d\d \(300 s after its last renewal, in (300|29\d) s\)", lines[1])
    assert "delete that object" in lines[1]
    via_proxy.restore()
    assert LOCK in _keys(s3, bucket)


def test_info_and_validate_end_in_one_line_when_the_store_is_down(s3, bucket, images, dinov3_path, via_proxy):
    """Down before they start, or (validate) from its first read of an array on: one line each, never a report
    of damage (whose advice is to rebuild the cache)."""
    from dinofeat.inspection.info import info
    from dinofeat.inspection.validate import validate

    def one_line(command: Callable[[], object]) -> None:
        with pytest.raises(DinofeatError) as err:
            command()
        assert str(err.value).startswith(f"object store {url} failed: Could not connect to the endpoint URL")
        assert "\n" not in str(err.value) and str(err.value).endswith("; rerun once the store answers again")

    url = f"s3://{bucket}/feats"
    assert extract(images, url, **FAST, model=str(dinov3_path), area=64, shard_mb=0.002).sealed
    assert validate(url, progress=False).ok
    via_proxy.cut()
    one_line(lambda: info(url))
    one_line(lambda: validate(url, progress=False))
    via_proxy.restore()
    via_proxy.cut_on = f"/{bucket}/feats/buckets/".encode()  # cut as validate reads the cache's arrays
    one_line(lambda: validate(url, progress=False))
    assert via_proxy.cut_on is None, "validate never read an array"


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_later_epochs_from_a_local_shard_cache_need_no_store(
    s3, bucket, images, reference, dinov3_path, via_proxy, tmp_path, context
):
    """Issue 32.8: once an epoch has fetched every shard into `local_cache`, the store may go down. The next
    epochs' fresh DataLoader workers ask it nothing (before, each re-read the arrays' zarr.json, and a spawned one
    the cache's metadata, and failed): array metadata is kept in the local folder, checked against the checksums
    the cache's metadata records, and the rebuilt-cache check reads the metadata the reader kept there."""
    from torch.utils.data import DataLoader

    from dinofeat import FeatureDataset

    url = f"s3://{bucket}/feats"
    assert extract(images, url, **FAST, model=str(dinov3_path), area=64, shard_mb=0.002).sealed
    fc = FeatureCache(url, local_cache=tmp_path / "shards")
    loader = DataLoader(
        FeatureDataset(fc), batch_size=None, num_workers=2, multiprocessing_context=context, timeout=120
    )
    ref = FeatureCache(reference)
    want = {k: ref[k].patches for k in ref.keys()}  # noqa: SIM118 (a FeatureCache is no dict)
    for epoch in range(3 if context == "fork" else 2):
        if epoch == 1:
            via_proxy.cut()
        got = {s["key"]: s["patches"].numpy() for s in loader}  # fresh workers every epoch
        assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert via_proxy.refused == [], "a worker of a later epoch asked the store"
    kept = [
        p.relative_to(tmp_path / "shards" / ".meta").as_posix() for p in (tmp_path / "shards").rglob(".meta/**/*.json")
    ]
    assert any(p.endswith("/patches/zarr.json") for p in kept) and any(p.startswith("locations/") for p in kept)


@pytest.fixture(scope="module")
def many_shards(images, dinov3_path, tmp_path_factory) -> Path:
    """A local cache of 40 one-image shards: 40 done markers, more than validate fetches at once (32)."""
    src = tmp_path_factory.mktemp("outage-many-images")
    write_images(src, [(64, 64)] * 40)
    cache = tmp_path_factory.mktemp("outage-many") / "c"
    assert extract(src, cache, **FAST, model=str(dinov3_path), area=64, shard_mb=0.002, batch_size=8).sealed
    return cache


def _upload(s3: S3Server, local: Path, bucket: str, prefix: str) -> str:
    """A local cache's files under a prefix: a valid remote cache (docs/format.md)."""
    client = s3.client()
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture
def even_backoff(monkeypatch) -> None:
    """botocore's backoff without its jitter: 0.1 x 2^n s (0.1, 0.2, 0.4, ...). The schedule the tests rely on is
    the same, in a fraction of the time, and every request keeps to it (no request runs out of attempts early)."""
    import types

    import botocore.retryhandler

    monkeypatch.setattr(botocore.retryhandler, "random", types.SimpleNamespace(random=lambda: 0.1))


def test_validate_rides_out_an_outage_while_reading_the_markers(s3, bucket, via_proxy, many_shards, even_backoff):
    """Issue 32.9: the store goes down as validate fetches the done markers (32 at a time) and stays down until the
    proxy refused 300 connections: each request retries with its own backoff (10 attempts here) and the report is
    clean. Before, botocore's standard mode shared one retry quota per client (100 retries of connection errors):
    the parallel requests used it up (at most 280 refused connections for 40 markers) and every request then
    failed at its first error."""
    from dinofeat.inspection.validate import validate

    url = _upload(s3, many_shards, bucket, "feats")
    via_proxy.restore_when = lambda refused: len(refused) >= 300
    via_proxy.cut_on = f"/{bucket}/{MARKERS}".encode()  # the first GET of a done marker
    os.environ["DINOFEAT_STORE_ATTEMPTS"] = "10"  # via_proxy's monkeypatch restores it
    report = validate(url, progress=False)
    assert via_proxy.restored.is_set() and via_proxy.cut_on is None, "the outage never happened"
    assert report.ok, report.problems
    assert all(MARKERS in r for r in via_proxy.refused), "validate read something else during the outage"


def test_readers_in_dataloader_workers_raise_one_store_error(s3, bucket, images, dinov3_path, via_proxy):
    """Issue 32.10: the store goes down as DataLoader workers read rows. Training gets dinofeat's StoreError, whose
    text (torch sends the worker's traceback as the text) ends in dinofeat's one line and holds none of the client's
    chained tracebacks; before, it got botocore's error with aiohttp's and botocore's chain."""
    import torch

    from dinofeat.errors import StoreError
    from dinofeat.read.dataset import FeatureDataset

    url = f"s3://{bucket}/feats"
    assert extract(images, url, **FAST, model=str(dinov3_path), area=64, shard_mb=0.002).sealed
    via_proxy.cut_on = f"/{bucket}/feats/buckets/".encode()  # the first row a worker reads
    loader = torch.utils.data.DataLoader(FeatureDataset(url), batch_size=4, num_workers=2)
    with pytest.raises(StoreError) as err:
        list(loader)
    text = str(err.value)
    assert via_proxy.cut_on is None, "no worker read a row"
    assert "DataLoader worker" in text  # torch's wrapping, with the worker's own traceback
    assert text.splitlines()[-1].startswith(f"dinofeat.errors.StoreError: object store {url} failed: "), text
    assert not any(client in text for client in ("botocore", "aiohttp", "s3fs", "fsspec")), text
    via_proxy.restore()
    via_proxy.cut()
    with pytest.raises(StoreError, match=r"rerun once the store answers again$"):
        FeatureDataset(url)  # in this process too, when it opens
