"""Multi-process precompute on CPU (gloo): our launcher, torchrun (the launcher `accelerate launch` uses on GPUs) and
a manual SLURM-style split all give exactly the single-process result; a resume may change the process count."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dinofeat.cache.store import Store
from dinofeat.errors import CacheMismatchError, ConfigError
from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.launch import extract_processes
from dinofeat.extraction.run import extract
from tests.helpers import FAST, write_images

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, dinov3_path):
    root = tmp_path_factory.mktemp("mp")
    imgs = root / "imgs"
    write_images(imgs, [(64, 64)] * 14 + [(96, 48)] * 9 + [(48, 96)] * 5)
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    cfg = ExtractConfig(model=str(dinov3_path), area=64, shard_mb=0.002, batch_size=3, **FAST)
    ref = root / "ref"
    s = extract(imgs, ref, cfg)
    assert s.sealed and s.failed == 1
    return imgs, cfg, ref


def assert_same_cache(a: Path, b: Path) -> None:
    sa, sb = Store(a), Store(b)
    assert sa.meta["state"] == sb.meta["state"] == "sealed"
    assert sa.index.bucket_plans() == sb.index.bucket_plans()
    ia, ib = sa.index.read(), sb.index.read()
    for col in ia:
        np.testing.assert_array_equal(ia[col], ib[col], err_msg=col)
    assert sa.index.failures() == sb.index.failures()
    # channel statistics: per shard, merged in plan order at seal, so any split of the work gives the same numbers
    assert sa.meta["channel_stats"] is not None and sa.meta["channel_stats"] == sb.meta["channel_stats"]
    for bp in sa.index.bucket_plans():
        for name in sa.shards.names(bp.name):
            np.testing.assert_array_equal(
                sa.shards.read_rows(bp.name, name, 0, bp.rows),
                sb.shards.read_rows(bp.name, name, 0, bp.rows),
                err_msg=bp.name,
            )


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def cli_args(imgs: Path, cache: Path, cfg: ExtractConfig) -> list[str]:
    return [
        "precompute",
        str(imgs),
        str(cache),
        "--model",
        cfg.model,
        "--area",
        str(cfg.area),
        "--shard-mb",
        str(cfg.shard_mb),
        "--batch-size",
        str(cfg.batch_size),
        "--workers",
        "0",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    ]


def test_two_processes_equal_one(setup, tmp_path):
    imgs, cfg, ref = setup
    s = extract_processes(imgs, tmp_path / "c", cfg, 2)
    assert s.world_size == 2 and s.sealed and s.processed == s.done and s.failed == 1
    assert [r.rank for r in s.ranks] == [0, 1] and sum(r.images for r in s.ranks) == s.processed  # what each did
    # rank 1 read from the index only the images of its shards (issue 29.3); rank 0 planned and holds them all
    held = Store(tmp_path / "c").index.plan(share=(1, 2))
    assert s.ranks[0].plan_images == s.total and s.ranks[1].plan_images == len(held) < s.total - s.failed
    assert len(held) > 0 and all(o % 2 == 1 for o in _ordinals(held))
    markers = {m["shard"] for m in Store(tmp_path / "c").markers.read().values()}
    assert len(markers) > 2
    assert_same_cache(ref, tmp_path / "c")


def _ordinals(plan) -> list[int]:
    """The shard ordinal of every image a plan holds (see Plan.shards)."""
    ordinal = {(r.bucket, r.shard): r.ordinal for r in plan.shards()}
    return [ordinal[plan.shard_of(i)] for i in range(len(plan))]


LAUNCHERS = {
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "dinofeat",
    ],
    "torchrun": ["-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "dinofeat"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_accelerate_launch_and_torchrun_equal_one_process(setup, tmp_path, launcher):
    """`--multi_gpu` is accelerate's multi-process launcher; with --device cpu it runs on gloo, as CI can."""
    imgs, cfg, ref = setup
    out = cli(*LAUNCHERS[launcher], *cli_args(imgs, tmp_path / "c", cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("sealed") == 1, "only rank 0 prints the summary"
    assert "by 2 processes" in out.stdout, out.stdout
    assert "rank 0 of 2: " in out.stdout and "rank 1 of 2: " in out.stdout, out.stdout  # what each process did
    assert_same_cache(ref, tmp_path / "c")


def test_manual_split_then_resume_with_another_process_count(setup, tmp_path):
    imgs, cfg, ref = setup
    cache = tmp_path / "c"
    first = extract(imgs, cache, cfg, rank=0, world_size=3)  # rank 0 plans and extracts a third of the shards
    assert not first.sealed and 0 < first.processed < 28
    st = Store(cache)
    marked = set(st.markers.read())
    assert marked and all(s.ordinal % 3 == 0 for s in st.index.plan().shards() if (s.bucket, s.shard) in marked)
    second = extract_processes(imgs, cache, cfg, 2)  # the rest, by 2 processes
    assert second.sealed and first.processed + second.processed == 28
    assert_same_cache(ref, cache)


def run_split_rank_1_first(args: list[str]) -> tuple[str, str]:
    """A 2-rank manual split whose rank 1 starts before rank 0; both must finish cleanly. Returns what each printed
    (rank 0's, rank 1's)."""
    early = subprocess.Popen(
        [sys.executable, "-m", "dinofeat", *args, "--rank", "1", "--world-size", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    leader = cli("-m", "dinofeat", *args, "--rank", "0", "--world-size", "2")
    text = early.communicate(timeout=300)[0]
    assert leader.returncode == 0 and early.returncode == 0, leader.stdout + leader.stderr + text
    return leader.stdout, text


def test_manual_split_ranks_wait_for_rank_0s_plan(setup, tmp_path):
    imgs, cfg, ref = setup
    cache = tmp_path / "c"
    args = cli_args(imgs, cache, cfg)
    said = run_split_rank_1_first(args)
    assert_same_cache(ref, cache)
    # issue 30.2: each rank says what it did itself (rank 1 printed nothing), and the rank that finished first, while
    # the other still ran, says the rest is that rank's share, not "pending" on a cache that ends sealed
    shards = 0
    for rank, text in enumerate(said):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"rank {rank} of 2: "))
        assert "images (" in line and "failed)" in line, line
        shards += int(line.split("), ")[1].split()[0])
        assert not re.search(r"[1-9]\d* pending", text), text
    assert shards == len(Store(cache).markers.read())
    assert sum("; sealed" in text for text in said) >= 1


def test_errors_reach_the_caller_from_every_process(setup, tmp_path):
    imgs, cfg, _ = setup
    cache = tmp_path / "c"
    extract_processes(imgs, cache, cfg, 2)
    with pytest.raises(CacheMismatchError, match="bucket_spec"):
        extract_processes(imgs, cache, ExtractConfig(**{**cfg.__dict__, "area": 128}), 2)
    with pytest.raises(ConfigError, match="cannot be combined"):
        extract_processes(imgs, cache, ExtractConfig(**{**cfg.__dict__, "rank": 1, "world_size": 2}), 2)
    with pytest.raises(ConfigError, match="--overwrite"):
        extract(imgs, cache, cfg, rank=0, world_size=2, overwrite=True)
    out = cli("-m", "dinofeat", *cli_args(imgs, cache, cfg), "--area", "128", "--num-processes", "2")
    assert out.returncode == 1 and "different settings" in out.stderr


def test_manual_split_incremental_run_waits_for_the_extension(setup, tmp_path):
    """A rank that starts before rank 0 has added new images must not take the old (sealed) plan as final."""
    import shutil

    imgs, cfg, _ = setup
    grown = tmp_path / "imgs"
    shutil.copytree(imgs, grown)
    cache = tmp_path / "c"
    extract(grown, cache, cfg)
    write_images(grown / "later", [(64, 64)] * 4 + [(48, 96)] * 3, start_seed=70)
    args = cli_args(grown, cache, cfg)
    run_split_rank_1_first(args)
    st = Store(cache)
    assert st.meta["state"] == "sealed" and len(st.index.plan()) == 29 + 7
    fresh = tmp_path / "fresh"
    extract(grown, fresh, cfg)
    from dinofeat.read.reader import FeatureCache

    a, b = FeatureCache(cache), FeatureCache(fresh)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in b.keys():  # noqa: SIM118
        # batches differ from the fresh run's (new images batch among themselves), and a CPU GEMM's rounding may
        # depend on the batch shape: equal to fp16 storage precision, not bit for bit (that is tested with fixed
        # batches in test_incremental.py)
        np.testing.assert_allclose(a[k].patches, b[k].patches, atol=2e-3, rtol=0, err_msg=k)


def test_a_refusal_by_the_lock_is_one_line_on_every_rank(setup):
    """Issue 32.10: rank 0 is refused by the lock while rank 1 waits for its plan. Rank 0 hands rank 1 its error,
    so each process ends in the same one line (before, rank 1 was cut off: gloo's RuntimeError traceback, or
    torchrun's SIGTERM). What is left is torchrun's own report of failed workers, whose traceback is its own."""
    from dinofeat.cache.lock import CacheLock

    imgs, cfg, ref = setup
    with CacheLock(ref, what="holder"):
        out = cli(*LAUNCHERS["torchrun"], *cli_args(imgs, ref, cfg))
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    refusal = f"error: {ref} is in use by another dinofeat run (holder: pid "
    assert sum(line.startswith(refusal) for line in text.splitlines()) == 2, text
    assert "interrupted" not in text and "gloo" not in text, text
    assert not [line for line in text.splitlines() if line.strip().startswith('File "') and "dinofeat" in line], text


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_workers_stop_when_their_launcher_is_killed(tmp_path, dinov3_path):
    """Issue 32.11: torchrun starts each worker in a session of its own, so killing the launcher's process group
    left them running (some finished the cache, some waited forever). Now each worker notices its launcher is gone
    and stops as on Ctrl-C, long before the cache could be finished."""
    import os
    import signal
    import time

    # enough work that a run left alone takes many times the watcher's poll (1 s) on a fast 2-core VM (100 images
    # finished in about a second on one)
    write_images(tmp_path / "imgs", [(64, 64)] * 800)
    cfg = ExtractConfig(model=str(dinov3_path), area=64, shard_mb=0.002, batch_size=1, **FAST)
    cache = tmp_path / "c"
    args = [sys.executable, *LAUNCHERS["torchrun"], *cli_args(tmp_path / "imgs", cache, cfg)]
    launcher = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not list((cache / "_dinofeat" / "done").rglob("*.json")):  # polling for the run's first shard
        assert launcher.poll() is None and time.monotonic() < deadline, "the run never marked a shard"
        time.sleep(0.05)
    workers = _children(launcher.pid)
    assert len(workers) == 2, workers
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's group: torchrun itself, not its workers' sessions
    launcher.wait()
    deadline = time.monotonic() + 60
    while any(_running(w) for w in workers):  # polling the orphans' state
        assert time.monotonic() < deadline, "the workers outlived their launcher by a minute"
        time.sleep(0.1)
    assert Store(cache).meta["state"] != "sealed", "the workers finished the cache instead of stopping"
