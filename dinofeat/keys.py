"""Keys as dinofeat keeps them, from the listing to the reader: one packed UTF-8 column (bytes + offsets) and the
permutation that sorts it, all numpy. No Python object per key: 10^8 keys of 25 bytes are 3.7 GB, not the ~10 GB
of a list of str; forked DataLoader workers share these pages without copying them (a `{key: row}` dict's entries
are copied page by page as workers touch their reference counts); a 200-character key costs its own bytes, not
every key's (a fixed-width column would pad every key to the longest). A key is decoded on demand; a lookup by key
is a binary search over the sorted permutation. `PackedKeys` is a `Sequence[str]`, so code written for a list of
keys reads it unchanged (and pays a decode per key it touches)."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

# Keys are str that may hold lone surrogates in principle; surrogatepass round-trips any str (as keys_checksum does)
_ERRORS = "surrogatepass"


@dataclass(frozen=True, eq=False)
class PackedKeys(Sequence[str]):
    """n keys: key i is `data[offsets[i]:offsets[i + 1]]` (UTF-8); `order` lists positions in ascending key order
    (code point order, which is UTF-8 byte order), equal keys by position."""

    data: np.ndarray  # uint8 [total bytes]
    offsets: np.ndarray  # int64 [n + 1]
    order: np.ndarray  # int32 (int64 past 2**31 keys) [n]

    def __len__(self) -> int:
        return len(self.order)

    def encoded(self, i: int) -> bytes:
        """Key i's UTF-8 bytes."""
        return self.data[int(self.offsets[i]) : int(self.offsets[i + 1])].tobytes()

    def key(self, i: int) -> str:
        """Key at position i (negative positions count from the end, as for a list)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self.encoded(i % n if i < 0 else i).decode("utf-8", _ERRORS)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> PackedKeys: ...
    def __getitem__(self, i: int | slice) -> str | PackedKeys:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        return self.key(operator.index(i))

    def __iter__(self) -> Iterator[str]:
        data, offsets = self.data.tobytes(), self.offsets.tolist()  # one copy of the bytes, not a slice per key
        return (data[offsets[i] : offsets[i + 1]].decode("utf-8", _ERRORS) for i in range(len(self)))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.find(key) >= 0

    def __eq__(self, other: object) -> bool:
        """Equal to another PackedKeys, a list or a tuple holding the same keys in the same order."""
        if isinstance(other, PackedKeys):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.data, other.data)
        if isinstance(other, list | tuple):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def take(self, positions: np.ndarray | Sequence[int]) -> PackedKeys:
        """The keys at `positions`, in that order, packed anew (vectorised: no key is decoded). The order of a
        subset taken in ascending positions comes from this one's order; any other subset is sorted again."""
        pos = np.asarray(positions, np.int64).reshape(-1)
        if len(pos) and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise IndexError("position out of range")
        pos = pos % max(1, len(self))
        starts, lengths = self.offsets[pos], np.diff(self.offsets)[pos]
        offsets = np.zeros(len(pos) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.empty(int(offsets[-1]), np.uint8)
        for a in range(0, len(pos), _BLOCK):  # a block of keys at a time: index arrays of one block's bytes
            b = min(a + _BLOCK, len(pos))
            at = byte_sources(starts[a:b], lengths[a:b])
            data[offsets[a] : offsets[b]] = self.data[at]
        if len(pos) and (np.diff(pos) > 0).all():  # ascending: keep the relative order of this one's sort
            new = np.full(len(self), -1, np.int64)
            new[pos] = np.arange(len(pos))
            kept = new[self.order]
            order = kept[kept >= 0]
        else:
            order = None
        return _with_order(np.ascontiguousarray(data, np.uint8), offsets, order)

    def column(self) -> np.ndarray:
        """Every key as a numpy StringDType column (what the cache's index stores), built a block at a time."""
        from numpy.dtypes import StringDType

        out = np.empty(len(self), StringDType())
        for s in range(0, len(self), _BLOCK):
            out[s : s + _BLOCK] = [self.key(i) for i in range(s, min(s + _BLOCK, len(self)))]
        return out

    def positions(self, keys: Iterable[str]) -> np.ndarray:
        """The position of each of `keys` (-1 for an absent one; the last one of a key held twice). Many keys at
        once are matched vectorised (a sorted search over fixed-width byte columns); a few by binary search."""
        if not isinstance(keys, PackedKeys):
            keys = list(keys)
            if len(keys) < 1024:
                return np.fromiter((self.find(k) for k in keys), np.int64, len(keys))
            keys = pack(keys, presorted=True)  # only its bytes are read below: no sort needed
        return _match(self, keys)

    def is_sorted(self) -> bool:
        return bool((self.order == np.arange(len(self))).all())

    def find(self, key: str) -> int:
        """The position of `key` (the last one if it appears more than once, as a `{key: position}` dict holds),
        -1 if absent."""
        return find(self, key)


def pack(keys: Sequence[str] | np.ndarray, presorted: bool = False) -> PackedKeys:
    """Pack `keys` (a list of str or any numpy string column: the index's comes as numpy's variable-width
    StringDType). Vectorised, a block of keys at a time, so packing 10^6 keys takes about a second and the transient
    fixed-width copy is one block's, padded to that block's longest key; the sort works on the packed bytes
    (`byte_order`). `presorted`: the caller knows `keys` are in ascending order (a sorted listing): no sort."""
    n = len(keys)
    if n == 0:
        return PackedKeys(np.zeros(0, np.uint8), np.zeros(1, np.int64), np.zeros(0, np.int32))
    blocks = [_encode_block(keys[s : s + _BLOCK]) for s in range(0, n, _BLOCK)]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.concatenate([size for _, size in blocks]), out=offsets[1:])
    data = np.concatenate([d for d, _ in blocks])
    return _with_order(data, offsets, np.arange(n) if presorted else None)


