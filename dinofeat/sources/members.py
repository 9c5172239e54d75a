"""Where each image of an archive source is (tar byte ranges, parquet rows), as numpy columns parallel to the
source's keys: 28 bytes an image, where a `Member` object in a dict by key cost ~500. A `Member` is made only
for the image about to be read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dinofeat.sources.archive import Member


@dataclass(frozen=True, eq=False)
class Members:
    """Image i is in `archives[archive[i]]` at `offset[i]` (a tar member's first data byte; a parquet row), with
    `size[i]` bytes (-1: a parquet row not read yet) and the modification time its listing saw."""

    archives: tuple[str, ...]
    archive: np.ndarray  # int32 index into archives
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    mtime_ns: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.archive)

    def member(self, i: int, key: str) -> Member:
        """Image i as a decode worker receives it. Its name is the key's part after the archive's stem (the sample
        key of a tar member, the row key of a parquet row): what the read-time header check compares (see
        `archive.names_agree`), as when a plan is read back from the cache's index."""
        return Member(
            self.archives[int(self.archive[i])],
            key.split("/", 1)[1],
            int(self.offset[i]),
            int(self.size[i]),
            int(self.mtime_ns[i]),
        )

    def take(self, positions: np.ndarray) -> Members:
        pos = np.asarray(positions, np.int64)
        return Members(self.archives, self.archive[pos], self.offset[pos], self.size[pos], self.mtime_ns[pos])

    def with_changes(self, changes: Mapping[int, Member]) -> Members:
        """A copy with the images at the given positions somewhere else (what rank 0 found moved in this run)."""
        if not changes:
            return self
        archives = list(self.archives)
        at = {a: k for k, a in enumerate(archives)}
        cols = [self.archive.copy(), self.offset.copy(), self.size.copy(), self.mtime_ns.copy()]
        for i, m in changes.items():
            if m.archive not in at:
                at[m.archive] = len(archives)
                archives.append(m.archive)
            for col, value in zip(cols, (at[m.archive], m.offset, m.size, m.mtime_ns), strict=True):
                col[i] = value
        return Members(tuple(archives), *cols)


def members_of(found: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Members:
    """The columns of several archives' listings, one after the other: (archive, offsets, sizes, mtimes) each."""
    archive = np.concatenate(
        [np.full(len(o), k, np.int32) for k, (_, o, _, _) in enumerate(found)] or [np.zeros(0, np.int32)]
    )
    cols = [np.concatenate([f[j] for f in found] or [np.zeros(0, np.int64)]).astype(np.int64) for j in (1, 2, 3)]
    return Members(tuple(f[0] for f in found), archive, *cols)


def from_mapping(keys: Sequence[str], members: Mapping[str, Member]) -> Members:
    """Columns of `{key: Member}` in the order of `keys` (each key must have one)."""
    archives: dict[str, int] = {}
    archive = np.array([archives.setdefault(members[k].archive, len(archives)) for k in keys], np.int32)
    cols = [np.array([getattr(members[k], f) for k in keys], np.int64) for f in ("offset", "size", "mtime_ns")]
    return Members(tuple(archives), archive.reshape(-1), *(c.reshape(-1) for c in cols))
