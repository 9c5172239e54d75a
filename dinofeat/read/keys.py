"""A cache's keys as a reader keeps them: one packed UTF-8 column (bytes + offsets) and the permutation that sorts
it, all numpy. No Python object per key, so forked DataLoader workers share these pages without copying them (a
`{key: row}` dict's entries are copied page by page as workers touch their reference counts), and a 200-character
key costs its own bytes, not every key's (a fixed-width column would pad every key to the longest). A key is
decoded on demand; a lookup by key is a binary search over the sorted permutation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# Keys are str that may hold lone surrogates in principle; surrogatepass round-trips any str (as keys_checksum does)
_ERRORS = "surrogatepass"


@dataclass(frozen=True, eq=False)
class PackedKeys:
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

    def __iter__(self) -> Iterator[str]:
        return (self.key(i) for i in range(len(self)))

    def find(self, key: str) -> int:
        """The position of `key` (the last one if it appears more than once, as a `{key: position}` dict holds),
        -1 if absent."""
        return find(self, key)


def pack(keys: Sequence[str] | np.ndarray) -> PackedKeys:
    """Pack `keys` (a list of str or any numpy string column: the index's comes as numpy's variable-width
    StringDType). Vectorised, a block of keys at a time, so packing 10^6 keys takes about a second and the transient
    fixed-width copy is one block's, padded to that block's longest key (the index column itself is the peak)."""
    column = keys if isinstance(keys, np.ndarray) else _unicode_column(keys)
    n = len(column)
    if n == 0:
        return PackedKeys(np.zeros(0, np.uint8), np.zeros(1, np.int64), np.zeros(0, np.int32))
    blocks = [_encode(_unicode_column(column[s : s + _BLOCK])) for s in range(0, n, _BLOCK)]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.concatenate([size for _, size in blocks]), out=offsets[1:])
    data = np.concatenate([d for d, _ in blocks])
    order = np.argsort(column, kind="stable").astype(np.int32 if n < 2**31 else np.int64)
    return PackedKeys(data, offsets, order)


_BLOCK = 1 << 13  # keys per block: a few MB of transient arrays, however many keys


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


def _unicode_column(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """A fixed-width numpy unicode ('<U') column of `keys`, as wide as its longest key."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind == "U":
        return keys
    if not len(keys):
        return np.zeros(0, dtype="<U1")
    if isinstance(keys, np.ndarray) and keys.dtype.kind == "T":  # StringDType: cast to the width this block needs
        return keys.astype(f"<U{max(1, int(np.strings.str_len(keys).max()))}")
    return np.array(list(keys), dtype=str)


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
