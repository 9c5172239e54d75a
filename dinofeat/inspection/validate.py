"""`validate`: prove a cache is complete and correct, or say exactly what is wrong (key or bucket + reason).

Streams shard by shard (one shard in memory at a time). Pure checks are small functions over arrays so each can be
tested with tables of cases; `validate` wires them to a cache.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinofeat.cache import housekeeping, metadata
from dinofeat.cache.arrays import ArraySet
from dinofeat.cache.checksum import expected_checksums
from dinofeat.cache.index import PROBE_FAILURES, SOURCE_NAMES
from dinofeat.cache.layout import (
    META_KEY,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PENDING,
    STATUS_PRUNED,
    VACANT_ROWS_VERSION,
    ZARR_DTYPES,
    Plan,
    array_shape,
    bf16_bits_to_float32,
)
from dinofeat.cache.markers import as_read, marker_status
from dinofeat.cache.objects import on_store_errors, open_files
from dinofeat.cache.shardfile import HandlePool, ShardReader, read_layout
from dinofeat.cache.store import Store
from dinofeat.errors import CHANGED_SINCE_PLANNED, CacheFormatError, ConfigError, DinofeatError, ImageChangedError
from dinofeat.inspection.info import failed_list
from dinofeat.paths import is_url, local_path
from dinofeat.progress import bar as progress_bar
from dinofeat.sources.archive import is_archive_source
from dinofeat.storeerrors import is_store_failure

FP16_MAX = 65504.0
COSINE_THRESHOLD = 0.99  # per patch, stored vs recomputed; fp16 storage + bf16/fp16 compute stays above 0.999


# problems with the cache's own description (metadata, index, arrays' zarr.json), which no re-extraction repairs
DESCRIPTION_CHECKS = frozenset({"metadata", "format", "index", "arrays", "shape", "dtype", "chunks", "damaged"})


@dataclass
class Problem:
    check: str
    where: str  # a key, a bucket, a file
    reason: str


@dataclass
class Report:
    cache: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    checked: dict[str, int | float] = field(default_factory=dict)

    unfinished: dict[str, int] | None = None  # done / failed / pending / total of a cache that is not sealed yet

    @property
    def ok(self) -> bool:
        return not self.problems

    def advice(self) -> list[str]:
        """What to do about the problems found, one line each."""
        checks = {p.check for p in self.problems}
        out = []
        described = not checks & DESCRIPTION_CHECKS  # --repair re-extracts shards; it refuses a damaged description
        if described and (
            checks & {"checksum", "shard", "stats"}
            or any(p.check == "complete" and "marker" in p.reason for p in self.problems)
        ):
            out.append("rerun the same precompute command with --repair: it re-extracts only the damaged shards")
        if "extra" in checks:
            out.append("rerun the same precompute command with --prune to drop the images gone from the source")
        if "missing" in checks:
            out.append("rerun the same precompute command to add the images the cache lacks")
        if "replaced" in checks:
            out.append(
                "images replaced by ones of other dimensions were not stored: rerun the same precompute command to "
                "plan them again into the buckets of their new size"
            )
        if "stale" in checks:
            out.append(
                "images changed since extraction keep their old features: rerun the same precompute command with "
                "--repair to extract their shards again"
            )
        if "source" in checks:
            out.append("give --images the source the cache was made from (or leave it out: the cache is checked alone)")
        if not described:
            out.append("the cache's own description is damaged: restore it from a copy, or rebuild with --overwrite")
        return out

    def add(self, check: str, where: str, reason: str) -> None:
        self.problems.append(Problem(check, where, reason))

    def warn(self, check: str, where: str, reason: str) -> None:
        self.warnings.append(Problem(check, where, reason))

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": self.cache,
            "ok": self.ok,
            "problems": [asdict(p) for p in self.problems],
            "warnings": [asdict(p) for p in self.warnings],
            "checked": self.checked,
            "unfinished": self.unfinished,
            "advice": self.advice(),
        }


# ---- pure checks ---------------------------------------------------------------------------------------------
def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Row indices holding NaN or Inf."""
    return np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))


def zero_rows(x: np.ndarray) -> np.ndarray:
    """Row indices that are entirely zero (an unwritten zarr row reads back as zeros)."""
    return np.flatnonzero(~x.reshape(len(x), -1).any(axis=1))


