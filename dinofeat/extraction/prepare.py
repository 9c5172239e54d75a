"""Everything checked before any image is touched: the model's config, the bucket spec (tied or not), the
device and dtype, the feature arrays, the settings' fingerprint; and the plan of a source's images (header probes
-> buckets -> rows -> shards) in the terms the cache layer stores (a `Request`)."""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinofeat import __version__
from dinofeat.buckets import AnySpec, BucketSpecError, TiedSpec, make_buckets, spec_for
from dinofeat.cache.arrays import ArraySet, parse_layers
from dinofeat.cache.layout import Plan, bucket_record
from dinofeat.cache.lifecycle import Request
from dinofeat.cache.objects import open_files
from dinofeat.cache.store import Store
from dinofeat.errors import ConfigError
from dinofeat.extraction import ranks
from dinofeat.extraction.config import ExtractConfig, recorded_options
from dinofeat.extraction.config import inherit as inherit_settings
from dinofeat.extraction.devicedecode import check_device_decode
from dinofeat.extraction.model import ModelInfo, load_model_info, resolve_device, resolve_dtype
from dinofeat.extraction.plan import make_plan
from dinofeat.images.probe import probe_many
from dinofeat.progress import bar as progress_bar
from dinofeat.sources.discover import Source, is_stale, size_and_mtime


@dataclass(frozen=True)
class Prepared:
    """Everything checked before any image is touched."""

    config: ExtractConfig
    model: ModelInfo
    spec: AnySpec
    device: torch.device
    dtype: str
    arrays: ArraySet

    @property
    def registers_stored(self) -> int:
        return self.model.num_register_tokens if self.config.keep_registers else 0

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the stored numbers. A rerun with any of these different is refused."""
        return {
            "model_id": self.model.id,
            "model_revision": self.model.revision,
            "model_config_hash": self.model.config_hash,
            "compute_dtype": self.dtype,
            "store_dtype": self.config.store_dtype,
            "bucket_spec": self.spec.to_dict(),
            "bucket_spec_hash": self.spec.hash,
            "recipe": self.config.recipe.to_dict(),
            "keep_registers": self.config.keep_registers,
            "limit": self.config.limit,
        } | ({} if self.arrays.is_default(self.model.num_layers) else {"features": self._features()})

    def _features(self) -> dict[str, Any]:
        a = self.arrays
        return {"layers": list(a.layers), "layer_norm": a.layer_norm, "flip": a.flip}


def prepare(config: ExtractConfig, group: ranks.Group | None = None) -> Prepared:
    """Validate settings against the model's config; raises ConfigError before any work starts."""
    info = load_model_info(config.model, config.revision)
    spec = bucket_spec(config, info.patch_size)
    check_bucket_pixels(spec, config.recipe.max_pixels)
    device = resolve_device(ranks.device_for(group or ranks.Group(), config.device))
    check_device_decode(config.recipe, device)
    layers = parse_layers(config.layers, info.num_layers)
    arrays = ArraySet(layers, config.flip, config.keep_registers and info.num_register_tokens > 0, config.layer_norm)
    return Prepared(config, info, spec, device, resolve_dtype(config.dtype, device), arrays)


def meaningless_options(config: ExtractConfig, model: ModelInfo) -> dict[str, str]:
    """Settings the chosen model gives no meaning to, each with the reason. Recorded in the fingerprint they would
    change nothing stored, yet refuse every later run that leaves them out or gives another value."""
    out = {}
    if config.revision is not None and model.random:
        out["revision"] = f"--revision names a version of a hub model; {config.model!r} is built here and has none"
    elif config.revision is not None and os.path.isdir(config.model):
        out["revision"] = (
            f"--revision names a version of a hub model; the local model directory {config.model!r} has none (its "
            "files are the version)"
        )
    if config.keep_registers and model.num_register_tokens == 0:
        out["keep_registers"] = f"--keep-registers: the model {config.model!r} has no register tokens to keep"
    return out


def refuse_meaningless(cache: Path | str, config: ExtractConfig, model: ModelInfo, overwrite: bool = False) -> None:
    """ConfigError for a setting the model gives no meaning to, before anything is created. A value the existing
    cache records is its own (an older dinofeat accepted it): a rerun keeps it, or its fingerprint would differ."""
    wrong = meaningless_options(config, model)
    if not wrong:
        return
    exists = not overwrite and open_files(cache).exists("zarr.json")
    recorded = recorded_options(Store(cache).meta) if exists else {}
    for name, why in wrong.items():
        if name not in recorded or recorded[name] != getattr(config, name):
            raise ConfigError(f"{why}: leave it out")