def packed(keys: Sequence[str]) -> PackedKeys:
    """`keys` packed (as they are when they already are)."""
    return keys if isinstance(keys, PackedKeys) else pack(list(keys))


def joined(parts: Sequence[PackedKeys]) -> PackedKeys:
    """The keys of `parts` one after the other. Sorted parts that follow each other in order (a listing's shards)
    need no sort; any other join is sorted again."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return pack([])
    if len(parts) == 1:
        return parts[0]
    starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
    offsets = np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)])
    data = np.concatenate([p.data for p in parts])
    in_order = all(p.is_sorted() for p in parts) and all(
        a.encoded(len(a) - 1) <= b.encoded(0) for a, b in itertools.pairwise(parts)
    )
    return _with_order(data, offsets, np.arange(len(offsets) - 1) if in_order else None)


def byte_order(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The stable permutation that sorts packed UTF-8 keys by their bytes (byte order is code point order; a key
    before its own extensions, 'a' before 'a\\0'), without decoding a key or padding any to the longest: keys are
    sorted by their first 16 bytes (two big-endian words) and length, then only the keys still tied, longer than
    what was compared, by their next 16 bytes, and so on. A listing in order already is checked, not sorted."""
    lengths = np.diff(offsets)
    n = len(lengths)
    if _in_order(data, offsets, lengths):
        return np.arange(n)
    order = np.arange(n)
    group = np.zeros(n, np.int64)  # slot of the first key of each slot's run of keys tied so far
    active = np.arange(n)  # slots of the runs still to sort, ascending (a run's slots are contiguous)
    start = 0
    while len(active):
        idx = order[active]
        c0, c1 = _word(data, offsets, lengths, idx, start), _word(data, offsets, lengths, idx, start + 8)
        seen = np.minimum(lengths[idx], start + 17)  # 17: a key ending with the window before a longer one
        g = group[active]
        by = np.lexsort((seen, c1, c0, g))  # the runs stay in their slots: sorted by their first slot first
        order[active] = idx[by]
        c0, c1, g = c0[by], c1[by], g[by]
        longer = lengths[idx[by]] > start + 16
        tied = np.zeros(len(active), bool)
        tied[1:] = (g[1:] == g[:-1]) & (c0[1:] == c0[:-1]) & (c1[1:] == c1[:-1]) & longer[1:] & longer[:-1]
        first = np.maximum.accumulate(np.where(tied, 0, active))  # each slot's run: the slot it starts at
        group[active] = first
        keep = tied.copy()
        keep[:-1] |= tied[1:]
        active, start = active[keep], start + 16
    return order


def byte_sources(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """For keys starting at `starts` with `lengths` bytes, the index of each of their bytes, one key after the
    other (what gathers them into a new packed column)."""
    total = int(lengths.sum())
    first = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=first[1:])
    return np.arange(total) + np.repeat(starts - first, lengths)


