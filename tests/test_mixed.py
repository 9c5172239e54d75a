"""MixedFeatureDataset: several caches as one training set. Mismatched caches are refused naming the field, an epoch
holds exactly the documented samples of each cache, and BucketBatchSampler keeps its guarantees over the mix
(bucket-pure batches, equal batch counts on every rank, set_epoch, DataLoader workers)."""

from __future__ import annotations

import copy
import re
import shutil
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import DataLoader

from dinofeat.cache.stats import ChannelStats
from dinofeat.errors import CacheMismatchError, ConfigError
from dinofeat.extraction.run import extract
from dinofeat.read.collate import collate_features
from dinofeat.read.compatible import check_compatible
from dinofeat.read.flip import flip_coin
from dinofeat.read.mixed import MixedFeatureDataset
from dinofeat.read.mixing import (
    apportion,
    cache_samples,
    extra_draw,
    fill,
    least_weight,
    parse_weights,
    pooled_stats,
)
from dinofeat.read.reader import FeatureCache
from dinofeat.read.sampler import BucketBatchSampler, plan_batches
from tests.helpers import FAST, write_images

DOC = Path(__file__).resolve().parents[1] / "docs" / "dit-integration.md"
SQUARE, WIDE, TALL = (32, 32), (64, 32), (32, 64)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """a: 5 square + 3 wide; b: 4 square + 3 tall (the same buckets at area 64, other images); big: 3 square at area
    128 (other bucket sizes); noflip: a without --flip; dinov2: another model; tied2 and tied4: tied to DiTs with
    k = 2, the same DINO sizes (64x64 for a square image) but other DiT sizes (128x128 and 256x256); moved: the
    same weights as a's, loaded from another folder."""
    root = tmp_path_factory.mktemp("mixed")
    v3, out = str(tiny_models["dinov3"]), {}
    runs = {
        "a": ([SQUARE] * 5 + [WIDE] * 3, {"model": v3, "area": 64, "flip": True}),
        "b": ([SQUARE] * 4 + [TALL] * 3, {"model": v3, "area": 64, "flip": True}),
        "big": ([SQUARE] * 3, {"model": v3, "area": 128, "flip": True}),
        "noflip": ([SQUARE] * 2, {"model": v3, "area": 64}),
        "dinov2": ([SQUARE] * 2, {"model": str(tiny_models["dinov2"]), "area": 56, "flip": True}),
        "tied2": ([SQUARE] * 3 + [TALL] * 2, {"model": v3, "area": 128, "dit_scale": "1/2", "flip": True}),
        "tied4": (
            [SQUARE] * 3,
            {"model": v3, "area": 256, "dit_scale": "1/4", "dit_token": 32, "multiple": 64, "flip": True},
        ),
    }
    moved = shutil.copytree(tiny_models["dinov3"], root / "moved-model")  # the same weights at another path
    runs["moved"] = ([SQUARE] * 2, {"model": str(moved), "area": 64, "flip": True})
    for seed, (name, (sizes, opts)) in enumerate(runs.items()):
        write_images(root / name / "imgs", sizes, start_seed=100 * seed)
        s = extract(root / name / "imgs", root / name / "cache", **opts, **FAST)
        assert s.done == len(sizes)
        out[name] = root / name / "cache"
    return out