def saturated_rows(x: np.ndarray) -> np.ndarray:
    """Row indices with |x| == 65504, fp16's largest finite value: the value was clipped."""
    return np.flatnonzero((np.abs(x.reshape(len(x), -1)) >= FP16_MAX).any(axis=1))


def norm_outliers(norms: np.ndarray, k: float = 8.0) -> np.ndarray:
    """Indices whose norm is more than k robust standard deviations (1.4826 MAD) from the median."""
    if len(norms) < 8:
        return np.zeros(0, np.int64)
    med = np.median(norms)
    mad = 1.4826 * np.median(np.abs(norms - med))
    if mad == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.abs(norms - med) > k * mad)


def duplicates(keys: list[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({k for k in keys if k in seen or seen.add(k)})


def expected_grid(width: int, height: int, patch: int) -> tuple[int, int]:
    return height // patch, width // patch


def patch_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per patch of two [h, w, D] grids."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-300), 0.0)


# ---- the command -----------------------------------------------------------------------------------------------
@on_store_errors  # a store that does not answer: one line, not a client's traceback chain
def validate(
    cache: str | os.PathLike[str],
    images: str | os.PathLike[str] | None = None,
    recompute: int = 0,
    sample: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    failures: bool = False,
) -> Report:
    """Run every check; `sample` < 1 checks that fraction of shards' values (structure is always checked). With
    `failures`, each failed image is named with its reason, as a warning: failed images are data, not damage.

    Never raises on a damaged cache: every kind of damage is a named problem in the report (a configuration error,
    such as an image folder that does not exist, still raises)."""
    files = open_files(cache)  # an unsupported URL is a configuration error, not a damaged cache
    if not 0 < sample <= 1:
        raise ConfigError(f"--sample is the fraction of shards whose values are checked: 0 < sample <= 1, got {sample}")
    if recompute < 0:
        raise ConfigError(f"--recompute is a number of images >= 0, got {recompute}")
    if images is not None and not is_archive_source(os.fspath(images)):
        images = local_path(images, "image folder")  # tar shards may be URLs; folders and lists are local
        if not images.exists():
            raise ConfigError(f"image source {str(images)!r} does not exist")
    _refuse_non_cache(files, cache)
    report = Report(str(cache))
    try:
        _run_checks(cache, images, recompute, sample, seed, progress, report, failures)
    except CacheFormatError as e:
        report.add("damaged", str(cache), str(e))
    except DinofeatError:
        raise
    except Exception as e:  # the report names damage no check foresaw instead of ending in a traceback
        if is_store_failure(e):
            raise  # an outage, not damage: one line from on_store_errors
        report.add("damaged", str(cache), f"validate could not read on: {type(e).__name__}: {e}")
    return report


def _refuse_non_cache(files, cache) -> None:
    """A path that holds no cache at all is a mistyped argument (ConfigError), not a damaged cache: a folder with
    none of a cache's files, or no folder."""
    if files.exists("zarr.json"):
        return
    if not files.remote and not Path(files.root).is_dir():
        what = "a file, not a folder" if Path(files.root).exists() else "no such folder"
        raise ConfigError(f"no dinofeat cache at {cache} ({what})")
    if not files.children("_dinofeat") and not files.children("buckets"):
        raise ConfigError(f"{cache} is not a dinofeat cache (no zarr.json, no cache files)")


def _run_checks(
    cache, images, recompute: int, sample: float, seed: int, progress: bool, report: Report, name_failed: bool = False
) -> None:
    try:
        st = Store(cache)
    except CacheFormatError as e:
        _metadata_problems(open_files(cache), str(e), report)
        return
    meta = st.meta
    try:
        ix = st.index.read()  # format 3: every column checked against its crc32c
    except CacheFormatError as e:
        report.add("index", "index", str(e))
        return
    damaged = st.index.damaged_records()  # each record against its crc32c; a source name outside the source
    for rel, why in damaged.items():
        report.add("index", rel, why)
    if PROBE_FAILURES in damaged:
        return  # the plan itself cannot be read
    plan = st.index.plan(ix)
    markers = st.markers.read()
    status = ix["status"]
    if meta.get("state") != "sealed":
        status, _ = marker_status(plan, markers)
        done, failed = int((status == STATUS_DONE).sum()), int((status == STATUS_FAILED).sum())
        pending = len(status) - done - failed
        report.unfinished = {"done": done, "failed": failed, "pending": pending, "total": len(status)}
        report.add(
            "complete",
            "cache",
            f"unfinished: {done + failed} of {len(status)} images done ({failed} of them failed), {pending} pending; "
            "rerun the same precompute command to finish it",
        )
    keys = plan.keys
    _check_structure(st, meta, ix, status, keys, plan.buckets, markers, report)
    failures: dict[str, str] = {}
    if name_failed or images is not None:  # one read of the failures' reasons, only when a check needs them
        failures = marker_status(plan, markers)[1] if meta.get("state") != "sealed" else _recorded_failures(st)
    if name_failed:
        for k, why in failed_list(keys, status, failures):
            report.warn("failed", k, why)
    _check_vacant(plan, markers, report)
    _check_values(st, plan, status, markers, sample, seed, progress, report)
    _check_stats(st, plan, markers, report)
    if images is not None:
        recorded = str(meta.get("source_root") or "")
        _check_folder(str(images), as_read(plan, markers), status, markers, failures, report, recorded)
    if recompute and SOURCE_NAMES not in damaged:  # never recompute from files an edited map names
        source = str(images or meta["source_root"])
        _check_recompute(st, meta, ix, status, keys, plan.buckets, source, recompute, seed, report)


def _metadata_problems(files, refusal: str, report: Report) -> None:
    """The cache would not open: name each metadata field that is damaged (or, failing that, the refusal)."""
    try:
        meta = json.loads(files.read("zarr.json")).get("attributes", {}).get(META_KEY)
    except (OSError, ValueError, AttributeError):
        meta = None
    if not isinstance(meta, dict):
        report.add("format", "zarr.json", refusal)
        return
    named = 0
    for name in metadata.damage(meta):
        report.add("metadata", name, "fails its checksum: edited or damaged since it was written")
        named += 1
    for name, why in metadata.problems(meta):
        report.add("metadata", name, why)
        named += 1
    if not named:
        report.add("format", "zarr.json", refusal)


def _check_structure(st, meta, ix, status, keys, plans, markers, report: Report) -> None:
    patch, hidden = int(meta["patch_size"]), int(meta["hidden_size"])
    want_dtype = ZARR_DTYPES[meta["dtypes"]["store"]]
    for b in plans:
        for name in st.shards.names(b.name):
            try:
                arr = st.shards.array(b.name, name)
            except (KeyError, FileNotFoundError):
                report.add("arrays", f"{b.name}/{name}", "array recorded in the metadata is missing (no zarr.json)")
                continue
            except (CacheFormatError, ValueError) as e:  # its zarr.json fails its checksum, or is not zarr
                report.add("arrays", f"{b.name}/{name}", str(e))
                continue
            grid = expected_grid(b.width, b.height, patch)
            want = array_shape(name, b.rows, grid, hidden, int(meta.get("registers_stored") or 0))
            if tuple(arr.shape) != want:
                report.add("shape", f"{b.name}/{name}", f"shape {tuple(arr.shape)}, expected {want} (grid, D or rows)")
            if str(arr.dtype) != want_dtype:
                report.add("dtype", f"{b.name}/{name}", f"dtype {arr.dtype}, recorded {want_dtype}")
            if tuple(arr.shards or ())[:1] != (b.shard_rows,) or tuple(arr.chunks)[:1] != (1,):
                report.add(
                    "chunks", f"{b.name}/{name}", f"chunk/shard layout {arr.chunks}/{arr.shards} not as recorded"
                )
        if "patches" not in st.shards.names(b.name) or "cls" not in st.shards.names(b.name):
            report.add("arrays", b.name, "cls or patches array missing")
    for k in duplicates(keys):
        report.add("duplicate", k, "key appears more than once in the index")
    n_b = len(plans)
    for i, k in enumerate(keys):
        b, r = int(ix["bucket"][i]), int(ix["row"][i])
        if b >= n_b or (b >= 0 and not 0 <= r < plans[b].rows):
            report.add("index", k, f"bucket {b} row {r} out of range")
    counts = np.bincount(ix["bucket"][ix["bucket"] >= 0], minlength=n_b) if n_b else np.zeros(0, np.int64)
    vacancies = st.format_version >= VACANT_ROWS_VERSION  # rows whose image was planned again into another bucket
    for k, b in enumerate(plans):
        if k < len(counts) and (counts[k] > b.rows or (counts[k] < b.rows and not vacancies)):
            report.add("index", b.name, f"the index puts {counts[k]} images in this bucket, its record says {b.rows}")
    unfinished = report.unfinished is not None  # one summary line says what is pending, not one line per image
    if not unfinished:
        for i in np.flatnonzero(status == STATUS_PENDING):
            report.add("complete", keys[i], "planned but neither done nor failed")
    failures = _recorded_failures(st)
    for i in np.flatnonzero(status == STATUS_FAILED):
        if not failures.get(keys[i]) and not unfinished:
            report.add("failed", keys[i], "failed without a recorded reason")
    used = {(int(b), int(r)) for b, r in zip(ix["bucket"], ix["row"], strict=True) if b >= 0}
    if len(used) != int((ix["bucket"] >= 0).sum()):
        report.add("index", "index", "two images share a (bucket, row)")
    if not unfinished:
        for b in plans:
            for u in range(b.num_shards):
                if (b.name, u) not in markers:
                    report.add("complete", f"{b.name} shard {u}", "no done marker: shard not written (or marker lost)")
    planned = {(b.name, u) for b in plans for u in range(b.num_shards)}
    for m in markers:
        if m not in planned:
            report.add("orphan", f"{m[0]} shard {m[1]}", "done marker for a shard that is not in the plan")
    orphans = housekeeping.orphan_groups(st)
    for d in orphans:
        report.add(
            "orphan", d, "group no metadata points to (an interrupted incremental run); rerun precompute to remove it"
        )
    for rel in st.files.list("buckets"):
        if any(rel.startswith(d + "/") for d in orphans):
            continue
        parts = rel.split("/")  # buckets/<b>/<array>/c/<u>/0...
        if housekeeping.TEMP_NAME.match(parts[-1]):
            continue  # named below, with every other temp file
        if parts[-1].endswith(".partial"):
            report.add("orphan", rel, "partial file left by an interrupted write")
        elif len(parts) > 4 and parts[3] == "c" and parts[4].isdigit() and (parts[1], int(parts[4])) not in planned:
            report.add("orphan", rel, "shard file outside the plan")
    for rel in housekeeping.temp_files(st.files):
        report.add(
            "orphan",
            rel,
            "temporary file of a write that was cut short (disk full, a crash): rerun the same precompute command "
            "to remove it",
        )
    report.checked["images"] = len(keys)
    report.checked["shards"] = len(planned)


def _check_vacant(plan: Plan, markers, report: Report) -> None:
    """A row no image holds (its image was planned again into another bucket) must be failed in its shard's
    marker: stored as zeros and left out of the statistics. One the marker says was stored means a lost index entry."""
    held = plan.rows_to_keys()
    for b in plan.buckets:
        for r in np.flatnonzero(held[b.name] < 0):
            m = markers.get((b.name, int(r) // b.shard_rows))
            if m is not None and str(r) not in m["failed"]:
                report.add("index", f"{b.name} row {r}", "held by no image, yet its done marker says it was stored")


def _recorded_failures(st: Store) -> dict[str, str]:
    """The failures' reasons as recorded; {} when a record is damaged (named already, by `damaged_records`)."""
    try:
        return st.index.failures() | st.index.probe_failures()
    except CacheFormatError:
        return {}


def _check_values(st, plan: Plan, status, markers, sample, seed, progress, report: Report) -> None:
    rng = random.Random(seed)
    keys, plans = plan.keys, plan.buckets
    held = plan.rows_to_keys()  # -1: a vacant row
    by_bucket = {k: held[b.name] for k, b in enumerate(plans)}
    todo = [
        (k, b, u)
        for k, b in enumerate(plans)
        for u in range(b.num_shards)
        if (b.name, u) in markers and (sample >= 1 or rng.random() < sample)
    ]
    bf16 = st.meta["dtypes"]["store"] == "bf16"
    expected = expected_checksums(markers, plans)
    norms, norm_keys = [], []
    unchecked = 0
    for k, b, u in progress_bar(todo, desc="validate", unit="shard", enabled=progress):
        s0, s1 = b.shard_range(u)
        positions = by_bucket[k][s0:s1]
        done = (positions >= 0) & (status[positions] == STATUS_DONE)
        where = [keys[p] if p >= 0 else f"{b.name} row {s0 + r} (vacant)" for r, p in enumerate(positions)]
        for name in st.shards.names(b.name):
            try:
                layout = read_layout(f"buckets/{b.name}/{name}", st.files, st.shards.array_checksum(b.name, name))
                reader = ShardReader(layout, HandlePool(1), expected=expected.get((b.name, name)))
                reader._handle(u)  # the shard index and its crc32c
            except (CacheFormatError, OSError, ValueError, KeyError) as e:  # OSError: EIO, a folder in its place
                if is_store_failure(e):
                    raise
                report.add("shard", f"{b.name}/{name} shard {u}", _reason(e))
                continue
            vouched = np.zeros(s1 - s0, bool)  # rows whose bytes match the crc32c their marker recorded
            if reader.verify_rows:
                x, damaged = _read_checked(reader, s0, s1)
                for r, why in damaged.items():
                    (report.add if done[r] else report.warn)("checksum", where[r], f"{name}: {why}")
                done = done.copy()
                done[list(damaged)] = False  # already reported; their zeros are not a "zero row" finding
                if reader.expected is not None:
                    vouched = np.array([reader.expected[r] >= 0 for r in range(s0, s1)]) & ~np.isin(
                        np.arange(s1 - s0), list(damaged)
                    )
            else:
                unchecked += 1
                try:
                    x = st.shards.read_rows(b.name, name, s0, s1)
                except Exception as e:
                    if is_store_failure(e):
                        raise
                    report.add("shard", f"{b.name}/{name} shard {u}", f"unreadable: {e}")
                    continue
            x = bf16_bits_to_float32(x) if bf16 else x
            for r in nonfinite_rows(x):
                if done[r]:
                    report.add("nan", where[r], f"{name}: NaN or Inf values")
            for r in zero_rows(x):  # a stored, checksummed zero row was written as zeros: odd, not damage
                if done[r] and vouched[r]:
                    report.warn("zero", where[r], f"{name}: all-zero features (stored and checksummed)")
                elif done[r]:
                    report.add("zero", where[r], f"{name}: all-zero row among done images (never written?)")
            for r in saturated_rows(x):
                if done[r]:
                    report.warn("saturation", where[r], f"{name}: fp16 saturated (|x| = 65504)")
            if name == "cls":
                n = np.linalg.norm(x.astype(np.float32), axis=1)
                norms += n[done].tolist()
                norm_keys += [keys[p] for p in positions[done]]
    for i in norm_outliers(np.asarray(norms)):
        report.warn("cls_norm", norm_keys[i], f"CLS norm {norms[i]:.3g} is an outlier")
    report.checked["value_shards"] = len(todo)
    if unchecked:
        report.warn(
            "checksum",
            "cache",
            f"format {st.format_version}: chunks carry no checksums, so {unchecked} shard arrays were read unverified "
            "(rebuild with this version to get them)",
        )


def _reason(e: BaseException) -> str:
    """A problem's text: the message of our own errors, the type too for anything else (FileNotFoundError: ...)."""
    return str(e) if isinstance(e, DinofeatError) else f"{type(e).__name__}: {e}"


def _check_stats(st, plan, markers, report: Report) -> None:
    """The recorded channel statistics must be the merge of the shards' own (what normalize=True applies)."""
    recorded = st.meta.get("channel_stats")
    if not recorded or st.meta.get("state") != "sealed":
        return
    merged = st.stats.merged(plan.buckets, markers)
    if merged is None:
        report.add("stats", "_dinofeat/stats", "a shard's statistics file is missing or damaged; rerun with --repair")
        return
    for name, rec in recorded.items():
        now = merged.get(name)
        if now is None or not (
            now["count"] == rec["count"]
            and np.allclose(now["mean"], rec["mean"], rtol=1e-5, atol=1e-6)
            and np.allclose(now["std"], rec["std"], rtol=1e-5, atol=1e-6)
        ):
            report.add("stats", f"channel_stats.{name}", "differs from the merge of the shards' statistics")


def _read_checked(reader: ShardReader, s0: int, s1: int) -> tuple[np.ndarray, dict[int, str]]:
    """Rows [s0, s1) of one shard, each verified against its crc32c; damaged rows read as zeros and are returned
    with their reason (position within the shard)."""
    rows, damaged = [], {}
    for r in range(s0, s1):
        try:
            rows.append(reader.read_row(r))
        except (CacheFormatError, OSError) as e:
            if is_store_failure(e):
                raise
            damaged[r - s0] = _reason(e)
            rows.append(np.zeros(reader.layout.chunk_shape[1:], reader.layout.dtype))
    return np.stack(rows), damaged


def _not_the_source(folder: str, recorded: str, planned: int, lacking: int) -> str:
    """Why `folder` cannot be compared image by image with the cache ('' when it can). A folder that is not where
    the cache was made and lacks most of its images is another dataset (numbered file names often overlap); the
    place it was made that holds none of them was emptied or renamed. Either way, listing every image as "extra"
    would advise `--prune`, which drops them all. A source moved as a whole (precompute accepts it) holds them."""
    if not planned or (lacking * 2 <= planned and lacking < planned):
        return ""
    same = bool(recorded) and _same_place(folder, recorded)
    if same and lacking == planned:
        return (
            f"holds none of the cache's {planned} images any more (emptied, or every file renamed): rerun "
            "precompute with --prune to drop them all, or --overwrite to rebuild from what it holds now"
        )
    if same:
        return ""
    where = f" (made from {recorded})" if recorded else ""
    return (
        f"lacks {lacking} of the cache's {planned} images: not the source this cache was made from{where}; "
        "validate --images takes that source"
    )


def _same_place(folder: str, recorded: str) -> bool:
    if is_url(folder) or is_url(recorded):
        return folder.rstrip("/") == recorded.rstrip("/")
    return os.path.realpath(folder) == os.path.realpath(recorded)


def _check_folder(
    folder: str, plan: Plan, status: np.ndarray, markers, failures: dict[str, str], report: Report, recorded: str = ""
) -> None:
    """The source against the cache: images missing from either, and done images changed since their features were
    made (files, and archive members that moved: a tar shard or parquet file rewritten, even when every size and
    time matches), saying when their dimensions changed too; images that failed because their dimensions changed
    since they were planned (a rerun plans them again). `plan` records the facts of the bytes each image was read
    from (the index, corrected by the done markers of an unfinished cache)."""
    from dinofeat.extraction.stale import changed_images, resized_done_images, resized_reason
    from dinofeat.images.decode import DEFAULT_MAX_PIXELS
    from dinofeat.sources.discover import discover

    src = discover(folder)
    keys = plan.keys
    found = set(src.keys)
    pruned = {keys[i] for i in np.flatnonzero(status == STATUS_PRUNED)}
    planned = set(keys) - pruned
    why = _not_the_source(folder, recorded, len(planned), len(planned - found))
    if why:  # another folder, or one emptied: `--prune` (what "extra" images advise) would drop the cache's images
        report.add("source", folder, why)
        return
    for k in sorted(found - set(keys)):
        report.add("missing", k, "image in the source is not in the cache")
    for k in sorted(planned - found):
        report.add("extra", k, "cache has an image the source lacks (drop it: rerun precompute with --prune)")
    changed = changed_images(plan, status, src)
    resized = resized_done_images(plan, markers, status, src, changed, DEFAULT_MAX_PIXELS)
    for k in sorted(set(changed) | set(resized)):
        parts = [changed[k]] if k in changed else []
        if k in resized:
            parts.append(f"{resized_reason(*resized[k])}: --repair plans it again into the bucket of its new size")
        if k in planned:
            report.add("stale", k, "; ".join(parts))
    for k, why in sorted(failures.items()):
        if why.startswith(CHANGED_SINCE_PLANNED) and k in found and k in planned:
            report.add("replaced", k, f"not stored: {why}")


def _check_recompute(st, meta, ix, status, keys, plans, source: str, k: int, seed: int, report: Report) -> None:
    import torch

    from dinofeat.extraction.model import Encoder, load_model_info, resolve_device
    from dinofeat.extraction.tokens import split_tokens
    from dinofeat.images.preprocess import load_resized
    from dinofeat.images.recipe import Recipe
    from dinofeat.sources.discover import locator

    locate = locator(source, st.index.source_names())
    done = [i for i in np.flatnonzero(status == STATUS_DONE)]
    picks = random.Random(seed).sample(done, min(k, len(done)))
    try:
        info = load_model_info(meta["model"]["id"], meta["model"].get("revision"))
    except DinofeatError as e:
        report.add("recompute", meta["model"]["id"], f"cannot load the recorded model: {e}")
        return
    if info.config_hash != meta["model"]["config_hash"]:
        report.add("recompute", info.id, "the model now at this id has a different config than the one recorded")
    device = resolve_device(None)
    recorded = meta["dtypes"]["compute"]
    # a cache made in fp16 on a GPU is checked in fp32 on a CPU (no fast fp16 matmul there); the threshold allows it
    arrays = ArraySet.from_meta(meta)
    dtype = "fp32" if device.type == "cpu" and recorded == "fp16" else recorded
    enc = Encoder(info, device, dtype, layers=arrays.layers, layer_norm=arrays.layer_norm)
    recipe = Recipe.from_dict(meta["recipe"])
    bf16 = meta["dtypes"]["store"] == "bf16"
    worst = 1.0
    for i in picks:
        b = plans[int(ix["bucket"][i])]
        loc = None
        try:  # the size too: features of an image stored in another image's bucket are wrong however close
            loc = locate(keys[i])
            u8 = load_resized(loc, (b.width, b.height), recipe, (int(ix["src_w"][i]), int(ix["src_h"][i])))
        except ImageChangedError as e:
            report.add("recompute", keys[i], f"{e} ({_changed_advice(loc, ix, i)})")
            continue
        except Exception as e:
            report.add("recompute", keys[i], f"cannot read the source image: {e}")
            continue
        states = enc.encode_variants(torch.from_numpy(u8.copy())[None], recipe.mean, recipe.std, arrays.flip)
        for (layer, flipped), hidden in states.items():  # every stored layer, and the mirrored image's too
            _, _, patches = split_tokens(hidden.float().cpu().numpy(), info.num_register_tokens, b.grid)
            name = arrays.name("patches", layer, flipped)
            stored = st.shards.read_rows(b.name, name, int(ix["row"][i]), int(ix["row"][i]) + 1)[0]
            stored = bf16_bits_to_float32(stored) if bf16 else stored
            cos = patch_cosines(stored, patches[0])
            worst = min(worst, float(cos.min()))
            if cos.min() < COSINE_THRESHOLD:
                report.add(
                    "recompute", keys[i], f"recomputed {name} differ: min cosine {cos.min():.4f} < {COSINE_THRESHOLD}"
                )
    report.checked["recomputed"] = len(picks)
    report.checked["recompute_min_cosine"] = math.floor(worst * 1e4) / 1e4  # rounded down: never reads better


def _changed_advice(loc: Any, ix: dict[str, np.ndarray], i: int) -> str:
    """What fixes an image whose dimensions are not the index's. --repair finds changed images by size and mtime
    (all a stat or a tar header gives): a file rewritten with both kept (an uncompressed format written into a tar
    with fixed member times, a copy that preserved the time) is seen only here, and --repair would not act on it."""
    from dinofeat.sources.discover import is_stale, size_and_mtime

    recorded = (int(ix["file_size"][i]), int(ix["mtime_ns"][i]))
    try:
        unseen = loc is not None and not is_stale(size_and_mtime(loc), recorded)
    except OSError:
        unseen = False
    if unseen:
        return (
            "its file has the size and modification time the index records, which is all --repair compares: write it "
            "with a new modification time and rerun precompute --repair, or rebuild with --overwrite"
        )
    return "the index's size is not the source's: rerun precompute --repair"
