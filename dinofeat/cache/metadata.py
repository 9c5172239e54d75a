"""The cache's metadata (root zarr.json, attributes["dinofeat"]) as data: its checksums and the shape readers rely on.

Pure functions (no zarr, no files), so every rule is tested with a table of cases. A metadata write stamps one
crc32c per field (`stamp`); an open checks them (`damage`), so an edited or damaged field is refused by name
instead of being served (a store dtype edited from fp16 to bf16 would turn every row into garbage; an edited
channel mean would silently skew `normalize=True`). Caches written before dinofeat 0.6 carry no field checksums:
they are checked for shape only (`problems`), and get checksums at their next metadata write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dinofeat.cache.checksum import META_CHECKSUMS, meta_checksums, meta_mismatches

CHECKSUMS_SINCE = (0, 6)  # caches created by this version or later must carry field checksums
STATES = ("planning", "planned", "sealed")
STORE_DTYPES = ("fp16", "bf16", "fp32")
COMPUTE_DTYPES = ("fp16", "bf16", "fp32")


def version_tuple(text: object) -> tuple[int, ...]:
    """'0.6.0' -> (0, 6, 0); anything unparsable -> (0,)."""
    parts = []
    for p in str(text or "0").split("."):
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


def stamp(meta: Mapping[str, Any]) -> dict[str, Any]:
    """`meta` with its field checksums: what every metadata write stores."""
    out = {k: v for k, v in meta.items() if k != META_CHECKSUMS}
    out[META_CHECKSUMS] = meta_checksums(out)
    return out


def damage(meta: Mapping[str, Any]) -> list[str]:
    """Fields that fail their checksum (or were added or dropped since it was written). A cache created by 0.6 or
    later with no checksums at all is damaged too (they were dropped): 'meta_checksums' is named then."""
    if META_CHECKSUMS not in meta:
        return [META_CHECKSUMS] if version_tuple(meta.get("dinofeat_version")) >= CHECKSUMS_SINCE else []
    return meta_mismatches(meta)


def _int(v: object, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def problems(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, reason) for every field a reader relies on that is missing or cannot be right; [] when the metadata
    is usable. Checks types, ranges and the facts that tie fields together (grid = side / patch, unique bucket
    names, one hidden size), never values only the data could confirm."""
    out: list[tuple[str, str]] = []

    def bad(field: str, why: str) -> None:
        out.append((field, why))

    if meta.get("state") not in STATES:
        bad("state", f"{meta.get('state')!r} is not one of {', '.join(STATES)}")
    group = meta.get("index_group", "index")  # version 1 caches have none: their index is "index"
    if not isinstance(group, str) or not group.startswith("index"):
        bad("index_group", f"{group!r} is not an index group name")
    fv = meta.get("format_version")
    sums = meta.get("index_checksums")
    if _int(fv) and fv >= 3 and not (isinstance(sums, dict) and all(_int(v) for v in sums.values()) and sums):
        bad("index_checksums", "missing or malformed: a format 3+ cache always records them")
    model = meta.get("model")
    if not isinstance(model, dict):
        bad("model", "missing or not an object")
        model = {}
    patch, hidden = meta.get("patch_size"), meta.get("hidden_size")
    if not _int(patch, 1):
        bad("patch_size", f"{patch!r} is not a positive integer")
    elif model.get("patch_size") != patch:
        bad("patch_size", f"{patch} differs from model.patch_size {model.get('patch_size')!r}")
    if not _int(hidden, 1):
        bad("hidden_size", f"{hidden!r} is not a positive integer")
    elif model.get("hidden_size") != hidden:
        bad("hidden_size", f"{hidden} differs from model.hidden_size {model.get('hidden_size')!r}")
    regs, stored = meta.get("num_register_tokens"), meta.get("registers_stored", 0)
    if not _int(regs):
        bad("num_register_tokens", f"{regs!r} is not an integer >= 0")
    elif not _int(stored) or stored not in (0, regs):
        bad("registers_stored", f"{stored!r} is neither 0 nor num_register_tokens ({regs})")
    dtypes = meta.get("dtypes")
    if not isinstance(dtypes, dict) or dtypes.get("store") not in STORE_DTYPES:
        bad("dtypes", f"store dtype {(dtypes or {}).get('store') if isinstance(dtypes, dict) else dtypes!r} unknown")
    elif dtypes.get("compute") not in COMPUTE_DTYPES:
        bad("dtypes", f"compute dtype {dtypes.get('compute')!r} unknown")
    for field in ("bucket_spec", "recipe", "fingerprint"):
        if not isinstance(meta.get(field), dict):
            bad(field, "missing or not an object")
    out += _bucket_problems(meta.get("buckets"), patch if _int(patch, 1) else None)
    out += _optional_problems(meta, hidden if _int(hidden, 1) else None)
    return out


