"""The reader's packed key column (dinofeat.keys): every key decodes back, lookups agree with a {key: position}
dict, and a FeatureCache keeps no Python object per key after lookups by key."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.dtypes import StringDType

from dinofeat import keys as keys_module
from dinofeat.extraction.run import extract
from dinofeat.keys import PackedKeys, find, pack
from dinofeat.read.reader import FeatureCache
from tests.helpers import FAST, write_images

CASES = {
    "empty": [],
    "one": ["a.png"],
    "one empty key": [""],
    "unsorted ascii": ["b/2.jpg", "a/10.jpg", "a/9.jpg", "c.png"],
    "unicode": ["日本/猫.png", "café.jpg", "emoji-😀.png", "Ω", "z"],
    "escaped non-UTF-8 names": ["caf\\xe9.png", "caf\\xe9", "cafe.png", "caf\\xe9.png.txt"],
    "prefixes of each other": ["a", "ab", "abc", "", "abcd", "b", "a/b", "a/"],
    "embedded NUL": ["a\0b", "a", "a\0c"],
    "lone surrogate": ["\ud800x", "\udcff", "\U0010ffff", "\uffff"],
    "every UTF-8 length": ["\x7f", "\x80", "\u07ff", "\u0800", "\uffff", "\U00010000", "\U0010ffff"],
    "one long key among short ones": ["a", "b" * 300, "c"],
}


@pytest.mark.parametrize("keys", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("as_array", [False, True], ids=["list", "StringDType column"])
def test_pack_round_trips_and_finds_every_key(keys, as_array):
    column = np.array(keys, dtype=StringDType()) if as_array and "\ud800x" not in keys else keys
    p = pack(column)
    assert len(p) == len(keys) and list(p) == keys
    assert [p.key(i) for i in range(-len(keys), 0)] == keys
    assert p.data.dtype == np.uint8 and p.offsets.dtype == np.int64 and p.order.dtype == np.int32
    assert p.data.nbytes == sum(len(k.encode("utf-8", "surrogatepass")) for k in keys), "not packed"
    assert [p.find(k) for k in keys] == list(range(len(keys)))
    assert sorted(keys) == [keys[j] for j in p.order]


ABSENT = {
    "empty cache": ([], ["", "a"]),
    "before every key": (["b", "c"], ["a", ""]),
    "after every key": (["b", "c"], ["d", "cc"]),
    "between keys": (["a", "c"], ["b", "a0"]),
    "a prefix of a key": (["abc", "abd"], ["ab", "a", "abcd"]),
    "escaped spelling vs the character": (["caf\\xe9.png"], ["café.png", "caf\\xe9", "caf\\\\xe9.png"]),
    "a key in another normalisation": (["café"], ["cafe\u0301"]),
}


@pytest.mark.parametrize(("keys", "absent"), ABSENT.values(), ids=ABSENT.keys())
def test_absent_keys_are_not_found(keys, absent):
    p = pack(keys)
    assert [find(p, k) for k in absent] == [-1] * len(absent)


DUPLICATES = {
    "twice": (["a", "b", "a"], {"a": 2, "b": 1}),
    "three times, spread": (["x", "y", "x", "z", "x"], {"x": 4, "y": 1, "z": 3}),
    "an empty key twice": (["", "q", ""], {"": 2, "q": 1}),
}


@pytest.mark.parametrize(("keys", "want"), DUPLICATES.values(), ids=DUPLICATES.keys())
def test_a_repeated_key_finds_its_last_position_as_a_dict_did(keys, want):
    assert {k: pack(keys).find(k) for k in want} == want == {k: i for i, k in enumerate(keys) if k in want}


@pytest.mark.parametrize("block", [1, 3, 64])
def test_packing_block_by_block_equals_packing_at_once(monkeypatch, block):
    rng = np.random.default_rng(block)
    alphabet = list("ab/é日😀\\x0")
    keys = ["".join(rng.choice(alphabet, rng.integers(0, 12))) for _ in range(200)]
    whole = pack(np.array(keys, dtype=StringDType()))
    monkeypatch.setattr(keys_module, "_BLOCK", block)
    parts = pack(np.array(keys, dtype=StringDType()))
    for a, b in ((whole.data, parts.data), (whole.offsets, parts.offsets), (whole.order, parts.order)):
        np.testing.assert_array_equal(a, b)
    reference = {k: i for i, k in enumerate(keys)}
    assert list(parts) == keys
    assert {k: parts.find(k) for k in reference} == reference
    assert parts.find("never a key: too long to be drawn") == -1


def test_key_outside_the_column_raises_index_error():
    p = pack(["a", "b"])
    for i in (2, -3):
        with pytest.raises(IndexError):
            p.key(i)


def _strings_held(obj: object, seen: set[int] | None = None) -> set[str]:
    """Every str reachable from `obj` through containers and objects' __dict__ (numpy arrays hold none)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    if isinstance(obj, str):
        return {obj}
    if isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        return set()
    return set().union(*(_strings_held(x, seen) for x in items)) if items else set()