def bucket_spec(config: ExtractConfig, patch: int) -> AnySpec:
    """The DINO-side bucket spec; tied to the DiT's own buckets when `dit_scale` is set. ConfigError if the sides
    cannot be multiples of the patch (or, tied, the grids cannot align)."""
    try:
        return spec_for(
            config.area,
            config.multiple,
            config.min_ar,
            config.max_ar,
            config.num_buckets,
            config.bucket_mode,
            patch,
            config.dit_scale,
            config.dit_token,
            config.bucket_version,
        )
    except BucketSpecError as e:
        raise ConfigError(str(e)) from e


def check_bucket_pixels(spec: AnySpec, max_pixels: int) -> None:
    """ConfigError when the largest bucket is beyond what can be decoded and held (the recipe's pixel limit, PIL's
    decompression-bomb threshold by default): an --area typo must not create a cache and then fail for lack of
    memory."""
    side = spec.dit.area if isinstance(spec, TiedSpec) else spec.area
    if spec.mode == "fit":  # every image gets its own size of about area^2 pixels (on the DINO side)
        w, h = spec.dino_size(side, side) if isinstance(spec, TiedSpec) else (side, side)
        biggest = w * h
    else:
        biggest = max(b.width * b.height for b in make_buckets(spec))
    if biggest > max_pixels:
        raise ConfigError(
            f"area {side} gives buckets of {biggest:,} pixels, more than the {max_pixels:,} an image may have "
            f"(largest area about {int(max_pixels**0.5):,}); check --area"
        )


def build_plan(src: Source, prep: Prepared, progress: bool, part: int = 0) -> Plan:
    """Probe every image of `src` and plan them (what the planning rank does): columns throughout, the keys
    packed, no object per image kept."""
    with progress_bar(total=len(src.keys), desc="probe", unit="img", enabled=progress) as bar:
        probes = probe_many(src.locations(), prep.config.recipe.max_pixels, prep.config.probe_threads, bar.update)
    shard_bytes = int(prep.config.shard_mb * 2**20)
    return make_plan(
        src.keys,
        probes,
        prep.spec,
        prep.model.patch_size,
        prep.model.hidden_size,
        prep.config.store_dtype,
        shard_bytes,
        prep.registers_stored,
        part,
        prep.arrays.copies,
        src.members,
    )


def cache_metadata(prep: Prepared, plan: Plan, src: Source) -> dict[str, Any]:
    return {
        "dinofeat_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": prep.model.to_dict(),
        "random_weights": prep.model.random,
        "fingerprint": prep.fingerprint(),
        "dtypes": {"compute": prep.dtype, "store": prep.config.store_dtype},
        "patch_size": prep.model.patch_size,
        "num_register_tokens": prep.model.num_register_tokens,
        "registers_stored": prep.registers_stored,
        "arrays": prep.arrays.to_dict(),
        "hidden_size": prep.model.hidden_size,
        "bucket_spec": prep.spec.to_dict(),
        "bucket_spec_hash": prep.spec.hash,
        "recipe": prep.config.recipe.to_dict(),
        "source_root": str(src.root),
        "num_images": len(plan),
        "buckets": [bucket_record(b) for b in plan.buckets],
    }


def request_for(src: Source, prep: Prepared, progress: bool) -> Request:
    """What the cache layer needs of this run: the fingerprint, the source's keys, how to plan some of them (probing
    their headers), the metadata of a new cache, the stored features' shape."""

    def plan(keys: tuple[str, ...], part: int) -> Plan:
        return build_plan(src.subset(keys), prep, progress, part)

    return Request(
        fingerprint=prep.fingerprint(),
        keys=src.keys,
        renamed=dict(src.renamed),
        plan=plan,
        describe=lambda p: cache_metadata(prep, p, src),
        hidden=prep.model.hidden_size,
        registers=prep.registers_stored,
        store_dtype=prep.config.store_dtype,
        limit=prep.config.limit,
        source_root=str(src.root),
        changed=lambda key, size, mtime: _changed(src, key, size, mtime),
    )


def _changed(src: Source, key: str, size: int, mtime: int) -> bool:
    """Whether the image at `key` is no longer the bytes of that size and mtime (gone since the listing: no)."""
    try:
        return is_stale(size_and_mtime(src.path(key)), (size, mtime))
    except OSError:
        return False


def settings_for(
    cache: Path | str, config: ExtractConfig, names: Collection[str], overwrite: bool = False
) -> tuple[ExtractConfig, dict[str, Any]]:
    """`config` with the settings in `names` taken from an existing cache's record (none when starting over or
    when there is no cache yet), and what was taken."""
    if not names or overwrite:
        return config, {}
    if not open_files(cache).exists("zarr.json"):
        return config, {}  # no cache yet
    meta = Store(cache).meta  # a damaged record is refused here, by name, before a model is loaded for it
    return inherit_settings(config, meta, names)
