"""The command line's options, each declared once: those several commands share (the cache, the model, the device,
the bucket table's settings, --json) and each command's own."""

from __future__ import annotations

import typing
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any

import typer

from dinofeat.runfile import FileOption

CACHE_HELP = (
    "Cache directory, or s3://bucket/prefix (gs://, az://; credentials from the usual AWS_*/GOOGLE_*/AZURE_* "
    "environment)."
)
MODEL_HELP = "Hub id, local directory, or random:vits16|vitb16|vitl16|..."

Cache = Annotated[str, typer.Argument(help=CACHE_HELP)]
AsJson = Annotated[bool, typer.Option("--json/--no-json", help="Machine-readable output.")]
Device = Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: cuda if available).")]
Dtype = Annotated[str, typer.Option(help="Compute dtype: auto|fp16|bf16|fp32.")]
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet/--no-quiet", "-q", help="No progress bars (TQDM_DISABLE=1 does the same); results still print."
    ),
]
Workers = Annotated[int | None, typer.Option(help="Decode worker processes.")]

# the bucket table (buckets, precompute)
Area = Annotated[int, typer.Option("--area", help="Target area as the side of a square (1024 = 1024x1024 pixels).")]
MinAR = Annotated[float, typer.Option("--min-ar", help="Smallest aspect ratio (width/height).")]
MaxAR = Annotated[float, typer.Option("--max-ar", help="Largest aspect ratio (width/height).")]
NumBuckets = Annotated[int, typer.Option("--num-buckets", help="Sizes spaced evenly in log aspect ratio.")]
DitScale = Annotated[
    str | None,
    typer.Option(
        help="Tie DINO buckets to the DiT's: --area/--multiple describe the DiT buckets, DINO's are them x this "
        "exact fraction (1/2)."
    ),
]
DitToken = Annotated[int, typer.Option(help="With --dit-scale: DiT pixels per token (VAE factor x DiT patch).")]

# precompute
Source = Annotated[
    str,
    typer.Argument(
        help="Image folder (walked), a .txt list of paths, tar shards ('s/{000..099}.tar') or parquet files "
        "('d/*.parquet', add ?column=NAME to pick the image column); shards and parquet may be s3:// URLs."
    ),
]
CacheToMake = Annotated[str, typer.Argument(help=CACHE_HELP + " Created, or resumed.")]
Model = Annotated[str, typer.Option(help=MODEL_HELP)]
Revision = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")]
Multiple = Annotated[int | None, typer.Option(help="Side multiple (default: the model's patch size).")]
Fit = Annotated[bool, typer.Option("--fit/--no-fit", help="Per-image sizes (keep aspect, fit area) instead of a list.")]
BucketSpecFile = Annotated[
    Path | None, typer.Option(help="Buckets from a `dinofeat buckets --out` file (instead of the bucket options).")
]
Layers = Annotated[
    str, typer.Option(help="Blocks to store, e.g. 4,8,-1 (-1 = last). The deepest is stored as cls/patches.")
]
LayerNorm = Annotated[
    bool, typer.Option(help="Apply the model's final LayerNorm to every stored layer (as HF does to the last).")
]
Flip = Annotated[bool, typer.Option(help="Also store the features of each horizontally mirrored image.")]
StoreDtype = Annotated[str, typer.Option(help="Stored dtype: fp16|bf16|fp32.")]
KeepRegisters = Annotated[bool, typer.Option(help="Also store register tokens.")]
JpegDraft = Annotated[
    bool,
    typer.Option(
        "--jpeg-draft/--no-jpeg-draft",
        help="Speed option: decode large JPEGs at 1/2-1/8 scale in the DCT domain. Changes pixels near hard "
        "edges (bounds in docs/format.md). Default: exact full decoding.",
    ),
]
DraftGap = Annotated[
    int | None, typer.Option(help="With --jpeg-draft: the resize after the DCT reduction still shrinks by >= this (2).")
]
Decode = Annotated[
    str,
    typer.Option(
        help="Where JPEGs are decoded: cpu (exact, the default) or gpu (nvjpeg on the CUDA device, resized there; "
        "other files on the CPU). A speed option for small models; pixel bounds in docs/format.md."
    ),
]
Compile = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the encoder, one graph per bucket shape (~20 s each on an H200 for ViT-L). Default: on "
        "for CUDA runs of at least 20,000 images per bucket shape, where it pays for itself; off otherwise.",
    ),
]
BatchSize = Annotated[int | None, typer.Option(help="Images per forward (default: from token budget).")]
TokenBudget = Annotated[int | None, typer.Option(help="Tokens per forward pass.")]
ShardMB = Annotated[float, typer.Option(help="Target shard size in MiB.")]
Limit = Annotated[int | None, typer.Option(help="Only the first N images (discovery order).")]
NumProcesses = Annotated[int, typer.Option(help="Local processes in one process group (one per GPU; gloo on CPU).")]
Rank = Annotated[int, typer.Option(help="This process's rank for a manual split (SLURM).")]
WorldSize = Annotated[int, typer.Option(help="Number of processes in a manual split.")]
CONFIG_HELP = (
    'A TOML file of these options (keys as the options are named: area = 512, shard-mb = 256, source = "imgs"); '
    "options given here override it. Example: docs/examples/precompute.toml."
)
DryRun = Annotated[bool, typer.Option(help="Plan only: bucket histogram and projected size; writes nothing.")]
Overwrite = Annotated[bool, typer.Option(help="Delete an existing cache and start over.")]
Repair = Annotated[
    bool, typer.Option(help="Check every shard as validate does; re-extract only the damaged or missing ones.")
]
Prune = Annotated[
    bool, typer.Option(help="Drop the cached images that are gone from the source (no longer served or counted).")
]


def file_options(command: Any, fn: Callable[..., Any], skip: Collection[str] = ()) -> dict[str, FileOption]:
    """The keys a --config file may set for `command` (made from `fn`): each option by its long name without the
    dashes (`shard-mb`), each argument by its name (`source`), with the type `fn` declares for it."""
    hints = typing.get_type_hints(fn)
    out = {}
    for p in command.params:
        if p.name is None or p.name in skip:
            continue
        longs = [s[2:] for s in p.opts if s.startswith("--")]
        key = longs[0] if longs else p.name.replace("_", "-")
        kinds = [t for t in typing.get_args(hints[p.name]) or (hints[p.name],) if t is not type(None)]
        kind = kinds[0] if kinds and kinds[0] in (bool, int, float) else str
        out[key] = FileOption(key, p.name, kind)
    return out
