"""Whether caches can be one training set: their features must be interchangeable (the same model, preprocessing and
feature layout) and their samples must collate together (the same tie to a DiT grid). Pure, over their metadata.

What may differ: the source, the bucket spec (area, multiple, aspect range: batches are grouped by exact size, so
a batch never mixes grid sizes), the compute dtype, the format version, the channel statistics and the image count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dinofeat.buckets import TiedSpec, load_spec
from dinofeat.cache.arrays import ArraySet
from dinofeat.errors import CacheMismatchError, ConfigError


def _recipe(field: str) -> Callable[[dict[str, Any]], Any]:
    return lambda m: m.get("recipe", {}).get(field, "cpu" if field == "decode" else None)


def _tie(meta: dict[str, Any]) -> int | None:
    """k (DiT tokens per DINO patch side) of a tied cache, None for an untied one."""
    spec = load_spec(meta["bucket_spec"])
    return spec.grid_factor(int(meta["patch_size"])) if isinstance(spec, TiedSpec) else None


def _arrays(field: str) -> Callable[[dict[str, Any]], Any]:
    return lambda m: getattr(ArraySet.from_meta(m), field)


# field name (as the refusal prints it) -> how to read it from a cache's metadata
FIELDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "model.id": lambda m: m["model"]["id"],
    "model.revision": lambda m: m["model"].get("revision"),
    "model.config_hash": lambda m: m["model"].get("config_hash"),
    "patch_size": lambda m: int(m["patch_size"]),
    "hidden_size": lambda m: int(m["hidden_size"]),
    "dtypes.store": lambda m: m["dtypes"]["store"],
    **{f"arrays.{f}": _arrays(f) for f in ("layers", "flip", "registers", "layer_norm")},
    "registers_stored": lambda m: int(m.get("registers_stored") or 0),
    **{f"recipe.{f}": _recipe(f) for f in ("resample", "rescale", "mean", "std", "background", "jpeg_draft", "decode")},
    "grid_factor (bucket spec's DiT tie)": _tie,
}


def check_compatible(metas: Sequence[dict[str, Any]], names: Sequence[str], allow: Sequence[str] = ()) -> None:
    """Raise CacheMismatchError naming the first field in which a cache differs from the first one, with both
    values, before any sample is read. `allow`: fields the caller vouches for (the same weights saved at two local
    paths differ in `model.id`)."""
    unknown = sorted(set(allow) - set(FIELDS))
    if unknown:
        raise ConfigError(f"allow names no field that is compared: {unknown}; the fields are {list(FIELDS)}")
    for field, read in FIELDS.items():
        if field in allow:
            continue
        want = read(metas[0])
        for meta, name in zip(metas[1:], names[1:], strict=True):
            got = read(meta)
            if got != want:
                raise CacheMismatchError(
                    f"caches cannot be mixed: {field} differs ({names[0]}: {want!r}, {name}: {got!r}); "
                    "mix only caches of the same model, preprocessing and feature layout"
                )
