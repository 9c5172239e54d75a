"""`validate`: prove a cache is complete and correct, or say exactly what is wrong (key or bucket + reason).

Streams shard by shard (one shard in memory at a time). Pure checks are small functions over arrays so each can be
tested with tables of cases; `validate` wires them to a cache.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dinofeat.archive import is_archive_source
from dinofeat.arrays import ArraySet
from dinofeat.checksum import expected_checksums
from dinofeat.errors import CacheFormatError, DinofeatError
from dinofeat.objects import open_files
from dinofeat.paths import local_path
from dinofeat.shardfile import HandlePool, ShardReader, read_layout
from dinofeat.store import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PENDING,
    ZARR_DTYPES,
    Store,
    array_shape,
    bf16_bits_to_float32,
)

FP16_MAX = 65504.0
COSINE_THRESHOLD = 0.99  # per patch, stored vs recomputed; fp16 storage + bf16/fp16 compute stays above 0.999


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
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

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
def validate(
    cache: str | os.PathLike[str],
    images: str | os.PathLike[str] | None = None,
    recompute: int = 0,
    sample: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> Report:
    """Run every check; `sample` < 1 checks that fraction of shards' values (structure is always checked)."""
    open_files(cache)  # an unsupported URL is a configuration error, not a damaged cache
    if images is not None and not is_archive_source(os.fspath(images)):
        images = local_path(images, "image folder")  # tar shards may be URLs; folders and lists are local
    report = Report(str(cache))
    try:
        st = Store(cache)
    except (CacheFormatError, FileNotFoundError, ValueError) as e:
        report.add("format", str(cache), str(e))
        return report
    meta = st.meta
    for k in ("model", "hidden_size", "patch_size", "bucket_spec", "dtypes", "recipe", "buckets", "fingerprint"):
        if k not in meta:
            report.add("metadata", "zarr.json", f"missing field {k!r}")
    if not report.ok:
        return report
    if meta.get("state") != "sealed":
        report.add("complete", "zarr.json", f"cache is not sealed (state {meta.get('state')!r}): precompute unfinished")
    try:
        ix = st.index()  # format 3: every column checked against its crc32c
    except CacheFormatError as e:
        report.add("index", "index", str(e))
        return report
    keys = [str(k) for k in ix["key"]]
    plans = st.bucket_plans()
    markers = st.markers()
    _check_structure(st, meta, ix, keys, plans, markers, report)
    _check_values(st, ix, keys, plans, markers, sample, seed, progress, report)
    if images is not None:
        _check_folder(str(images), ix, keys, report)
    if recompute:
        _check_recompute(st, meta, ix, keys, plans, str(images or meta["source_root"]), recompute, seed, report)
    return report


def _check_structure(st, meta, ix, keys, plans, markers, report: Report) -> None:
    patch, hidden = int(meta["patch_size"]), int(meta["hidden_size"])
    want_dtype = ZARR_DTYPES[meta["dtypes"]["store"]]
    for b in plans:
        if list(expected_grid(b.width, b.height, patch)) != list(
            next(x for x in meta["buckets"] if x["name"] == b.name)["grid"]
        ):
            report.add("grid", b.name, f"recorded grid differs from {b.height}/{patch} x {b.width}/{patch}")
        for name in st.array_names(b.name):
            try:
                arr = st.array(b.name, name)
            except (KeyError, FileNotFoundError):
                report.add("arrays", f"{b.name}/{name}", "array recorded in the metadata is missing")
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
        if "patches" not in st.array_names(b.name) or "cls" not in st.array_names(b.name):
            report.add("arrays", b.name, "cls or patches array missing")
    for k in duplicates(keys):
        report.add("duplicate", k, "key appears more than once in the index")
    n_b = len(plans)
    status = ix["status"]
    for i, k in enumerate(keys):
        b, r = int(ix["bucket"][i]), int(ix["row"][i])
        if b >= n_b or (b >= 0 and not 0 <= r < plans[b].rows):
            report.add("index", k, f"bucket {b} row {r} out of range")
        if status[i] == STATUS_PENDING:
            report.add("complete", k, "planned but neither done nor failed")
    failures = st.failures() | st.probe_failures()
    for i in np.flatnonzero(status == STATUS_FAILED):
        if not failures.get(keys[i]):
            report.add("failed", keys[i], "failed without a recorded reason")
    used = {(int(b), int(r)) for b, r in zip(ix["bucket"], ix["row"], strict=True) if b >= 0}
    if len(used) != int((ix["bucket"] >= 0).sum()):
        report.add("index", "index", "two images share a (bucket, row)")
    for b in plans:
        for u in range(b.num_shards):
            if (b.name, u) not in markers:
                report.add("complete", f"{b.name} shard {u}", "no done marker: shard not written")
    planned = {(b.name, u) for b in plans for u in range(b.num_shards)}
    for m in markers:
        if m not in planned:
            report.add("orphan", f"{m[0]} shard {m[1]}", "done marker for a shard that is not in the plan")
    orphans = st.orphan_groups()
    for d in orphans:
        report.add(
            "orphan", d, "group no metadata points to (an interrupted incremental run); rerun precompute to remove it"
        )
    for rel in st.files.list("buckets"):
        if any(rel.startswith(d + "/") for d in orphans):
            continue
        parts = rel.split("/")  # buckets/<b>/<array>/c/<u>/0...
        if parts[-1].endswith(".partial"):
            report.add("orphan", rel, "partial file left by an interrupted write")
        elif len(parts) > 4 and parts[3] == "c" and parts[4].isdigit() and (parts[1], int(parts[4])) not in planned:
            report.add("orphan", rel, "shard file outside the plan")
    report.checked["images"] = len(keys)
    report.checked["shards"] = len(planned)