def test_feature_cache_keeps_no_python_object_per_key(tmp_path, tiny_models):
    """After a lookup by key of every key, the reader holds its keys only as numpy columns: no dict or list of
    them (which forked DataLoader workers would copy page by page) and no padded unicode column."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 5 + [(48, 64)] * 4)
    s = extract(imgs, tmp_path / "c", model=str(tiny_models["dinov3"]), area=64, **FAST)
    assert s.done == 9
    fc = FeatureCache(tmp_path / "c")
    keys = fc.keys()
    assert [fc.index_of(k) for k in keys] == list(range(9)) and all(k in fc for k in keys)
    assert fc["" + keys[3]].key == keys[3] and "nope.png" not in fc and 5 not in fc
    assert isinstance(fc._keys, PackedKeys)
    assert not set(keys) & _strings_held(fc.__dict__), "a per-key str is kept after lookups"
    per_image = [a for a in vars(fc).values() if isinstance(a, np.ndarray) and a.shape == (len(fc),)]
    assert per_image and all(a.dtype.kind in "iu" for a in per_image)


@pytest.mark.parametrize("keys", CASES.values(), ids=CASES.keys())
def test_packed_keys_are_a_sequence_of_str(keys):
    """What code written for a list of keys does with them: index, slice, iterate, test membership, compare."""
    p = pack(keys)
    assert list(p) == keys and p == keys and p == tuple(keys) and len(p) == len(keys)
    assert [p[i] for i in range(-len(keys), len(keys))] == keys + keys
    for sl in (slice(None, 2), slice(1, None), slice(None, None, -1), slice(0, 0)):
        part = p[sl]
        assert isinstance(part, PackedKeys) and list(part) == keys[sl]
        assert sorted(keys[sl]) == [keys[sl][j] for j in part.order]
        assert [part.find(k) for k in keys[sl]] == [len(keys[sl]) - 1 - keys[sl][::-1].index(k) for k in keys[sl]]
    assert all(k in p for k in keys) and "never a key" not in p and 3 not in p
    assert p != [*keys, "x"] and p == pack(list(keys))
    if keys and "\ud800x" not in keys:
        assert list(p.column()) == keys


@pytest.mark.parametrize(
    "positions",
    [[], [0], [2, 0, 1], [1, 2], [0, 0], [-1], [3, 1]],
)
def test_take_keeps_the_keys_at_the_positions_and_sorts_them(positions):
    keys = ["d", "b", "日本", "a"]
    p = pack(keys).take(positions)
    want = [keys[i] for i in positions]
    assert list(p) == want
    assert [want[j] for j in p.order] == sorted(want)
    assert [p.find(k) for k in want] == [len(want) - 1 - want[::-1].index(k) for k in want]


@pytest.mark.parametrize(
    "parts",
    [
        [["a", "b"], ["c", "d"]],  # shards in order: no sort
        [["c", "d"], ["a", "b"]],  # out of order
        [["a", "c"], ["b"]],  # interleaved
        [[], ["b"], []],
        [["a/x"], ["a-b/x"]],  # '-' sorts before '/': the second shard's stem is longer, its keys smaller
        [["\ud800x"], ["a"]],  # a lone surrogate (a tar member named in another encoding) in an unsorted join
    ],
)
def test_joined_keys_are_in_part_order_and_sorted_for_lookups(parts):
    from dinofeat.keys import joined

    j = joined([pack(p, presorted=p == sorted(p)) for p in parts])
    want = [k for p in parts for k in p]
    assert list(j) == want
    assert [want[i] for i in j.order] == sorted(want)
    assert all(want[j.find(k)] == k for k in want)


def test_a_key_holding_a_nul_is_found_in_an_index_column():
    """The index's key column comes as StringDType, whose stable sort misorders keys holding a NUL (numpy 2.4):
    packing sorts the bytes instead, so every key is found. (A trailing NUL is lost by numpy's fixed-width columns;
    no file or tar member name can hold a NUL.)"""
    keys = ["a\0c", "a", "a\0b", "b"]
    p = pack(np.array(keys, dtype=StringDType()))
    assert [p.find(k) for k in keys] == list(range(len(keys)))


@pytest.mark.parametrize("keys", CASES.values(), ids=CASES.keys())
def test_positions_of_many_keys_agree_with_a_dict(keys):
    p = pack(keys)
    asked = [*keys, "never", "", "a\0", *(k + "x" for k in keys)] * 300  # over the vectorised threshold
    want = {k: i for i, k in enumerate(keys)}
    expect = [want.get(k, -1) for k in asked]
    assert p.positions(asked).tolist() == expect
    assert p.positions(asked[:5]).tolist() == expect[:5]  # by binary search
    assert p.positions(p).tolist() == [want[k] for k in keys]


@pytest.mark.parametrize("keys", CASES.values(), ids=CASES.keys())
def test_the_key_columns_checksum_is_the_same_from_packed_keys(keys):
    """The index records the key column's crc32c; a plan's packed keys must give the one its str keys give."""
    from dinofeat.cache.checksum import keys_checksum

    assert keys_checksum(pack(keys)) == keys_checksum(list(keys))
    assert keys_checksum(pack(keys * 5000)) == keys_checksum(list(keys) * 5000)  # several blocks


@pytest.mark.parametrize(
    "keys", [k for k in CASES.values() if "\ud800x" not in k], ids=[i for i, k in CASES.items() if "\ud800x" not in k]
)
def test_the_index_columns_checksum_is_computed_without_a_str_per_key(keys):
    """The key column as zarr gives it back (StringDType) is checksummed through packing; same crc as the str keys."""
    from dinofeat.cache.checksum import keys_checksum

    assert keys_checksum(np.array(keys * 3000, dtype=StringDType())) == keys_checksum(list(keys) * 3000)


def test_keys_equal_but_for_a_trailing_nul_are_told_apart_by_positions():
    """A fixed-width byte column pads with NULs, so 'k' and 'k\\0' compare equal there (found by the hostile pass)."""
    p = pack(["k\0", "k", "j", "k\0\0"])
    asked = ["k", "k\0", "k\0\0", "k\0\0\0"] * 300
    assert p.positions(asked).tolist() == [1, 0, 3, -1] * 300


def _random_keys(rng, n: int) -> list[str]:
    """Keys sharing long prefixes (the 16-byte windows tie), of every length, some holding NULs, some repeated."""
    prefixes = ["", "a" * 15, "a" * 16, "a" * 17, "b" * 40, "ü" * 9, "shard-000001/0001/img_"]
    out = []
    for _ in range(n):
        tail = "".join(rng.choice("ab\0é/Z") for _ in range(rng.randrange(0, 40)))
        out.append(rng.choice(prefixes) + tail)
    return out + [rng.choice(out) for _ in range(n // 10)]


def test_sorting_and_matching_agree_with_python_on_random_keys():
    import random

    rng = random.Random(29)
    for trial in range(200):
        keys = _random_keys(rng, rng.randrange(1, 60))
        p = pack(keys)
        by_bytes = sorted(range(len(keys)), key=lambda i: (keys[i].encode("utf-8", "surrogatepass"), i))
        assert p.order.tolist() == by_bytes, trial
        assert pack(sorted(keys), presorted=True).order.tolist() == list(range(len(keys)))
        asked = [*keys, *_random_keys(rng, 20)] * 40  # over the vectorised threshold
        last = {k: i for i, k in enumerate(keys)}
        assert p.positions(asked).tolist() == [last.get(k, -1) for k in asked], trial


def test_one_long_key_does_not_make_every_key_cost_its_length():
    """The issue's hazard: a fixed-width column pads every key to the longest (one 5,000-byte key among 20,000
    made a 100 MB column). Sorting and matching now cost memory per key, whatever the longest."""
    import tracemalloc

    keys = [f"shard/{i:08d}.jpg" for i in range(20000)]
    keys[7] = "x" * 5000
    tracemalloc.start()
    try:
        p = pack(keys)
        p.positions(list(reversed(keys)))
        p.take(np.arange(len(keys))[::-1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 10**6, peak  # 100 MB and more with the padded column


def test_object_arrays_keep_a_trailing_nul_and_duplicates_give_the_last_position():
    """Found by the second hostile pass: an object array went through a fixed-width column (which drops a trailing
    NUL); positions of a PackedKeys in itself answered each key's own place, not the last one holding it."""
    assert list(pack(np.array(["k\0", "k"], dtype=object))) == ["k\0", "k"]
    p = pack(["a", "a", "b"])
    assert p.positions(p).tolist() == [1, 1, 2] == p.positions(["a", "a", "b"]).tolist()