# ---- refusals: each field that makes features interchangeable, named with both values -----------------------------
def _set(path: str, value: Any):
    def edit(meta: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            meta = meta[p]
        meta[last] = value

    return edit


REFUSED = [
    ("model.id", _set("model.id", "facebook/dinov3-vits16-pretrain-lvd1689m"), "'facebook/dinov3-vits16"),
    ("model.revision", _set("model.revision", "abc123"), "'abc123'"),
    ("model.config_hash", _set("model.config_hash", "ffff0000ffff0000"), "'ffff0000ffff0000'"),
    ("patch_size", _set("patch_size", 14), "14"),
    ("hidden_size", _set("hidden_size", 64), "64"),
    ("dtypes.store", _set("dtypes.store", "bf16"), "'bf16'"),
    ("arrays.layers", _set("arrays.layers", [1, 2]), r"\(1, 2\)"),
    ("arrays.flip", _set("arrays.flip", False), "False"),
    ("arrays.registers", _set("arrays.registers", True), "True"),
    ("arrays.layer_norm", _set("arrays.layer_norm", False), "False"),
    ("registers_stored", _set("registers_stored", 4), "4"),
    ("recipe.mean", _set("recipe.mean", [0.5, 0.5, 0.5]), r"\[0.5, 0.5, 0.5\]"),
    ("recipe.std", _set("recipe.std", [0.5, 0.5, 0.5]), r"\[0.5, 0.5, 0.5\]"),
    ("recipe.resample", _set("recipe.resample", "nearest"), "'nearest'"),
    ("recipe.background", _set("recipe.background", [0, 0, 0]), r"\[0, 0, 0\]"),
    ("recipe.jpeg_draft", _set("recipe.jpeg_draft", 2), "2"),
    ("recipe.decode", _set("recipe.decode", "gpu"), "'gpu'"),
    (
        "grid_factor (bucket spec's DiT tie)",
        _set(
            "bucket_spec",
            {"version": 2, "tied": {"scale": "1/2", "dit_token": 16}, "dit": {"area": 128, "multiple": 32}},
        ),
        r"2\)",
    ),
]


@pytest.mark.parametrize(("field", "edit", "value"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_mismatched_field_is_refused_by_name_with_both_values(caches, field, edit, value):
    meta = FeatureCache(caches["a"]).meta
    other = copy.deepcopy(meta)
    edit(other)
    with pytest.raises(CacheMismatchError) as e:
        check_compatible([meta, other], ["one", "two"])
    msg = str(e.value)
    assert msg.startswith(f"caches cannot be mixed: {field} differs (one: ")
    assert re.search(rf"two: {value}", msg) and "\n" not in msg


ALLOWED = [
    _set("source_root", "/elsewhere"),
    _set("bucket_spec", {"area": 512, "multiple": 16, "min_ar": 0.5, "max_ar": 2.0, "num_buckets": 9}),
    _set("dtypes.compute", "bf16"),
    _set("format_version", 2),
    _set("num_images", 7),
    _set("channel_stats", None),
    _set("recipe.max_pixels", 1000),
]


@pytest.mark.parametrize("edit", ALLOWED)
def test_what_may_differ_is_not_refused(caches, edit):
    meta = FeatureCache(caches["a"]).meta
    other = copy.deepcopy(meta)
    edit(other)
    check_compatible([meta, other], ["one", "two"])


@pytest.mark.parametrize(
    ("other", "field"), [("noflip", "arrays.flip"), ("dinov2", "model.id"), ("big", None), ("b", None)]
)
def test_real_caches_are_refused_before_any_sample_is_read(caches, other, field):
    if field is None:
        assert len(MixedFeatureDataset([caches["a"], caches[other]])) > 0
        return
    with pytest.raises(CacheMismatchError, match=rf"{re.escape(field)} differs \(cache 0 \(.*/a/cache\): "):
        MixedFeatureDataset([caches["a"], caches[other]])


def test_allow_mixes_the_same_weights_saved_at_two_paths(caches):
    with pytest.raises(CacheMismatchError, match=r"model\.id differs .*/moved-model'"):
        MixedFeatureDataset([caches["a"], caches["moved"]])
    assert len(MixedFeatureDataset([caches["a"], caches["moved"]], allow=("model.id",))) == 10
    with pytest.raises(CacheMismatchError, match=r"model\.config_hash differs"):
        MixedFeatureDataset([caches["a"], caches["dinov2"]], allow=("model.id",))
    with pytest.raises(ConfigError, match=r"allow names no field that is compared: \['model'\]"):
        MixedFeatureDataset([caches["a"], caches["moved"]], allow=("model",))


@pytest.mark.parametrize(
    ("caches_of", "kwargs", "match"),
    [
        (lambda c: [], {}, "needs a list of caches"),
        (lambda c: c["a"], {}, "needs a list of caches"),
        (lambda c: str(c["a"]), {}, "needs a list of caches"),
        (lambda c: [c["a"], c["b"]], {"weights": [1]}, "weights has 1 entries for 2 caches"),
        (lambda c: [c["a"], c["b"]], {"extra": [None]}, "extra has 1 entries for 2 caches"),
        (lambda c: [c["a"], c["b"]], {"flip": "sometimes"}, "flip must be"),
    ],
)
def test_a_mix_that_cannot_work_is_refused_at_construction(caches, caches_of, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MixedFeatureDataset(caches_of(caches), **kwargs)


@pytest.mark.parametrize(
    "weights", [[0, 1], [-1, 1], [float("nan"), 1], [float("inf"), 1], [True, 1], [1], ["2", 1], [10**20, 1]]
)
def test_bad_weights_are_refused(weights):
    with pytest.raises(ConfigError):
        parse_weights(weights, 2)


@pytest.mark.parametrize(
    ("weight", "want"),
    [
        (np.float32(0.25), Fraction(1, 4)),
        (np.float64(0.15), Fraction(15, 100)),
        (np.int64(3), Fraction(3)),
        (torch.tensor(0.5), Fraction(1, 2)),
        (Fraction(1, 3), Fraction(1, 3)),
    ],
)
def test_numpy_and_torch_scalars_are_weights(weight, want):
    assert parse_weights([weight], 1) == (want,)


def test_a_weight_that_leaves_a_cache_out_is_refused_with_advice_that_works(caches):
    refusal = r"cache 1 \(.*\) would give no sample: weight 0.01 x 7 images rounds to 0"
    with pytest.raises(ConfigError, match=refusal) as e:
        MixedFeatureDataset([caches["a"], caches["b"]], weights=[1, 0.01])
    advised = float(str(e.value).rsplit(" ", 1)[-1])
    assert MixedFeatureDataset([caches["a"], caches["b"]], weights=[1, advised]).samples_per_cache == [8, 1]


@pytest.mark.parametrize("images", [1, 3, 6, 7, 12, 1000, 999_999])
def test_the_least_weight_advised_gives_a_sample_and_is_the_least(images):
    advised = least_weight(images)
    assert cache_samples(parse_weights([float(advised)], 1)[0], images) == 1
    least = Fraction(1, 2 * images)
    assert least <= Fraction(advised) < least * (1 + Fraction(1, 10**5))  # at most the 6th digit above the least


# ---- the exact counts ------------------------------------------------------------------------------------------------
APPORTION = [
    # weight, images per bucket, samples per bucket (sum: round(weight * images), half up)
    (1, [5, 3], [5, 3]),
    (2, [5, 3], [10, 6]),  # a repeat count: exactly r * n_b
    (0.5, [5, 3], [3, 1]),  # 2.5 and 1.5: equal remainders, the earlier bucket gets the one left
    (0.5, [4, 3], [2, 2]),  # 3.5 rounds up to 4: the remainder goes to the bucket that has one
    (1.5, [3, 1], [5, 1]),
    (0.1, [3, 3, 3], [1, 0, 0]),  # 0.9 -> 1
    (0.25, [1], [0]),  # 0.25 -> 0: the cache contributes nothing
    (2.5, [1], [3]),  # half up
    (0.7, [10, 10, 1], [7, 7, 1]),  # 14.7 -> 15
    (Fraction(1, 3), [2, 1], [1, 0]),
    (0.15, [10], [2]),  # 0.15 * 10 is 1.5 exactly (the decimal, not 1.4999...): half up
]


@pytest.mark.parametrize(("weight", "counts", "want"), APPORTION)
def test_apportion(weight, counts, want):
    w = parse_weights([weight], 1)[0]
    assert apportion(w, counts) == want
    assert sum(want) == int(Fraction(w) * sum(counts) + Fraction(1, 2))


@pytest.mark.parametrize(("n", "s"), [(5, 12), (5, 3), (4, 8), (1, 3), (7, 1)])
def test_a_bucket_serves_every_image_s_div_n_times_and_s_mod_n_distinct_ones_once_more(n, s):
    epochs = []
    for epoch in range(6):
        draw = extra_draw(n, s, seed=3, epoch=epoch, cache=1, bucket=2)
        assert np.array_equal(draw, extra_draw(n, s, seed=3, epoch=epoch, cache=1, bucket=2))  # deterministic
        got = Counter(fill(n, s, j, draw) for j in range(s))
        assert sum(got.values()) == s and set(got.values()) <= {s // n, s // n + 1} - {0}
        assert sum(v == s // n + 1 for v in got.values()) == s % n
        epochs.append(tuple(sorted(k for k, v in got.items() if v == s // n + 1)))
    if 0 < s % n < n - 1:
        assert len(set(epochs)) > 1, "the extra images must change with the epoch"


def _served(ds: MixedFeatureDataset, epoch: int, **loader: Any) -> list[tuple[int, str]]:
    """(cache, key) of every sample one epoch serves on one process, batch size 1 (no fill)."""
    ds.set_epoch(epoch)
    sampler = BucketBatchSampler(ds.bucket_ids, 1, seed=1)
    sampler.set_epoch(epoch)
    dl = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_features, **loader)
    return [(c, k) for b in dl for c, k in zip(b["cache"], b["key"], strict=True)]


def test_an_epoch_holds_exactly_the_documented_samples_of_each_cache(caches):
    """a (8 images) x 2: each image exactly twice. b (4 square + 3 tall) x 0.5: round(3.5) = 4 samples, 2 of each
    bucket (2 and 1.5 -> the remainder to tall), no image twice; which ones changes with the epoch."""
    ds = MixedFeatureDataset([caches["a"], caches["b"]], weights=[2, 0.5])
    assert len(ds) == 20 and ds.samples_per_cache == [16, 4]
    fb = FeatureCache(caches["b"])
    tall = {fb.key(i) for i in range(len(fb)) if fb.size(i) == (48, 96)}
    assert len(tall) == 3
    chosen = set()
    for epoch in range(4):
        got = Counter(_served(ds, epoch))
        assert {k: n for (c, k), n in got.items() if c == 0} == dict.fromkeys(FeatureCache(caches["a"]).keys(), 2)
        b = [k for (c, k), n in got.items() if c == 1 for _ in range(n)]
        assert len(b) == len(set(b)) == 4 and len(set(b) & tall) == 2
        chosen.add(tuple(sorted(b)))
    assert len(chosen) > 1
    again = MixedFeatureDataset([caches["a"], caches["b"]], weights=[2, 0.5])
    assert Counter(_served(again, 3)) == Counter(_served(ds, 3))  # the same (seed, epoch): the same samples


def test_keys_stay_unambiguous_across_caches(caches):
    """Both caches name their images im_000.png...: the sample says which cache it came from."""
    ds = MixedFeatureDataset([caches["a"], caches["b"]])
    served = _served(ds, 0)
    assert len(served) == 15 and len(set(served)) == 15 and len({k for _, k in served}) == 8
    for i in range(len(ds)):
        c, key = ds.key(i)
        sample = ds[i]
        assert (sample["cache"], sample["key"]) == (c, key)
        torch.testing.assert_close(sample["patches"], torch.from_numpy(FeatureCache(ds.caches[c].path)[key].patches))


# ---- the sampler's guarantees over a mix -----------------------------------------------------------------------------
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("mix", [("a", "b"), ("a", "big")])
def test_ranks_get_equal_bucket_pure_batches_and_split_the_epoch(caches, mix, drop_last):
    """a + big: both have square images, of other sizes (area 64 and 128): they never share a batch."""
    ds = MixedFeatureDataset([caches[m] for m in mix], weights=[1.5, 2])
    per_rank = []
    for rank in range(2):
        sampler = BucketBatchSampler(ds.bucket_ids, 3, seed=2, drop_last=drop_last, rank=rank, world_size=2)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        for b in sampler:
            assert len({int(ds.bucket_ids[i]) for i in b}) == 1
            collate_features(ds.__getitems__(b))  # raises on a batch of mixed grids
        per_rank.append([i for b in sampler for i in b])
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    if drop_last:
        assert not set(per_rank[0]) & set(per_rank[1])
        assert len(set(per_rank[0] + per_rank[1])) == len(per_rank[0]) * 2
    else:
        assert set(per_rank[0]) | set(per_rank[1]) == set(range(len(ds)))
    if mix == ("a", "big"):
        sizes = {ds.buckets[b][0] for b in ds.bucket_ids}
        assert {(64, 64), (128, 128)} <= sizes


def test_tied_caches_batch_by_dino_and_dit_size(caches):
    """The same DINO grid with another DiT size would give a batch latents that do not stack: never one batch."""
    ds = MixedFeatureDataset([caches["tied2"], caches["tied4"]])
    assert ds.grid_factor == 2 and len(ds) == 8
    assert set(ds.buckets) == {((64, 64), (128, 128)), ((48, 96), (96, 192)), ((64, 64), (256, 256))}
    batches = [collate_features(ds.__getitems__(b)) for b in BucketBatchSampler(ds.bucket_ids, 4)]
    assert {b["grid"] for b in batches} == {(4, 4), (6, 3)}
    for b in batches:
        assert len(set(b["dit_bucket"])) == 1 and b["grid_factor"] == 2


def test_accelerate_deals_a_mix_as_the_samplers_own_split(caches):
    ds = MixedFeatureDataset([caches["a"], caches["b"]], weights=[1, 3])
    sampler = BucketBatchSampler(ds.bucket_ids, 4, seed=5)
    sampler.set_epoch(2)
    for r in range(2):
        shard = BatchSamplerShard(sampler, num_processes=2, process_index=r)
        assert list(shard) == plan_batches(ds.bucket_ids, 4, seed=5, epoch=2, rank=r, world_size=2)


def test_set_epoch_changes_the_order_and_the_draw_deterministically(caches):
    ds = MixedFeatureDataset([caches["a"], caches["b"]], weights=[1, 0.5])
    orders = [_served(ds, e) for e in (0, 1, 0)]
    assert orders[0] == orders[2] and orders[0] != orders[1]


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers_serve_what_the_main_process_does(caches, context):
    """Workers unpickle the mix; set_epoch reaches persistent workers (the fractional draw and the flip coin)."""
    ds = MixedFeatureDataset([caches["a"], caches["b"]], weights=[1, 0.5], flip="random")
    want = [_served(ds, e) for e in (0, 1)]
    flips: list[dict[str, bool]] = []
    sampler = BucketBatchSampler(ds.bucket_ids, 1, seed=1)
    dl = DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=collate_features,
        num_workers=2,
        multiprocessing_context=context,
        persistent_workers=True,
    )
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        batches = list(dl)
        assert [(c, k) for b in batches for c, k in zip(b["cache"], b["key"], strict=True)] == want[epoch]
        got = [(bool(f), k) for b in batches for f, k in zip(b["flipped"], b["key"], strict=True)]
        assert all(f == flip_coin(0, epoch, k) for f, k in got)  # the epoch's coin, in persistent workers
        flips.append({k: f for f, k in got})
    assert flips[0] != flips[1]


# ---- normalisation: the statistics of the mix ------------------------------------------------------------------------
def test_pooled_statistics_equal_those_of_the_weighted_union():
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(1, 2, (50, 4)), rng.normal(-3, 0.5, (30, 4))
    stats = [{"patches": ChannelStats.of(x).to_dict()} for x in (x1, x2)]
    mean, std = pooled_stats(stats, [Fraction(2), Fraction(1)])["patches"]
    union = np.concatenate([x1, x1, x2])
    np.testing.assert_allclose(mean, union.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, union.std(0), rtol=1e-5)


def test_normalize_uses_the_mixs_statistics(caches):
    ds = MixedFeatureDataset([caches["a"], caches["b"]], weights=[2, 1], normalize=True)
    raw = MixedFeatureDataset([caches["a"], caches["b"]], weights=[2, 1])
    stats = [FeatureCache(caches[n]).meta["channel_stats"] for n in ("a", "b")]
    mean, std = (torch.from_numpy(v) for v in pooled_stats(stats, [Fraction(2), Fraction(1)])["cls"])
    torch.testing.assert_close(ds[0]["cls"], (raw[0]["cls"].float() - mean) / std)
    assert not torch.allclose(mean, torch.from_numpy(FeatureCache(caches["a"]).channel_stats["cls"][0]))


# ---- the documented recipe -------------------------------------------------------------------------------------------
def test_the_documented_mix_runs_and_serves_the_documented_counts(caches):
    code = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "MixedFeatureDataset" in b)
    ns: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), ns)
    paths = [str(caches["a"]), str(caches["b"])]
    per_rank = [ns["train_on_a_mix"](paths, [2, 0.5], r, 2) for r in range(2)]
    ds = MixedFeatureDataset(paths, weights=[2, 0.5])
    for epoch in range(2):
        assert [len(rank[epoch]) for rank in per_rank] == [12, 12]  # the doc's example: 3 batches of 4 each
        ds.set_epoch(epoch)
        for r in range(2):
            plan = plan_batches(ds.bucket_ids, 4, epoch=epoch, rank=r, world_size=2)
            assert per_rank[r][epoch] == [ds.key(i) for b in plan for i in b]
        got = Counter(s for rank in per_rank for s in rank[epoch])
        assert {k for c, k in got if c == 0} == set(FeatureCache(caches["a"]).keys())
        assert len({k for c, k in got if c == 1}) == 4
