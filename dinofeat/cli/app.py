"""The commands: each parses its options, calls one library function, prints (dinofeat.cli.render) and sets the
exit code. Options are declared once in dinofeat.cli.options. Errors of ours end in one line and exit 1."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dinofeat import __version__
from dinofeat.cli import options as o
from dinofeat.cli import render

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Precompute DINO CLS + patch-grid features into a sharded zarr cache, check it, and inspect it.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dinofeat {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Precompute DINO features once, train your DiT on them for weeks."""


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _echo_json(doc: dict[str, Any]) -> None:
    """Every command's --json: its document with the dinofeat that wrote it under one key, "dinofeat" (info's
    "dinofeat_version" is the release that made the cache)."""
    typer.echo(json.dumps({"dinofeat": __version__, **doc}, indent=2, default=str))


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A library call whose errors of ours (DinofeatError) end in one line and exit 1."""
    from dinofeat.errors import DinofeatError

    try:
        return fn(*args, **kwargs)
    except DinofeatError as e:
        _fail(e)


@app.command()
def buckets(
    area: o.Area = 1024,
    multiple: Annotated[
        int | None, typer.Option(help="Every side is a multiple of this (default 16; tied: the smallest that aligns).")
    ] = None,
    patch: Annotated[int | None, typer.Option(help="DINO patch size (default: the multiple; tied: 16).")] = None,
    min_ar: o.MinAR = 0.25,
    max_ar: o.MaxAR = 4.0,
    num_buckets: o.NumBuckets = 33,
    dit_scale: o.DitScale = None,
    dit_token: o.DitToken = 16,
    out: Annotated[
        Path | None, typer.Option(help="Also write the table and spec as JSON (what the DiT loads).")
    ] = None,
    as_json: o.AsJson = False,
) -> None:
    """Print the bucket table: W x H, patch grid h x w, tokens, aspect ratio; tied, both sides and k."""
    from dinofeat.buckets import BucketSpecError, TiedSpec, table_for

    # untied, the grid column's patch defaults to the multiple (a table for any model); tied, to DINOv3's 16
    patch = patch or (multiple or 16 if dit_scale is None else 16)
    try:
        spec, doc = table_for(area, multiple, min_ar, max_ar, num_buckets, patch, dit_scale, dit_token, out)
    except (BucketSpecError, OSError) as e:
        _fail(e)
    if as_json:
        _echo_json(doc)
    elif isinstance(spec, TiedSpec):
        render.tied_table(spec, doc)
    else:
        render.bucket_table(spec, doc)
    if out is not None:
        typer.echo(
            f"wrote {out}: {len(doc['buckets'])} buckets, spec hash {spec.hash} "
            f"(dinofeat.buckets.load_spec({str(out)!r}) rebuilds the spec)",
            err=as_json,
        )


# precompute options -> the ExtractConfig settings they give (a rerun that leaves them out takes the cache's)
_SETS = {"fit": ("bucket_mode",), "jpeg_draft": ("recipe",), "draft_gap": ("recipe",), "decode": ("recipe",)}
_BUCKET_FIELDS = (
    "area", "multiple", "min_ar", "max_ar", "num_buckets", "bucket_mode", "dit_scale", "dit_token", "bucket_version"
)  # fmt: skip


def _given_options(ctx: typer.Context) -> set[str]:
    """The options this command line or its --config file gives (not left at their defaults)."""
    return {  # by name: typer may bring its own copy of click's ParameterSource
        name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    }


def _config_file(ctx: typer.Context, path: Path | None) -> Path | None:
    """--config: the file's options become this command's defaults (click's default_map), so an option given on the
    command line wins and one left out takes the file's value."""
    if path is not None:
        from dinofeat.runfile import read_options

        values = _call(read_options, path, o.file_options(ctx.command, precompute, skip={"config", "help"}))
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


def _given(options: set[str]) -> set[str]:
    """The ExtractConfig settings the given options set."""
    out: set[str] = set()
    for name in options:
        out |= set(_BUCKET_FIELDS if name == "bucket_spec" else _SETS.get(name, (name,)))
    return out


@app.command()
def precompute(
    ctx: typer.Context,
    source: o.Source,
    cache: o.CacheToMake,
    config: Annotated[
        Path | None, typer.Option(help=o.CONFIG_HELP, is_eager=True, callback=_config_file, dir_okay=False)
    ] = None,
    model: o.Model = "facebook/dinov3-vitl16-pretrain-lvd1689m",
    revision: o.Revision = None,
    area: o.Area = 1024,
    multiple: o.Multiple = None,
    min_ar: o.MinAR = 0.25,
    max_ar: o.MaxAR = 4.0,
    num_buckets: o.NumBuckets = 33,
    fit: o.Fit = False,
    dit_scale: o.DitScale = None,
    dit_token: o.DitToken = 16,
    bucket_spec: o.BucketSpecFile = None,
    layers: o.Layers = "-1",
    layer_norm: o.LayerNorm = True,
    flip: o.Flip = False,
    dtype: o.Dtype = "auto",
    store_dtype: o.StoreDtype = "fp16",
    keep_registers: o.KeepRegisters = False,
    jpeg_draft: o.JpegDraft = False,
    draft_gap: o.DraftGap = None,
    decode: o.Decode = "cpu",
    compile_model: o.Compile = None,
    batch_size: o.BatchSize = None,
    token_budget: o.TokenBudget = None,
    workers: o.Workers = None,
    device: o.Device = None,
    shard_mb: o.ShardMB = 128.0,
    limit: o.Limit = None,
    num_processes: o.NumProcesses = 1,
    rank: o.Rank = 0,
    world_size: o.WorldSize = 1,
    dry_run: o.DryRun = False,
    overwrite: o.Overwrite = False,
    repair: o.Repair = False,
    prune: o.Prune = False,
    as_json: o.AsJson = False,
    quiet: o.Quiet = False,
) -> None:
    """Extract CLS + patch-grid features for every image into a sharded zarr cache (rerun to resume)."""
    from dinofeat.extraction.config import FINGERPRINTED, config_from_options
    from dinofeat.extraction.launch import extract_processes

    options = _given_options(ctx)
    given = _given(options)
    runtime = (
        "source", "cache", "config", "num_processes", "dry_run", "overwrite", "repair", "prune", "as_json", "quiet"
    )  # fmt: skip
    settings = {k: v for k, v in ctx.params.items() if k not in runtime}
    cfg = _call(config_from_options, settings, options, progress=not (as_json or quiet))
    actions = {"overwrite": overwrite, "dry_run": dry_run, "repair": repair, "prune": prune}
    try:
        with _terminate_as_interrupt():
            s = _call(
                extract_processes, source, cache, cfg, num_processes, inherit=set(FINGERPRINTED) - given, **actions
            )
    except KeyboardInterrupt:
        _interrupted(cache)
    if s.rank != 0 and not s.manual_split:  # under a launcher rank 0 speaks for the run (its summary has every rank)
        return
    if as_json:
        _echo_json(s.to_dict())
        return
    shown = render.as_options(s.inherited)
    if shown:
        typer.echo(f"settings from the cache (not given on this command line): {shown}")
    render.dry_run(s) if dry_run else render.summary(s, repair)


class _terminate_as_interrupt:
    """SIGTERM (a scheduler's stop, `kill`) ends the run as Ctrl-C does: finished shards kept, the lock released,
    how far it got printed."""

    def __enter__(self) -> None:
        self.previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _interrupted(cache: str) -> None:
    """Ctrl-C: say how far the cache got and how to go on, exit 130 (finished shards are marked and kept)."""
    from dinofeat.inspection.info import progress

    try:
        done, total = progress(cache)
        where = f"{done} of {total} images done"
    except Exception:  # nothing planned yet, or the cache cannot be read while interrupted: no count to give
        where = "nothing finished yet"
    render.interrupted(where)
    raise typer.Exit(130)


@app.command()
def validate(
    cache: o.Cache,
    images: Annotated[
        str | None, typer.Option(help="The source to compare against (missing/extra/stale): folder, shards, parquet.")
    ] = None,
    recompute: Annotated[int, typer.Option(help="Re-extract K random images and compare (cosine per patch).")] = 0,
    sample: Annotated[float, typer.Option(help="Fraction of shards whose values are checked.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for --sample and --recompute.")] = 0,
    failures: Annotated[
        bool, typer.Option(help="Also name each failed image and its reason (warnings: failed images are data).")
    ] = False,
    as_json: o.AsJson = False,
    quiet: o.Quiet = False,
) -> None:
    """Check a cache is complete and correct; exit 0 only when every check passes."""
    from dinofeat.inspection.validate import validate as run_validate

    report = _call(
        run_validate, cache, images, recompute, sample, seed, progress=not (as_json or quiet), failures=failures
    )
    if as_json:
        _echo_json(report.to_dict())
    else:
        render.report(report, cache)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def info(
    cache: o.Cache,
    failures: Annotated[
        bool,
        typer.Option(
            help="List each failed image instead: one 'KEY<tab>REASON' line each, sorted by key (with --json: the "
            "whole summary, the list under 'failures')."
        ),
    ] = False,
    as_json: o.AsJson = False,
) -> None:
    """Model, dtypes, per-bucket counts, failures by reason, size on disk, per-channel feature statistics."""
    from dinofeat.inspection.info import failed_images
    from dinofeat.inspection.info import info as run_info

    if failures and not as_json:
        render.failed_images(_call(failed_images, cache))
        return
    d = _call(run_info, cache, failures=failures)
    _echo_json(d) if as_json else render.info(d)


@app.command()
def show(
    cache: o.Cache,
    keys: Annotated[list[str], typer.Argument(help="Image keys (paths relative to the source folder).")],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("dinofeat-show"),
    grid: Annotated[bool, typer.Option(help="One tiled PNG with a PCA shared by all images.")] = False,
    images: Annotated[str | None, typer.Option(help="Source folder (default: the one recorded).")] = None,
) -> None:
    """Write the resized input beside a PCA (3 components -> RGB) of its patch grid."""
    from dinofeat.inspection.show import show as run_show

    for p in _call(run_show, cache, keys, out, grid, images):
        typer.echo(str(p))


@app.command()
def bench(
    model: Annotated[str | None, typer.Option(help=o.MODEL_HELP + " (GPU: random:vitl16, CPU: random:vits16).")] = None,
    area: Annotated[int | None, typer.Option(help="Target area side (GPU: 1024, CPU: 512).")] = None,
    device: o.Device = None,
    dtype: o.Dtype = "auto",
    images: Annotated[Path | None, typer.Option(help="Your own image folder (default: synthetic photos).")] = None,
    count: Annotated[int | None, typer.Option(help="Images to time (default 256 on GPU, 16 on CPU).")] = None,
    megapixels: Annotated[float, typer.Option(help="Size of the synthetic photos.")] = 2.0,
    workers: o.Workers = None,
    decode: o.Decode = "cpu",
    eta_images: Annotated[int, typer.Option(help="Print the time this many images would take.")] = 1_000_000,
    as_json: o.AsJson = False,
    quiet: o.Quiet = False,
) -> None:
    """Measure model-only and end-to-end images/s on this machine, next to the device's peak, with an ETA."""
    from dinofeat.inspection.bench import bench as run_bench

    if eta_images < 1:
        _fail(ValueError(f"--eta-images is a number of images >= 1, got {eta_images}"))
    progress = not (as_json or quiet)
    say = (lambda line: typer.echo(line, err=True)) if progress else None
    r = _call(
        run_bench, model, area, device, dtype, images, count, megapixels, workers, progress=progress, say=say,
        decode=decode,
    )  # fmt: skip
    if as_json:
        _echo_json({**r.to_dict(), "eta_images": eta_images, "eta_s": r.eta_s(eta_images)})
    else:
        render.bench(r, eta_images)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # finished shards are safe; rerun to resume
        typer.secho("\ninterrupted: finished shards are kept; rerun the same command to resume", err=True)
        sys.exit(130)
