"""Rank bookkeeping: who owns which shard, which group a process joins, and the launcher's argument checks."""

from __future__ import annotations

import pytest

from dinofeat.errors import CacheFormatError, ConfigError, DinofeatError, PeerStoppedError
from dinofeat.extraction import ranks
from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.launch import extract_processes, run_outcome


@pytest.mark.parametrize(
    ("rank", "world", "owned"),
    [(0, 1, [0, 1, 2, 3, 4, 5, 6]), (0, 2, [0, 2, 4, 6]), (1, 2, [1, 3, 5]), (2, 3, [2, 5]), (3, 4, [3])],
)
def test_shards_are_dealt_round_robin(rank, world, owned):
    g = ranks.Group(rank, world)
    assert [u for u in range(7) if g.owns(u)] == owned
    assert g.is_leader == (rank == 0)


def test_every_shard_has_exactly_one_owner():
    for world in range(1, 6):
        groups = [ranks.Group(r, world) for r in range(world)]
        assert all(sum(g.owns(u) for g in groups) == 1 for u in range(50))


def test_join_without_a_launcher_is_the_manual_split(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    g = ranks.join(1, 3, "cpu")
    assert (g.rank, g.world_size, g.connected) == (1, 3, False)
    assert g.broadcast("x") == "x" and g.gather(5) == [5]
    with pytest.raises(ConfigError, match="rank"):
        ranks.join(3, 3, None)


def test_under_a_launcher_manual_ranks_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ranks.launched()
    with pytest.raises(ConfigError, match="launcher sets them"):
        ranks.join(1, 2, "cpu")
    with pytest.raises(ConfigError, match="starts processes itself"):
        extract_processes("imgs", "cache", ExtractConfig(), 2)


def test_device_for_leaves_cpu_and_named_devices_alone():
    assert ranks.device_for(ranks.Group(1, 2, 1, 2, True), "cpu") == "cpu"
    assert ranks.device_for(ranks.Group(), None) is None


def test_wait_until_gives_up_with_a_clear_message():
    calls = []
    with pytest.raises(ConfigError, match=r"gave up .* waiting for rank 0"):
        ranks.wait_until(lambda: calls.append(1) and False, "rank 0", timeout_s=0.0, poll_s=0.0)
    assert calls
    ranks.wait_until(lambda: True, "nothing", timeout_s=0.0)


def test_num_processes_must_be_positive():
    with pytest.raises(ConfigError, match=">= 1"):
        extract_processes("imgs", "cache", ExtractConfig(), 0)


_SUMMARY = object()
_PEER = PeerStoppedError("rank 0: another process of this run stopped (gloo: Connection closed by peer)")
_WHY = CacheFormatError("c: _dinofeat/source_names.json fails its checksum")
_CRASH = RuntimeError("process 1 terminated with signal SIGKILL")


@pytest.mark.parametrize(
    ("reported", "crash", "want"),
    [
        ([(0, _SUMMARY), (1, _SUMMARY)], None, _SUMMARY),
        ([(1, _SUMMARY), (0, _SUMMARY)], None, _SUMMARY),  # reported in any order: rank 0's
        ([(0, _PEER), (1, _WHY)], None, _WHY),  # the error that says why, not the rank that saw its peer stop
        ([(1, _WHY), (0, _PEER)], _CRASH, _WHY),
        ([(0, _PEER)], None, _PEER),
        ([(0, _PEER)], _CRASH, "a precompute process failed (process 1 terminated with signal SIGKILL)"),
        ([(0, _SUMMARY), (1, _WHY)], None, _WHY),  # one rank failing fails the run
        ([(0, _SUMMARY)], _CRASH, "a precompute process failed"),
        ([], _CRASH, "a precompute process failed"),
    ],
)
def test_the_run_ends_in_the_error_that_says_why(reported, crash, want):
    got = run_outcome(reported, crash)
    if isinstance(want, str):
        assert isinstance(got, DinofeatError) and str(got).startswith(want)
    else:
        assert got is want


def test_a_waiting_rank_says_so_once():
    """A manual-split rank started before rank 0 planned said nothing for up to the wait (hours): now one line."""
    heard: list[str] = []
    answers = iter([False, False, False, True])
    ranks.wait_until(lambda: next(answers), "rank 0 to plan c", timeout_s=7200, poll_s=0.0, say=heard.append)
    assert heard == ["waiting for rank 0 to plan c (up to 2 h; it lists and probes the source first)"]
    heard.clear()
    ranks.wait_until(lambda: True, "rank 0 to plan c", timeout_s=60, say=heard.append)
    assert heard == []  # ready at once: nothing to say
