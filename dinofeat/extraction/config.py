"""Frozen configuration. Everything that changes the stored numbers is serialised into the cache's metadata and
compared on every rerun (the fingerprint); runtime knobs (workers, batch size, device) are not."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from dinofeat.buckets import BucketSpecError, TiedSpec, load_spec, min_tied_multiple, parse_scale
from dinofeat.errors import ConfigError
from dinofeat.images.recipe import Recipe

DType = Literal["fp16", "bf16", "fp32"]
DTYPES: tuple[str, ...] = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one precompute run.

    `multiple=None` means the model's patch size. `dtype="auto"` means fp16 on CUDA, bf16 on a CPU with native
    bf16, else fp32. `store_dtype` is what lands on disk. `token_budget=None` picks a device-sized default.
    """

    model: str = "random:vits16"
    revision: str | None = None
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    store_dtype: DType = "fp16"
    area: int = 1024
    multiple: int | None = None
    min_ar: float = 0.25
    max_ar: float = 4.0
    num_buckets: int = 33
    bucket_mode: Literal["list", "fit"] = "list"
    # tied to a DiT: area/multiple/aspects above describe the DiT's buckets, DINO's are those x dit_scale (exact)
    dit_scale: str | None = None
    dit_token: int = 16  # DiT pixels per token: VAE factor x DiT patch
    bucket_version: int | None = None  # the bucket table's rounding rule (None: this release's; a cache keeps its own)
    keep_registers: bool = False
    layers: tuple[int, ...] = (-1,)  # blocks to store; -1 = last. The deepest is the primary (`cls`, `patches`)
    layer_norm: bool = True  # the final LayerNorm on every stored layer (it is always on the last one in HF)
    flip: bool = False  # also store the features of each horizontally mirrored image (`*_flip` arrays)
    recipe: Recipe = field(default_factory=Recipe)
    limit: int | None = None
    # runtime knobs, not fingerprinted
    device: str | None = None
    batch_size: int | None = None
    token_budget: int | None = None
    num_workers: int | None = None
    shard_mb: float = 128.0
    probe_threads: int = 16
    rank: int = 0
    world_size: int = 1
    decode_timeout_s: float = 1800.0  # a decode worker silent this long (one batch) stops the run, resumably
    compile: bool | None = None  # torch.compile per bucket shape; None: when the run pays for it (loop.should_compile)
    wait_s: float = 24 * 3600.0  # how long ranks of a manual split wait for rank 0's plan
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            try:
                object.__setattr__(self, "layers", tuple(int(p) for p in self.layers.split(",") if p.strip()))
            except ValueError:
                raise ConfigError(
                    f"layers must be comma-separated block numbers like 8,16,-1; got {self.layers!r}"
                ) from None
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be auto, fp16, bf16 or fp32; got {self.dtype!r}")
        if self.store_dtype not in DTYPES:
            raise ConfigError(f"store dtype must be fp16, bf16 or fp32; got {self.store_dtype!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ConfigError(f"token budget must be >= 1, got {self.token_budget}")
        if not math.isfinite(self.shard_mb) or self.shard_mb <= 0:
            raise ConfigError(f"shard size must be > 0 MiB, got {self.shard_mb}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if not (0 <= self.rank < self.world_size):
            raise ConfigError(f"need 0 <= rank < world_size, got rank {self.rank} of {self.world_size}")
        for name, value, low in (
            ("area", self.area, 1),
            ("decode workers", self.num_workers, 0),
            ("probe threads", self.probe_threads, 1),
            ("number of buckets", self.num_buckets, 1),
            ("DiT token size (--dit-token)", self.dit_token, 1),
            ("multiple", self.multiple, 1),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if self.num_workers is not None and self.num_workers > max(8, 4 * cores):
            raise ConfigError(
                f"{self.num_workers} decode workers is more than 4 per core (this machine has {cores}): at most "
                f"{max(8, 4 * cores)}"
            )
        if self.decode_timeout_s <= 0 or self.wait_s < 0:
            raise ConfigError("decode timeout must be > 0 s and the rank wait >= 0 s")

    def with_bucket_spec(self, path: str | Path) -> ExtractConfig:
        """These settings with the buckets of a spec file (`dinofeat buckets --out`, plain or tied to a DiT), so
        the DiT side and the cache share one source of truth."""
        try:
            spec = load_spec(Path(path))
        except BucketSpecError as e:
            raise ConfigError(str(e) if str(path) in str(e) else f"bad bucket spec in {path}: {e}") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read a bucket spec from {path}: {e}") from e
        tied = isinstance(spec, TiedSpec)
        side = spec.dit if isinstance(spec, TiedSpec) else spec
        return replace(
            self,
            area=side.area,
            multiple=side.multiple,
            min_ar=side.min_ar,
            max_ar=side.max_ar,
            num_buckets=side.num_buckets,
            bucket_mode=side.mode,
            dit_scale=spec.scale if tied else None,
            dit_token=spec.dit_token if tied else self.dit_token,
            bucket_version=side.version,
        )


# the settings that change the stored numbers: a rerun that does not give one takes the cache's (issue 23)
FINGERPRINTED = (
    "model", "revision", "dtype", "store_dtype", "area", "multiple", "min_ar", "max_ar", "num_buckets",
    "bucket_mode", "dit_scale", "dit_token", "bucket_version", "keep_registers", "layers", "layer_norm", "flip",
    "recipe", "limit",
)  # fmt: skip


def recorded_options(meta: dict[str, Any]) -> dict[str, Any]:
    """The ExtractConfig settings a cache was made with, read back from its fingerprint: what a rerun that leaves an
    option out resumes with. Only settings the fingerprint records are returned."""
    fp = meta.get("fingerprint") or {}
    out: dict[str, Any] = {}
    if "model_id" in fp:
        out["model"] = fp["model_id"]
        out["revision"] = fp.get("model_revision")
    if fp.get("compute_dtype"):
        out["dtype"] = fp["compute_dtype"]
    if fp.get("store_dtype"):
        out["store_dtype"] = fp["store_dtype"]
    spec = fp.get("bucket_spec")
    if isinstance(spec, dict):
        tied = spec.get("tied")
        side = spec["dit"] if tied else spec
        out |= {k: side[k] for k in ("area", "multiple", "min_ar", "max_ar", "num_buckets") if k in side}
        if "multiple" in out and out["multiple"] == _default_multiple(meta, tied):
            out["multiple"] = None  # the default (the model's patch, or the smallest tied one): a new model's own
        out["bucket_mode"] = side.get("mode", "list")
        out["bucket_version"] = int(side.get("version", 1))
        out["dit_scale"] = str(tied["scale"]) if tied else None
        if tied:
            out["dit_token"] = int(tied["dit_token"])
    if isinstance(fp.get("recipe"), dict):
        out["recipe"] = Recipe.from_dict(fp["recipe"])
    for k in ("keep_registers", "limit"):
        if k in fp:
            out[k] = fp[k]
    features = fp.get("features") or {}
    if "model_id" in fp:  # absent features = the default feature set
        out["layers"] = tuple(features.get("layers") or (-1,))
        out["layer_norm"] = bool(features.get("layer_norm", True))
        out["flip"] = bool(features.get("flip", False))
    return out


def _default_multiple(meta: dict[str, Any], tied: dict[str, Any] | None) -> int | None:
    """The multiple a cache got when none was given: its model's patch, or (tied) the smallest that aligns."""
    patch = meta.get("patch_size")
    if not isinstance(patch, int):
        return None
    if not tied:
        return patch
    try:
        return min_tied_multiple(patch, parse_scale(str(tied["scale"])), int(tied["dit_token"]))
    except (BucketSpecError, KeyError, ValueError):
        return None


def inherit(config: ExtractConfig, meta: dict[str, Any], names: Any) -> tuple[ExtractConfig, dict[str, Any]]:
    """`config` with the settings in `names` (those the user did not give) taken from a cache's record. Returns the
    new config and what was taken (only settings that differ from what `config` had)."""
    recorded = recorded_options(meta)
    taken = {k: recorded[k] for k in names if k in recorded and recorded[k] != getattr(config, k)}
    return (replace(config, **taken) if taken else config), taken


# the bucket table's settings, which a `--bucket-spec` file gives all at once
BUCKET_SETTINGS = ("area", "multiple", "min_ar", "max_ar", "num_buckets", "bucket_mode", "dit_scale", "dit_token")


def config_from_options(options: dict[str, Any], given: set[str], progress: bool = True) -> ExtractConfig:
    """The settings of `dinofeat precompute`'s options (named as the command names them). `given`: the options the
    command line gave, so a bucket option given beside --bucket-spec is refused instead of ignored."""
    o = dict(options)
    spec_file = o.pop("bucket_spec", None)
    clash = sorted({"area", "multiple", "min_ar", "max_ar", "num_buckets", "fit", "dit_scale", "dit_token"} & given)
    if spec_file is not None and clash:
        shown = ", ".join("--" + c.replace("_", "-") for c in clash)
        raise ConfigError(f"--bucket-spec sets every bucket option; {shown} cannot be given with it")
    cfg = ExtractConfig(
        model=o["model"],
        revision=o["revision"],
        dtype=o["dtype"],
        store_dtype=o["store_dtype"],
        area=o["area"],
        multiple=o["multiple"],
        min_ar=o["min_ar"],
        max_ar=o["max_ar"],
        num_buckets=o["num_buckets"],
        bucket_mode="fit" if o["fit"] else "list",
        keep_registers=o["keep_registers"],
        dit_scale=o["dit_scale"],
        dit_token=o["dit_token"],
        layers=o["layers"],
        layer_norm=o["layer_norm"],
        flip=o["flip"],
        recipe=Recipe.from_options(o["jpeg_draft"], o["draft_gap"], o.get("decode", "cpu")),
        batch_size=o["batch_size"],
        token_budget=o["token_budget"],
        compile=o["compile_model"],
        num_workers=o["workers"],
        device=o["device"],
        shard_mb=o["shard_mb"],
        limit=o["limit"],
        rank=o["rank"],
        world_size=o["world_size"],
        progress=progress,
    )
    return cfg.with_bucket_spec(spec_file) if spec_file is not None else cfg
