"""BucketBatchSampler across processes: the documented DDP and accelerate recipes each serve every image once per
epoch plus exactly the documented padding, accelerate's set_epoch reshuffles, and a sampler split twice (its own
rank/world_size, then accelerator.prepare) raises ConfigError instead of silently serving about half an epoch."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import DataLoader

from dinofeat.errors import ConfigError
from dinofeat.read.sampler import BucketBatchSampler, plan_batches
from tests.helpers import FAST, write_images

DOC = Path(__file__).resolve().parents[1] / "docs" / "dit-integration.md"
BUCKETS = (41, 29, 19, 11)  # images per aspect ratio in the real cache below: 100 in all
SIZES = ((32, 32), (64, 32), (32, 64), (48, 32))  # tiny images, one bucket each at area 64
BS, WORLD = 8, 2
DOUBLE_SPLIT = r"split again across 2 processes by accelerate .* construct it with world_size=1"


def _ids(counts: tuple[int, ...]) -> list[int]:
    return [b for b, n in enumerate(counts) for _ in range(n)]


# ---- the padding arithmetic, by hand (docs/dit-integration.md, "What one epoch serves") --------------------------
# N = sum ceil(n_b / B) (drop_last: floor); each process gets ceil(N / P) batches (drop_last: floor); served = B*P*that
PADDING = [
    # buckets, B, P, drop_last, batches per process, samples served, repeated samples
    (BUCKETS, 8, 2, False, 8, 128, 28),  # N = 15: 20 fill samples + 1 repeated batch (the doc's example)
    (BUCKETS, 8, 2, True, 5, 80, 0),  # N = 11: 1 batch left out, no repeats
    (BUCKETS, 8, 1, False, 15, 120, 20),  # one process: only the fill
    (BUCKETS, 8, 3, False, 5, 120, 20),  # 15 batches deal evenly to 3
    (BUCKETS, 8, 4, False, 4, 128, 28),  # one batch again
    (BUCKETS, 1, 2, False, 50, 100, 0),  # batch size 1 on an even count: exact
    ((3,), 8, 2, False, 1, 16, 13),  # a bucket smaller than the gap: the fill cycles; then the batch again
    ((10, 7, 3, 1), 4, 3, False, 3, 36, 15),  # N = 7: 7 fill + 2 repeated batches
    ((10, 7, 3, 1), 4, 3, True, 1, 12, 0),  # N = 3
]


@pytest.mark.parametrize(("buckets", "bs", "world", "drop_last", "per_process", "served", "repeats"), PADDING)
def test_padding_arithmetic(buckets, bs, world, drop_last, per_process, served, repeats):
    ids = _ids(buckets)
    plans = [
        plan_batches(ids, bs, seed=3, epoch=1, drop_last=drop_last, rank=r, world_size=world) for r in range(world)
    ]
    assert [len(p) for p in plans] == [per_process] * world
    every = [i for p in plans for batch in p for i in batch]
    assert len(every) == served and len(every) - len(set(every)) == repeats
    assert all(len({ids[i] for i in batch}) == 1 for p in plans for batch in p)
    if drop_last:
        assert len(set(every)) == served
    else:
        assert set(every) == set(range(len(ids)))
    n = sum((math.floor if drop_last else math.ceil)(k / bs) for k in buckets)
    assert per_process == (n // world if drop_last else math.ceil(n / world))


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_accelerate_deals_the_batches_the_sampler_would(world, drop_last):
    """accelerate's BatchSamplerShard over a world_size=1 sampler gives each process exactly the batches of the
    sampler's own split: the two recipes pad the same way, to the same processes."""
    ids = _ids(BUCKETS)
    sampler = BucketBatchSampler(ids, BS, seed=5, drop_last=drop_last)
    sampler.set_epoch(2)
    for r in range(world):
        shard = BatchSamplerShard(sampler, num_processes=world, process_index=r)
        own = plan_batches(ids, BS, seed=5, epoch=2, drop_last=drop_last, rank=r, world_size=world)
        assert list(shard) == own and len(shard) == len(own)


def test_accelerate_split_batches_cuts_every_batch_into_equal_pieces():
    """split_batches=True (documented as working): process r gets piece r of every batch, nothing padded."""
    ids = _ids(BUCKETS)
    sampler = BucketBatchSampler(ids, BS, seed=5)
    pieces = [list(BatchSamplerShard(sampler, num_processes=2, process_index=r, split_batches=True)) for r in (0, 1)]
    assert [a + b for a, b in zip(*pieces, strict=True)] == sampler.plan()


