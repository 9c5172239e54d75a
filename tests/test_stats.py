"""Per-channel statistics (issue 14, part 4): accumulated per shard during precompute, merged at seal, exact over
every stored image whatever the split of the work; `FeatureDataset(normalize=True)` applies them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dinofeat.cache.stats import ChannelStats, merge_all
from dinofeat.cli import app
from dinofeat.errors import ConfigError
from dinofeat.extraction.run import extract
from dinofeat.read.dataset import FeatureDataset
from dinofeat.read.reader import FeatureCache
from tests.helpers import FAST, bad_files, write_images

X = np.random.default_rng(0).normal(3.0, 2.0, (600, 5)) * np.arange(1, 6)


@pytest.mark.parametrize(
    "cuts",
    [[], [1], [300], [1, 2, 3], [100, 250, 599], list(range(50, 600, 50))],
)
def test_any_partition_merges_to_the_whole(cuts):
    parts = [ChannelStats.of(p) for p in np.split(X, cuts)]
    m = merge_all(parts, 5)
    assert m.count == len(X)
    np.testing.assert_allclose(m.mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std, X.std(0), rtol=1e-12)


@pytest.mark.parametrize(
    ("x", "count"),
    [(np.zeros((0, 3)), 0), (np.ones((4, 2, 2, 3)), 16), (np.arange(12.0).reshape(2, 2, 3), 4)],
)
def test_leading_axes_are_samples(x, count):
    s = ChannelStats.of(x)
    assert s.count == count
    if count:
        np.testing.assert_allclose(s.mean, x.reshape(-1, 3).mean(0))
        np.testing.assert_allclose(s.std, x.reshape(-1, 3).std(0), atol=1e-12)


def all_features(fc: FeatureCache) -> tuple[np.ndarray, np.ndarray]:
    cls = np.stack([fc.read(i, "cls") for i in range(len(fc))]).astype(np.float64)
    patches = np.concatenate([fc.read(i, "patches").reshape(-1, fc.hidden_size) for i in range(len(fc))])
    return cls, patches.astype(np.float64)


@pytest.fixture(scope="module")
def grown(tmp_path_factory, dinov3_path):
    """One cache built in two incremental runs, and the same images in one run, bad files among them."""
    root = tmp_path_factory.mktemp("stats")
    imgs = root / "imgs"
    write_images(imgs, [(64, 48)] * 7 + [(48, 64)] * 4)
    bad_files(imgs / "bad")
    kw = {**FAST, "model": str(dinov3_path), "area": 64, "shard_mb": 0.004}
    grown = root / "grown"
    extract(imgs, grown, **kw)
    write_images(imgs / "more", [(64, 48)] * 3 + [(64, 64)] * 2, start_seed=40)
    assert extract(imgs, grown, **kw).appended == 5
    fresh = root / "fresh"
    extract(imgs, fresh, **kw)
    return grown, fresh


def test_recorded_statistics_are_exact_over_every_stored_image(grown):
    for cache in grown:
        fc = FeatureCache(cache)
        assert len(fc) == 16 and fc.failures  # failed images (zeros in the arrays) are left out
        cls, patches = all_features(fc)
        stats = fc.channel_stats
        np.testing.assert_allclose(stats["cls"][0], cls.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["cls"][1], cls.std(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["patches"][0], patches.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["patches"][1], patches.std(0), rtol=1e-5, atol=1e-6)
        assert fc.meta["channel_stats"]["patches"]["count"] == len(patches)


def test_incremental_equals_one_run(grown):
    a, b = (FeatureCache(c).meta["channel_stats"] for c in grown)
    for name in ("cls", "patches"):
        assert a[name]["count"] == b[name]["count"]
        np.testing.assert_allclose(a[name]["mean"], b[name]["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a[name]["std"], b[name]["std"], rtol=1e-9, atol=1e-12)


def test_normalize_applies_the_statistics(grown):
    fc = FeatureCache(grown[0])
    plain, norm = FeatureDataset(fc), FeatureDataset(fc, normalize=True)
    (cm, cs), (pm, ps) = fc.channel_stats["cls"], fc.channel_stats["patches"]
    for i in range(len(plain)):
        a, b = plain[i], norm[i]
        assert b["patches"].dtype == torch.float32
        torch.testing.assert_close(b["cls"], (a["cls"].float() - torch.from_numpy(cm)) / torch.from_numpy(cs))
        torch.testing.assert_close(b["patches"], (a["patches"].float() - torch.from_numpy(pm)) / torch.from_numpy(ps))
    every = torch.cat([norm[i]["patches"].reshape(-1, fc.hidden_size) for i in range(len(norm))]).double()
    torch.testing.assert_close(every.mean(0), torch.zeros(fc.hidden_size, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(
        every.std(0, correction=0), torch.ones(fc.hidden_size, dtype=torch.float64), atol=1e-3, rtol=0
    )


def test_normalize_refuses_a_cache_without_statistics(tmp_path):
    import shutil

    v2 = Path(__file__).parent / "data" / "cache-v2"

    shutil.copytree(v2, tmp_path / "v2")
    with pytest.raises(ConfigError, match="no channel statistics"):
        FeatureDataset(tmp_path / "v2", normalize=True)


def test_info_prints_the_recorded_statistics(grown):
    out = CliRunner().invoke(app, ["info", str(grown[0])])
    assert out.exit_code == 0 and "(recorded)" in out.output, out.output