def _in_order(data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> bool:
    """Whether every key is <= the next (by bytes, a prefix first), a block of neighbours at a time, comparing 16
    bytes at a time and going on only for neighbours equal so far."""
    for a in range(0, len(lengths) - 1, 1 << 16):
        left = np.arange(a, min(a + (1 << 16), len(lengths) - 1))
        start = 0
        while len(left):
            right = left + 1
            a0, b0 = _word(data, offsets, lengths, left, start), _word(data, offsets, lengths, right, start)
            a1, b1 = _word(data, offsets, lengths, left, start + 8), _word(data, offsets, lengths, right, start + 8)
            if ((a0 > b0) | ((a0 == b0) & (a1 > b1))).any():
                return False
            same = (a0 == b0) & (a1 == b1)
            la, lb = lengths[left], lengths[right]
            both_longer = same & (la > start + 16) & (lb > start + 16)
            if (same & ~both_longer & (np.minimum(la, start + 17) > np.minimum(lb, start + 17))).any():
                return False  # equal as far as the shorter goes, the left one longer
            left, start = left[both_longer], start + 16
    return True


def _word(data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, idx: np.ndarray, start: int) -> np.ndarray:
    """Bytes start..start+7 of keys `idx` as big-endian uint64 (0 past a key's end): compared as numbers, words
    order like the bytes they hold."""
    out = np.zeros(len(idx), np.uint64)
    base, length = offsets[idx] + start, lengths[idx]
    for k in range(8):
        has = length > start + k
        byte = np.zeros(len(idx), np.uint64)
        byte[has] = data[base[has] + k]
        out = (out << np.uint64(8)) | byte
    return out


_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def _hashes(keys: PackedKeys) -> np.ndarray:
    """A 64-bit hash of each key's bytes and length (a polynomial over the bytes, wrapping), a block at a time."""
    lengths = np.diff(keys.offsets)
    out = np.zeros(len(keys), np.uint64)
    longest = int(lengths.max(initial=0))
    powers = np.cumprod(np.full(max(1, longest), _MULTIPLIER, np.uint64), dtype=np.uint64)
    for a in range(0, len(keys), _BLOCK):
        b = min(a + _BLOCK, len(keys))
        block, lens = keys.data[keys.offsets[a] : keys.offsets[b]], lengths[a:b]
        if len(block):
            first = keys.offsets[a:b] - keys.offsets[a]
            position = np.arange(len(block)) - np.repeat(first, lens)  # each byte's place in its key
            terms = (block.astype(np.uint64) + np.uint64(1)) * powers[position]
            held = lens > 0
            out[a:b][held] = np.add.reduceat(terms, first[held])
        out[a:b] ^= lens.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    return out


def _match(have: PackedKeys, wanted: PackedKeys) -> np.ndarray:
    """For each key of `wanted`, its position in `have` (-1 if absent; the last of a key held twice): matched by
    a 64-bit hash, then each candidate's bytes compared; a candidate that is not the key (a collision) is looked
    up by binary search. Memory per key, whatever the longest key."""
    if not len(have) or not len(wanted):
        return np.full(len(wanted), -1, np.int64)
    hh, hw = _hashes(have), _hashes(wanted)
    by_hash = np.argsort(hh, kind="stable")  # equal hashes in position order: the last one is the last position
    sorted_hashes = hh[by_hash]
    at = np.searchsorted(sorted_hashes, hw, side="right") - 1
    cand = by_hash[np.maximum(at, 0)].astype(np.int64)
    hit = (at >= 0) & (sorted_hashes[np.maximum(at, 0)] == hw)
    same = hit & _same_bytes(have, cand, wanted)
    out = np.where(same, cand, -1)
    for i in np.flatnonzero(hit & ~same):
        out[i] = have.find(wanted[int(i)])
    return out


def _same_bytes(have: PackedKeys, cand: np.ndarray, wanted: PackedKeys) -> np.ndarray:
    """Whether have's key cand[i] is wanted's key i, byte for byte, a block at a time."""
    lh, lw = np.diff(have.offsets)[cand], np.diff(wanted.offsets)
    out = lh == lw
    for a in range(0, len(wanted), _BLOCK):
        b = min(a + _BLOCK, len(wanted))
        sel = np.flatnonzero(out[a:b]) + a
        if not len(sel):
            continue
        lens = lw[sel]
        x = have.data[byte_sources(have.offsets[cand[sel]], lens)]
        y = wanted.data[byte_sources(wanted.offsets[sel], lens)]
        differ = (x != y).astype(np.int64)
        first = np.zeros(len(sel), np.int64)
        np.cumsum(lens[:-1], out=first[1:])
        held = lens > 0
        bad = np.zeros(len(sel), bool)
        bad[held] = np.add.reduceat(differ, first[held]) > 0
        out[sel[bad]] = False
    return out


def _with_order(data: np.ndarray, offsets: np.ndarray, order: np.ndarray | None) -> PackedKeys:
    """PackedKeys of packed bytes; `order` None: sorted here."""
    n = len(offsets) - 1
    if order is None:
        order = byte_order(data, offsets)
    return PackedKeys(data, offsets, np.asarray(order).astype(np.int32 if n < 2**31 else np.int64))


_BLOCK = 1 << 13  # keys per block: a few MB of transient arrays, however many keys


def _encode_block(keys: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A block's UTF-8 bytes and lengths: a numpy string column vectorised, unless a key ends in NUL (a fixed-width
    copy would drop it); str keys (a list, an object array) by Python's encoder."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "TU" and not np.strings.endswith(keys, "\0").any():
        return _encode(_unicode_column(keys))
    return _encode_strs([str(k) for k in keys])


def _encode_strs(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of a block of str keys and their lengths, by Python's encoder (exact: a trailing NUL is kept,
    where a numpy fixed-width column drops it)."""
    encoded = [k.encode("utf-8", _ERRORS) for k in keys]
    return np.frombuffer(b"".join(encoded), np.uint8), np.fromiter(map(len, encoded), np.int64, len(encoded))


def _encode(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of a unicode column's keys, one after the other, and each key's length in bytes."""
    n, width = len(u), u.dtype.itemsize // 4
    cps = np.ascontiguousarray(u).view(np.uint32).reshape(n, width)
    length = np.strings.str_len(u).astype(np.int64)  # trailing NULs are not part of a numpy str
    cp = cps[np.arange(width) < length[:, None]]  # row-major: key by key, character by character
    if not (cp >= 0x80).any():  # ASCII: a byte per character
        return cp.astype(np.uint8), length
    data, at = _utf8(cp)
    chars = np.zeros(n + 1, np.int64)
    np.cumsum(length, out=chars[1:])
    return data, np.diff(at[chars])  # key i's characters are cp[chars[i]:chars[i + 1]]


def find(keys: PackedKeys, key: str) -> int:
    """Binary search of `key` in the sorted permutation (about log2(n) slices compared as bytes); -1 if absent."""
    want = key.encode("utf-8", _ERRORS)
    # memoryviews: plain ints and bytes slices at C speed, the arrays' pages only read
    order, offsets, data = memoryview(keys.order), memoryview(keys.offsets), memoryview(keys.data)
    lo, hi = 0, len(order)
    while lo < hi:  # bisect_right: past the last key <= want
        mid = (lo + hi) // 2
        j = order[mid]
        if want < bytes(data[offsets[j] : offsets[j + 1]]):
            hi = mid
        else:
            lo = mid + 1
    if lo == 0:
        return -1
    j = order[lo - 1]
    return j if data[offsets[j] : offsets[j + 1]] == want else -1


def _unicode_column(keys: np.ndarray) -> np.ndarray:
    """A block of a numpy string column as fixed-width unicode ('<U'), as wide as its longest key."""
    if keys.dtype.kind == "U":
        return keys
    return keys.astype(f"<U{max(1, int(np.strings.str_len(keys).max(initial=0)))}")  # StringDType


def _utf8(cp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of code points `cp` (lone surrogates as their 3-byte form, as 'surrogatepass' writes them), and
    where each code point's bytes start (one more entry: the end). Only the non-ASCII code points go through the
    multi-byte arithmetic."""
    wide = cp >= 0x80
    size = 1 + wide.astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    at = np.zeros(len(cp) + 1, np.int64)
    np.cumsum(size, out=at[1:])
    out = np.empty(int(at[-1]), np.uint8)
    out[at[:-1][~wide]] = cp[~wide]
    start, c, k = at[:-1][wide], cp[wide].astype(np.int64), size[wide]
    out[start] = (np.array([0, 0, 0xC0, 0xE0, 0xF0], np.int64)[k] | (c >> (6 * (k - 1)))).astype(np.uint8)
    for j in (1, 2, 3):  # continuation bytes: 6 bits each, most significant first
        sel = k > j
        out[start[sel] + j] = (0x80 | ((c[sel] >> (6 * (k[sel] - 1 - j))) & 0x3F)).astype(np.uint8)
    return out, at