def _bucket_problems(buckets: object, patch: int | None) -> list[tuple[str, str]]:
    if not isinstance(buckets, list):
        return [("buckets", "missing or not a list")]
    out = []
    names = set()
    for k, b in enumerate(buckets):
        where = f"buckets[{k}]"
        if not isinstance(b, dict):
            out.append((where, "not an object"))
            continue
        w, h, rows, per, part = (b.get(x) for x in ("width", "height", "rows", "shard_rows", "part"))
        if not (_int(w, 1) and _int(h, 1) and _int(rows) and _int(per, 1) and _int(part if part is not None else 0)):
            out.append((where, "width, height, rows, shard_rows or part missing or not a valid integer"))
            continue
        if per > max(rows, 1):
            out.append((where, f"shard_rows {per} exceeds its {rows} rows"))
        want = f"{w}x{h}" if not part else f"{w}x{h}_{part}"
        if b.get("name") != want:
            out.append((where, f"name {b.get('name')!r} does not match its size and part ({want})"))
        if b.get("name") in names:
            out.append((where, f"bucket {b.get('name')!r} appears twice"))
        names.add(b.get("name"))
        if patch is not None and (w % patch or h % patch or list(b.get("grid") or []) != [h // patch, w // patch]):
            out.append((where, f"grid {b.get('grid')} is not {h}/{patch} x {w}/{patch}"))
    return out


def _optional_problems(meta: Mapping[str, Any], hidden: int | None) -> list[tuple[str, str]]:
    out = []
    last = meta.get("last_sealed")
    buckets = meta.get("buckets") if isinstance(meta.get("buckets"), list) else []
    if last is not None and not (
        isinstance(last, dict)
        and isinstance(last.get("index_group"), str)
        and _int(last.get("num_buckets"))
        and last["num_buckets"] <= len(buckets)
    ):
        out.append(("last_sealed", "malformed, or names more buckets than the cache has"))
    stats = meta.get("channel_stats")
    if stats is not None:
        ok = isinstance(stats, dict) and all(
            isinstance(s, dict)
            and _int(s.get("count"))
            and all(isinstance(s.get(x), list) and (hidden is None or len(s[x]) == hidden) for x in ("mean", "std"))
            for s in stats.values()
        )
        if not ok:
            out.append(("channel_stats", "malformed, or its vectors are not hidden_size long"))
    arrays = meta.get("arrays")
    if arrays is not None and not (isinstance(arrays, dict) and isinstance(arrays.get("names"), list)):
        out.append(("arrays", "malformed: no list of array names"))
    records = meta.get("record_checksums")
    if records is not None and not (
        isinstance(records, dict) and all(isinstance(v, list) and all(_int(c) for c in v) for v in records.values())
    ):
        out.append(("record_checksums", "malformed: not a map of record paths to crc32c lists"))
    summary = meta.get("marker_summary")
    if summary is not None and not (isinstance(summary, dict) and isinstance(summary.get("path"), str)):
        out.append(("marker_summary", "malformed"))
    return out


def array_checksum(meta: Mapping[str, Any], bucket: str, name: str) -> int | None:
    """The recorded checksum of `buckets/<bucket>/<name>/zarr.json`; None when the cache records none (before 0.6).
    A cache that records them but not this array's gets -1, which no checksum equals: the array is refused."""
    sums = meta.get("array_checksums")
    if not isinstance(sums, dict):
        return None
    value = sums.get(f"buckets/{bucket}/{name}")
    return int(value) if isinstance(value, int) else -1