@pytest.mark.parametrize("split_batches", [False, True])
def test_a_sampler_split_twice_is_refused(split_batches):
    sampler = BucketBatchSampler(_ids(BUCKETS), BS, rank=1, world_size=2)
    shard = BatchSamplerShard(sampler, num_processes=2, process_index=1, split_batches=split_batches)
    with pytest.raises(ConfigError, match=DOUBLE_SPLIT):
        list(shard)
    with pytest.raises(ConfigError, match=DOUBLE_SPLIT):
        len(shard)


def test_plain_ddp_and_a_one_process_shard_are_not_refused():
    sampler = BucketBatchSampler(_ids(BUCKETS), BS, rank=1, world_size=2)
    loader = DataLoader(range(100), batch_sampler=sampler)
    assert [b.tolist() for b in loader] == sampler.plan() and len(loader) == len(sampler.plan())
    assert list(BatchSamplerShard(sampler, num_processes=1)) == sampler.plan()  # a shard of one splits nothing


def test_accelerates_set_epoch_path_reaches_the_sampler():
    """Prepared, DataLoaderShard.set_epoch calls `batch_sampler.batch_sampler.sampler.set_epoch` (and nothing
    else that reaches us): that path must move the sampler's epoch."""
    sampler = BucketBatchSampler(_ids(BUCKETS), BS)
    shard = BatchSamplerShard(sampler, num_processes=2, process_index=0)
    shard.batch_sampler.sampler.set_epoch(4)
    assert sampler.epoch == 4 and list(shard) == plan_batches(_ids(BUCKETS), BS, epoch=4, rank=0, world_size=2)


# ---- two real processes: gloo on 127.0.0.1, Accelerator(cpu=True), a real cache --------------------------------
def _recipes() -> dict[str, Any]:
    """The doc's several-processes code block, executed as written."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    code = next(b for b in blocks if "def accelerate_loader" in b)
    ns: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), ns)
    return ns


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _process(rank: int, world: int, port: int, cache: str, out: str) -> None:
    """One process of the run: what each recipe served it, per epoch, written to out/<rank>.json."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from dinofeat import FeatureDataset, collate_features, flip_coin

    torch.set_num_threads(1)
    res: dict[str, Any] = {}
    try:
        acc = Accelerator(cpu=True)
        res["processes"] = [acc.process_index, acc.num_processes]
        ns = _recipes()
        res["ddp"] = ns["train"](cache, 2, batch_size=BS)  # ranks from the env, as under torchrun
        res["ddp_drop"] = ns["train"](cache, 1, batch_size=BS, drop_last=True)
        res["acc"] = ns["train"](cache, 3, acc, batch_size=BS)
        res["acc_drop"] = ns["train"](cache, 1, acc, batch_size=BS, drop_last=True)

        ds = FeatureDataset(cache, flip="random")
        loader = ns["accelerate_loader"](ds, acc, BS)
        res["acc_own_count"] = [[k for b in loader for k in b["key"]] for _ in range(2)]  # no set_epoch called
        loader.set_epoch(5)
        res["after_loader_set_epoch"] = [loader.batch_sampler.batch_sampler.epoch, ds.epoch]
        ns["start_epoch"](loader, ds, 6)
        res["after_start_epoch"] = [loader.batch_sampler.batch_sampler.epoch, ds.epoch]
        coins = [(f, flip_coin(0, 6, k)) for b in loader for f, k in zip(b["flipped"].tolist(), b["key"], strict=True)]
        res["coin"] = [
            all(f == c for f, c in coins),
            len({f for f, _ in coins}) == 2,
        ]  # the epoch-6 coin, and not constant

        twice = BucketBatchSampler(ds.bucket_ids, BS, rank=acc.process_index, world_size=acc.num_processes)
        loader = acc.prepare(DataLoader(ds, batch_sampler=twice, collate_fn=collate_features))
        try:
            res["double"] = {"keys": [k for b in loader for k in b["key"]]}
        except ConfigError as e:
            res["double"] = {"error": str(e)}
    except Exception:
        res["crash"] = traceback.format_exc()
    Path(out, f"{rank}.json").write_text(json.dumps(res))
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, dinov3_path) -> Path:
    from dinofeat.extraction.run import extract

    root = tmp_path_factory.mktemp("ddp")
    write_images(root / "imgs", [s for s, n in zip(SIZES, BUCKETS, strict=True) for _ in range(n)])
    s = extract(root / "imgs", root / "cache", model=str(dinov3_path), area=64, flip=True, **FAST)
    assert s.done == sum(BUCKETS)
    return root / "cache"