def _check_values(st, ix, keys, plans, markers, sample, seed, progress, report: Report) -> None:
    rng = random.Random(seed)
    by_bucket: dict[int, np.ndarray] = {}
    for k in range(len(plans)):
        pos = np.flatnonzero(ix["bucket"] == k)
        by_bucket[k] = pos[np.argsort(ix["row"][pos])]
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
    for k, b, u in tqdm(todo, desc="validate", unit="shard", disable=not progress):
        s0, s1 = b.shard_range(u)
        positions = by_bucket[k][s0:s1]
        done = ix["status"][positions] == STATUS_DONE
        for name in st.array_names(b.name):
            try:
                layout = read_layout(f"buckets/{b.name}/{name}", st.files)
                reader = ShardReader(layout, HandlePool(1), expected=expected.get((b.name, name)))
                reader._handle(u)  # the shard index and its crc32c
            except CacheFormatError as e:
                report.add("shard", f"{b.name}/{name} shard {u}", str(e))
                continue
            if reader.verify_rows:
                x, damaged = _read_checked(reader, s0, s1)
                for r, why in damaged.items():
                    (report.add if done[r] else report.warn)("checksum", keys[positions[r]], f"{name}: {why}")
                done = done.copy()
                done[list(damaged)] = False  # already reported; their zeros are not a "zero row" finding
            else:
                unchecked += 1
                try:
                    x = st.read_rows(b.name, name, s0, s1)
                except Exception as e:
                    report.add("shard", f"{b.name}/{name} shard {u}", f"unreadable: {e}")
                    continue
            x = bf16_bits_to_float32(x) if bf16 else x
            for check, rows, why in (
                ("nan", nonfinite_rows(x), "NaN or Inf values"),
                ("zero", zero_rows(x), "all-zero row among done images (never written?)"),
            ):
                for r in rows:
                    if done[r]:
                        report.add(check, keys[positions[r]], f"{name}: {why}")
            for r in saturated_rows(x):
                if done[r]:
                    report.warn("saturation", keys[positions[r]], f"{name}: fp16 saturated (|x| = 65504)")
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


def _read_checked(reader: ShardReader, s0: int, s1: int) -> tuple[np.ndarray, dict[int, str]]:
    """Rows [s0, s1) of one shard, each verified against its crc32c; damaged rows read as zeros and are returned
    with their reason (position within the shard)."""
    rows, damaged = [], {}
    for r in range(s0, s1):
        try:
            rows.append(reader.read_row(r))
        except CacheFormatError as e:
            damaged[r - s0] = str(e)
            rows.append(np.zeros(reader.layout.chunk_shape[1:], reader.layout.dtype))
    return np.stack(rows), damaged


def _check_folder(folder: str, ix, keys, report: Report) -> None:
    from dinofeat.discover import discover, size_and_mtime

    src = discover(folder)
    found, planned = set(src.keys), set(keys)
    for k in sorted(found - planned):
        report.add("missing", k, "image in the folder is not in the cache")
    for k in sorted(planned - found):
        report.add("extra", k, "cache has an image the folder lacks")
    pos = {k: i for i, k in enumerate(keys)}
    for k in sorted(found & planned):
        i = pos[k]
        if is_stale(size_and_mtime(src.path(k)), (int(ix["file_size"][i]), int(ix["mtime_ns"][i]))):
            report.add("stale", k, "file changed since extraction (size or mtime)")


def is_stale(now: tuple[int, int], recorded: tuple[int, int]) -> bool:
    """(size, mtime) now vs when extracted; a size of -1 (a parquet row not read yet) is not compared."""
    return now[1] != recorded[1] or (now[0] >= 0 and now[0] != recorded[0])


def _check_recompute(st, meta, ix, keys, plans, source: str, k: int, seed: int, report: Report) -> None:
    import torch

    from dinofeat.config import Recipe
    from dinofeat.discover import locator
    from dinofeat.model import Encoder, load_model_info, resolve_device
    from dinofeat.preprocess import load_resized
    from dinofeat.tokens import split_tokens

    locate = locator(source, st.source_names())
    done = [i for i in np.flatnonzero(ix["status"] == STATUS_DONE)]
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
        try:
            u8 = load_resized(locate(keys[i]), (b.width, b.height), recipe)
        except Exception as e:
            report.add("recompute", keys[i], f"cannot read the source image: {e}")
            continue
        states = enc.encode_variants(torch.from_numpy(u8.copy())[None], recipe.mean, recipe.std, arrays.flip)
        for (layer, flipped), hidden in states.items():  # every stored layer, and the mirrored image's too
            _, _, patches = split_tokens(hidden.float().cpu().numpy(), info.num_register_tokens, b.grid)
            name = arrays.name("patches", layer, flipped)
            stored = st.read_rows(b.name, name, int(ix["row"][i]), int(ix["row"][i]) + 1)[0]
            stored = bf16_bits_to_float32(stored) if bf16 else stored
            cos = patch_cosines(stored, patches[0])
            worst = min(worst, float(cos.min()))
            if cos.min() < COSINE_THRESHOLD:
                report.add(
                    "recompute", keys[i], f"recomputed {name} differ: min cosine {cos.min():.4f} < {COSINE_THRESHOLD}"
                )
    report.checked["recomputed"] = len(picks)
    report.checked["recompute_min_cosine_x1e4"] = int(worst * 1e4)
