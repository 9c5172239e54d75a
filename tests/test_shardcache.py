"""The local folder of fetched shards: one fetch per shard, least recently used shards removed under a size cap,
open descriptors surviving removal, several processes (instances) sharing one folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dinofeat.cache.shardcache import STALE_TMP_S, Fetch, ShardCache

SIZE = 1000


class Remote:
    """What the object store would write into the temp file: `SIZE` bytes per shard, every fetch counted."""

    def __init__(self) -> None:
        self.fetched: list[str] = []

    def fetcher(self, rel: str) -> Fetch:
        def fetch(tmp: Path) -> None:
            self.fetched.append(rel)
            tmp.write_bytes(rel.encode().ljust(SIZE, b"."))

        return fetch


def _get(cache: ShardCache, remote: Remote, rel: str) -> bytes:
    fd = cache.open(rel, remote.fetcher(rel))
    try:
        return os.pread(fd, SIZE, 0)
    finally:
        os.close(fd)


def _held(cache: ShardCache) -> list[str]:
    return sorted(p.relative_to(cache.dir).as_posix() for _, _, p in cache.files())


@pytest.mark.parametrize(
    ("cap", "reads", "held", "fetches"),
    [
        # no cap: everything stays, each shard fetched once
        (None, ["a", "b", "c", "a", "b", "c"], ["a", "b", "c"], ["a", "b", "c"]),
        # room for two: c pushes out a (oldest); a comes back and pushes out b
        (2 * SIZE, ["a", "b", "c", "a"], ["a", "c"], ["a", "b", "c", "a"]),
        # a hit makes a shard recent: a was read again, so c pushes out b, not a
        (2 * SIZE, ["a", "b", "a", "c", "a"], ["a", "c"], ["a", "b", "c"]),
        # a cap below one shard: the shard just fetched is kept, alone
        (SIZE // 2, ["a", "b", "b"], ["b"], ["a", "b"]),
        # nested keys (buckets/<W>x<H>/<array>/c/<shard>) count like flat ones
        (2 * SIZE, ["x/c/0", "y/c/0", "x/c/1"], ["x/c/1", "y/c/0"], ["x/c/0", "y/c/0", "x/c/1"]),
    ],
)
def test_least_recently_used_shards_make_room(tmp_path, cap, reads, held, fetches):
    cache, remote = ShardCache(tmp_path, "cache-id", cap), Remote()
    for rel in reads:
        assert _get(cache, remote, rel) == rel.encode().ljust(SIZE, b".")
    assert _held(cache) == held
    assert remote.fetched == fetches


def test_an_open_shard_survives_its_removal(tmp_path):
    """Another process (a second instance on the same folder) removes a shard this one holds open: the open
    descriptor still reads every byte; the next open fetches it again."""
    remote = Remote()
    mine, other = ShardCache(tmp_path, "id", 1 * SIZE), ShardCache(tmp_path, "id", 1 * SIZE)
    fd = mine.open("a", remote.fetcher("a"))
    try:
        _get(other, remote, "b")  # fetching b removes a under the shared cap
        assert _held(mine) == ["b"]
        assert os.pread(fd, SIZE, 0) == b"a".ljust(SIZE, b".")
    finally:
        os.close(fd)
    _get(mine, remote, "a")
    assert remote.fetched == ["a", "b", "a"]


def test_the_cap_counts_every_cache_sharing_the_folder(tmp_path):
    """Two caches (two cache_ids) under one local_cache folder share its cap."""
    remote = Remote()
    one, two = ShardCache(tmp_path, "one", 2 * SIZE), ShardCache(tmp_path, "two", 2 * SIZE)
    _get(one, remote, "a")
    _get(one, remote, "b")
    _get(two, remote, "a")
    total = sum(size for _, size, _ in one.files())
    assert total <= 2 * SIZE
    assert not (tmp_path / "one" / "a").exists() and (tmp_path / "two" / "a").exists()


def test_dead_fetches_temp_files_are_cleared_and_never_counted(tmp_path):
    cache, remote = ShardCache(tmp_path, "id", 10 * SIZE), Remote()
    (tmp_path / "id").mkdir()
    fresh, stale = tmp_path / "id" / ".s.1.2.tmp", tmp_path / "id" / ".t.1.2.tmp"
    fresh.write_bytes(b"x" * 50 * SIZE)
    stale.write_bytes(b"x" * 50 * SIZE)
    old = os.stat(stale).st_mtime - STALE_TMP_S - 60
    os.utime(stale, (old, old))
    _get(cache, remote, "a")
    assert _held(cache) == ["a"]  # the 100 KB of temp files do not push out a 1 KB shard
    assert fresh.exists() and not stale.exists()  # a fetch in progress is left alone


def test_a_fetch_that_fails_midway_leaves_nothing_and_the_next_open_fetches_again(tmp_path):
    """A download that dies after writing half the shard (connection reset): no shard appears, its temp file is
    removed at once (not after STALE_TMP_S), and the next open fetches the shard whole."""
    cache, remote = ShardCache(tmp_path, "id", 10 * SIZE), Remote()

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"x" * (SIZE // 2))
        raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        cache.open("a", broken)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert _get(cache, remote, "a") == b"a".ljust(SIZE, b".")
    assert remote.fetched == ["a"] and cache.fetches == 1


def _evicting_on_rename(monkeypatch, other: ShardCache, remote: Remote) -> list[str]:
    """Make `os.replace` let `other` (another process on the same folder) fetch shard "b" the moment the shard being
    renamed has its name, before the renaming caller can open it: under a cap below one shard, that fetch evicts
    the shard just renamed. Returns the shards so evicted."""
    real, busy, evicted = os.replace, [], []

    def replace(src, dst, *a, **k):
        real(src, dst, *a, **k)
        if not busy and Path(dst).name != "b":
            busy.append(1)
            _get(other, remote, "b")
            evicted.extend(p.name for p in [Path(dst)] if not p.exists())

    monkeypatch.setattr(os, "replace", replace)
    return evicted


def test_a_shard_evicted_between_its_rename_and_its_open_is_still_served(tmp_path, monkeypatch):
    """Issue 32.3: one DataLoader worker's eviction removed a shard another had just fetched, before that one opened
    it (`shard file missing`). The fetcher's descriptor now comes from the temp file, opened before the rename."""
    remote = Remote()
    mine, other = ShardCache(tmp_path, "id", SIZE // 2), ShardCache(tmp_path, "id", SIZE // 2)
    evicted = _evicting_on_rename(monkeypatch, other, remote)
    assert _get(mine, remote, "a") == b"a".ljust(SIZE, b".")
    assert evicted == ["a"]  # the interleaving happened: the name was gone before the caller could open it
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_a_hit_evicted_before_its_touch_is_still_served(tmp_path, monkeypatch):
    """The hit path opens first: an eviction right after the open (before the hit marks the shard recent) takes the
    name only; the descriptor still reads every byte, and the next open fetches the shard again."""
    remote = Remote()
    mine, other = ShardCache(tmp_path, "id", SIZE // 2), ShardCache(tmp_path, "id", SIZE // 2)
    _get(mine, remote, "a")
    touch = mine._touch

    def evict_first(path: Path) -> None:
        _get(other, remote, "b")  # evicts a
        touch(path)

    monkeypatch.setattr(mine, "_touch", evict_first)
    assert _get(mine, remote, "a") == b"a".ljust(SIZE, b".")
    assert _held(mine) == ["b"] and remote.fetched == ["a", "b"]


def test_kept_metadata_is_served_while_it_passes_its_check_and_never_evicted(tmp_path):
    """An array's zarr.json, kept beside the shards: read from the store once, then from the folder while it
    passes the recorded checksum (`valid`); a copy that fails it is fetched again, and bytes that fail it are
    returned (for the caller to refuse) but never kept. A cap below one shard never removes it."""
    cache, remote = ShardCache(tmp_path, "id", SIZE // 2), Remote()
    store = {"b/cls/zarr.json": b"good"}
    asked: list[str] = []

    def fetch(rel: str):
        return lambda: (asked.append(rel), store[rel])[1]

    def valid(data: bytes) -> bool:
        return data == b"good"

    assert cache.kept("b/cls/zarr.json", fetch("b/cls/zarr.json"), valid) == b"good"
    assert cache.kept("b/cls/zarr.json", fetch("b/cls/zarr.json"), valid) == b"good"
    assert asked == ["b/cls/zarr.json"]
    copy = tmp_path / ".meta" / "id" / "b" / "cls" / "zarr.json"
    copy.write_bytes(b"edited")
    assert cache.kept("b/cls/zarr.json", fetch("b/cls/zarr.json"), valid) == b"good" and copy.read_bytes() == b"good"
    store["b/cls/zarr.json"] = b"damaged in the store"
    copy.unlink()
    assert cache.kept("b/cls/zarr.json", fetch("b/cls/zarr.json"), valid) == b"damaged in the store"
    assert not copy.exists()
    store["b/cls/zarr.json"] = b"good"
    cache.kept("b/cls/zarr.json", fetch("b/cls/zarr.json"), valid)
    _get(cache, remote, "a")
    _get(cache, remote, "b")
    assert _held(cache) == ["b"] and copy.read_bytes() == b"good"


def test_kept_cache_metadata_must_pass_its_field_checksums(tmp_path):
    from dinofeat.cache.metadata import stamp
    from dinofeat.cache.shardcache import keep_metadata, kept_metadata

    meta = stamp({"cache_id": "abc", "state": "sealed"})
    keep_metadata(tmp_path, "s3://b/feats", meta)
    assert kept_metadata(tmp_path, "s3://b/feats") == meta
    assert kept_metadata(tmp_path, "s3://b/other") is None
    keep_metadata(tmp_path, "s3://b/feats", {**meta, "cache_id": "edited"})
    assert kept_metadata(tmp_path, "s3://b/feats") is None  # fails its checksum: the store is asked instead
    keep_metadata(tmp_path, "s3://b/feats", {"cache_id": "abc"})
    assert kept_metadata(tmp_path, "s3://b/feats") is None  # no field checksums (before 0.6): never trusted