@pytest.fixture(scope="module")
def served(cache, tmp_path_factory) -> dict[int, dict[str, Any]]:
    """Every recipe, run once on two real processes; the tests below check what each served."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("served")
    mp.start_processes(_process, args=(WORLD, _free_port(), str(cache), str(out)), nprocs=WORLD, start_method="spawn")
    res = {r: json.loads((out / f"{r}.json").read_text()) for r in range(WORLD)}
    for r, got in res.items():
        assert "crash" not in got, f"rank {r}:\n{got['crash']}"
        assert got["processes"] == [r, WORLD]
    return res


def _expected(cache: Path, epoch: int, rank: int, drop_last: bool = False) -> list[str]:
    """The keys `rank` must be served in `epoch`: the sampler's plan for it, as keys."""
    from dinofeat import FeatureDataset

    ds = FeatureDataset(cache)
    plan = plan_batches(ds.bucket_ids, BS, epoch=epoch, drop_last=drop_last, rank=rank, world_size=WORLD)
    return [ds.cache.key(int(ds.positions[i])) for batch in plan for i in batch]


def _check_epoch(cache: Path, per_rank: list[list[str]], epoch: int, drop_last: bool) -> None:
    every = Counter(k for keys in per_rank for k in keys)
    if drop_last:  # 5 + 3 + 2 + 1 = 11 batches, 10 dealt: 80 distinct images
        assert [len(k) for k in per_rank] == [5 * BS] * WORLD and max(every.values()) == 1 and len(every) == 80
    else:  # 15 batches + 1 again: 8 per process, 128 samples, every image, 28 repeats
        assert [len(k) for k in per_rank] == [8 * BS] * WORLD and len(every) == sum(BUCKETS)
        assert every.total() - len(every) == 28
    for r, keys in enumerate(per_rank):
        assert keys == _expected(cache, epoch, r, drop_last), f"rank {r}, epoch {epoch}"


@pytest.mark.slow
def test_ddp_recipe_serves_every_image_plus_the_documented_padding(served, cache):
    for epoch in range(2):
        _check_epoch(cache, [served[r]["ddp"][epoch] for r in range(WORLD)], epoch, drop_last=False)
    _check_epoch(cache, [served[r]["ddp_drop"][0] for r in range(WORLD)], 0, drop_last=True)


@pytest.mark.slow
def test_accelerate_recipe_serves_every_image_plus_the_documented_padding(served, cache):
    for epoch in range(3):
        _check_epoch(cache, [served[r]["acc"][epoch] for r in range(WORLD)], epoch, drop_last=False)
    _check_epoch(cache, [served[r]["acc_drop"][0] for r in range(WORLD)], 0, drop_last=True)
    for r in range(WORLD):  # the two recipes serve the same batches to the same processes
        assert served[r]["acc"][:2] == served[r]["ddp"]


@pytest.mark.slow
def test_accelerate_reshuffles_every_epoch(served, cache):
    for r in range(WORLD):
        epochs = served[r]["acc"]
        assert len({tuple(e) for e in epochs}) == 3, "start_epoch must change the order every epoch"
        own = served[r]["acc_own_count"]  # accelerate's own set_epoch(pass count) reaches the sampler too
        assert own[0] != own[1] and own == [_expected(cache, 0, r), _expected(cache, 1, r)]
        # accelerate's elif: once it reached the sampler it skips the dataset, hence ds.set_epoch in start_epoch
        assert served[r]["after_loader_set_epoch"] == [5, 0]
        assert served[r]["after_start_epoch"] == [6, 6] and served[r]["coin"] == [True, True]


@pytest.mark.slow
def test_a_sampler_split_twice_by_accelerate_raises(served):
    for r in range(WORLD):
        got = served[r]["double"]
        keys = {k for rr in range(WORLD) for k in served[rr]["double"].get("keys", [])}
        assert "error" in got, f"split twice, one epoch silently served {len(keys)} of {sum(BUCKETS)} images"
        assert re.search(DOUBLE_SPLIT, got["error"]) and "\n" not in got["error"]
