"""The `dinofeat` command: each command parses, calls one library function, prints, sets the exit code."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Precompute DINO CLS + patch-grid features into a sharded zarr cache, check it, and inspect it.",
)

Area = Annotated[int, typer.Option("--area", help="Target area as the side of a square (1024 = 1024x1024 pixels).")]
MinAR = Annotated[float, typer.Option("--min-ar", help="Smallest aspect ratio (width/height).")]
MaxAR = Annotated[float, typer.Option("--max-ar", help="Largest aspect ratio (width/height).")]
NumBuckets = Annotated[int, typer.Option("--num-buckets", help="Sizes spaced evenly in log aspect ratio.")]
Fit = Annotated[bool, typer.Option("--fit", help="Per-image sizes (keep aspect, fit area) instead of a list.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
CACHE_HELP = (
    "Cache directory, or s3://bucket/prefix (gs://, az://; credentials from the usual AWS_*/GOOGLE_*/AZURE_* "
    "environment)."
)
DitScale = Annotated[
    str | None,
    typer.Option(
        help="Tie DINO buckets to the DiT's: --area/--multiple describe the DiT buckets, DINO's are them x this "
        "exact fraction (1/2)."
    ),
]
DitToken = Annotated[int, typer.Option(help="With --dit-scale: DiT pixels per token (VAE factor x DiT patch).")]


def _version(value: bool) -> None:
    if value:
        from dinofeat import __version__

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


def _interrupted(cache: str) -> None:
    """Ctrl-C: say how far the cache got and how to go on, exit 130 (finished shards are marked and kept)."""
    from dinofeat.inspection.info import progress

    try:
        done, total = progress(cache)
        where = f"{done} of {total} images done"
    except Exception:  # nothing planned yet, or the cache cannot be read while interrupted: no count to give
        where = "nothing finished yet"
    typer.secho(f"interrupted: {where}; rerun the same command to resume", err=True)
    raise typer.Exit(130)


def _show(v: object) -> str:
    """A setting as a user would type it."""
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    if hasattr(v, "jpeg_draft"):
        return "exact JPEG decoding" if not v.jpeg_draft else f"--jpeg-draft --draft-gap {v.jpeg_draft}"
    return str(v)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


@app.command()
def buckets(
    area: Area = 1024,
    multiple: Annotated[
        int | None, typer.Option(help="Every side is a multiple of this (default 16; tied: the smallest that aligns).")
    ] = None,
    patch: Annotated[int | None, typer.Option(help="DINO patch size (default: the multiple; tied: 16).")] = None,
    min_ar: MinAR = 0.25,
    max_ar: MaxAR = 4.0,
    num_buckets: NumBuckets = 33,
    dit_scale: DitScale = None,
    dit_token: DitToken = 16,
    out: Annotated[
        Path | None, typer.Option(help="Also write the table and spec as JSON (what the DiT loads).")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Print the bucket table: W x H, patch grid h x w, tokens, aspect ratio; tied, both sides and k."""
    from dinofeat.buckets import BucketSpecError, TiedSpec, spec_for, table_document
    from dinofeat.errors import DinofeatError

    # untied, the grid column's patch defaults to the multiple (a table for any model); tied, to DINOv3's 16
    patch = patch or (multiple or 16 if dit_scale is None else 16)
    try:
        spec = spec_for(area, multiple, min_ar, max_ar, num_buckets, "list", patch, dit_scale, dit_token)
        doc = table_document(spec, patch)
    except (BucketSpecError, ValueError) as e:
        _fail(e)
    if out is not None:
        try:
            out.write_text(json.dumps(doc, indent=2) + "\n")
        except OSError as e:
            _fail(DinofeatError(f"cannot write {out}: {e.strerror or e}"))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    elif isinstance(spec, TiedSpec):
        _print_tied(spec, doc)
    else:
        _print_table(spec, doc)
    if out is not None:
        typer.echo(
            f"wrote {out}: {len(doc['buckets'])} buckets, spec hash {spec.hash} (buckets.load_spec({str(out)!r}) "
            "rebuilds the spec)",
            err=as_json,
        )


def _rounding_lines(notes: dict, multiple: int) -> list[str]:
    """Why the table holds fewer buckets than asked, and which were kept inside the aspect range."""
    out = []
    if notes.get("merged"):
        out.append(
            f"# {notes['aspects']} aspect ratios give {notes['buckets']} sizes: {notes['merged']} neighbouring ratios "
            f"round to a size already in the table (sides are multiples of {multiple})"
        )
    if notes.get("kept_in_range"):
        out.append("# rounded the other way to stay within --min-ar..--max-ar: " + ", ".join(notes["kept_in_range"]))
    return out


def _print_table(spec, doc: dict) -> None:
    rows = doc["buckets"]
    typer.echo(
        f"# {len(rows)} buckets, area {spec.area}^2, multiple {spec.multiple}, aspect {spec.min_ar:g}..{spec.max_ar:g}"
        f", spec hash {spec.hash}"
    )
    for line in _rounding_lines(doc["rounding"], spec.multiple):
        typer.echo(line)
    typer.echo(f"{'W x H':>11}  {'grid h x w':>10}  {'tokens':>6}  {'aspect':>6}  {'area/A':>6}")
    for r in rows:
        typer.echo(
            f"{r['width']:>5} x {r['height']:<4}  {r['grid_h']:>4} x {r['grid_w']:<4}  {r['tokens']:>6}  "
            f"{r['aspect']:>6.3f}  {r['area_ratio']:>6.3f}"
        )


def _print_tied(spec, doc: dict) -> None:
    d = spec.dit
    typer.echo(
        f"# {len(doc['buckets'])} buckets tied: DiT area {d.area}^2, multiple {d.multiple}, token {spec.dit_token} px; "
        f"DINO = DiT x {spec.scale}; k = {doc['grid_factor']} DiT tokens per DINO patch side; spec hash {spec.hash}"
    )
    for line in _rounding_lines(doc["rounding"], d.multiple):
        typer.echo(line)
    typer.echo(f"{'DiT W x H':>11}  {'tokens h x w':>12}   {'DINO W x H':>11}  {'patches h x w':>13}  {'aspect':>6}")
    for r in doc["buckets"]:
        t, p = r["dit"], r["dino"]
        typer.echo(
            f"{t['width']:>5} x {t['height']:<4}  {t['grid_h']:>5} x {t['grid_w']:<5}   {p['width']:>5} x "
            f"{p['height']:<4}  {p['grid_h']:>6} x {p['grid_w']:<5}  {r['aspect']:>6.3f}"
        )


# precompute options -> the ExtractConfig settings they give (a rerun that leaves them out takes the cache's)
_SETS = {"fit": ("bucket_mode",), "jpeg_draft": ("recipe",), "draft_gap": ("recipe",)}
_BUCKET_FIELDS = (
    "area", "multiple", "min_ar", "max_ar", "num_buckets", "bucket_mode", "dit_scale", "dit_token", "bucket_version"
)  # fmt: skip


def _given(ctx: typer.Context) -> set[str]:
    """The ExtractConfig settings this command line gives (not left at their defaults)."""
    out: set[str] = set()
    for name in ctx.params:  # by name: typer may bring its own copy of click's ParameterSource
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP"):
            out |= set(_BUCKET_FIELDS if name == "bucket_spec" else _SETS.get(name, (name,)))
    return out


@app.command()
def precompute(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            help="Image folder (walked), a .txt list of paths, tar shards ('s/{000..099}.tar') or parquet files "
            "('d/*.parquet', add ?column=NAME to pick the image column); shards and parquet may be s3:// URLs."
        ),
    ],
    cache: Annotated[str, typer.Argument(help=CACHE_HELP + " Created, or resumed.")],
    model: Annotated[str, typer.Option(help="Hub id, local directory, or random:vits16|vitb16|vitl16|...")] = (
        "facebook/dinov3-vitl16-pretrain-lvd1689m"
    ),
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    area: Area = 1024,
    multiple: Annotated[int | None, typer.Option(help="Side multiple (default: the model's patch size).")] = None,
    min_ar: MinAR = 0.25,
    max_ar: MaxAR = 4.0,
    num_buckets: NumBuckets = 33,
    fit: Fit = False,
    dit_scale: DitScale = None,
    dit_token: DitToken = 16,
    bucket_spec: Annotated[
        Path | None, typer.Option(help="Buckets from a `dinofeat buckets --out` file (overrides the bucket options).")
    ] = None,
    layers: Annotated[
        str, typer.Option(help="Blocks to store, e.g. 8,16,-1 (-1 = last). The deepest is stored as cls/patches.")
    ] = "-1",
    layer_norm: Annotated[
        bool, typer.Option(help="Apply the model's final LayerNorm to every stored layer (as HF does to the last).")
    ] = True,
    flip: Annotated[bool, typer.Option(help="Also store the features of each horizontally mirrored image.")] = False,
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto|fp16|bf16|fp32.")] = "auto",
    store_dtype: Annotated[str, typer.Option(help="Stored dtype: fp16|bf16|fp32.")] = "fp16",
    keep_registers: Annotated[bool, typer.Option(help="Also store register tokens.")] = False,
    jpeg_draft: Annotated[
        bool,
        typer.Option(
            "--jpeg-draft/--no-jpeg-draft",
            help="Speed option: decode large JPEGs at 1/2-1/8 scale in the DCT domain. Changes pixels near hard "
            "edges (bounds in docs/format.md). Default: exact full decoding.",
        ),
    ] = False,
    draft_gap: Annotated[
        int | None,
        typer.Option(help="With --jpeg-draft: the resize after the DCT reduction still shrinks by >= this (2)."),
    ] = None,
    compile_model: Annotated[
        bool,
        typer.Option("--compile", help="torch.compile the encoder, one graph per bucket shape (slow start)."),
    ] = False,
    batch_size: Annotated[int | None, typer.Option(help="Images per forward (default: from token budget).")] = None,
    token_budget: Annotated[int | None, typer.Option(help="Tokens per forward pass.")] = None,
    workers: Annotated[int | None, typer.Option(help="Decode worker processes.")] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: cuda if available).")] = None,
    shard_mb: Annotated[float, typer.Option(help="Target shard size in MiB.")] = 128.0,
    limit: Annotated[int | None, typer.Option(help="Only the first N images (discovery order).")] = None,
    num_processes: Annotated[
        int, typer.Option(help="Local processes in one process group (one per GPU; gloo on CPU).")
    ] = 1,
    rank: Annotated[int, typer.Option(help="This process's rank for a manual split (SLURM).")] = 0,
    world_size: Annotated[int, typer.Option(help="Number of processes in a manual split.")] = 1,
    dry_run: Annotated[
        bool, typer.Option(help="Plan only: bucket histogram and projected size; writes nothing.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing cache and start over.")] = False,
    repair: Annotated[
        bool, typer.Option(help="Check every shard as validate does; re-extract only the damaged or missing ones.")
    ] = False,
    prune: Annotated[
        bool, typer.Option(help="Drop the cached images that are gone from the source (no longer served or counted).")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Extract CLS + patch-grid features for every image into a sharded zarr cache (rerun to resume)."""
    from dinofeat.errors import DinofeatError
    from dinofeat.extraction.config import ExtractConfig
    from dinofeat.extraction.launch import extract_processes
    from dinofeat.images.recipe import Recipe

    try:
        cfg = ExtractConfig(
            model=model,
            revision=revision,
            dtype=dtype,
            store_dtype=store_dtype,
            area=area,
            multiple=multiple,
            min_ar=min_ar,
            max_ar=max_ar,
            num_buckets=num_buckets,
            bucket_mode="fit" if fit else "list",
            keep_registers=keep_registers,
            dit_scale=dit_scale,
            dit_token=dit_token,
            layers=layers,
            layer_norm=layer_norm,
            flip=flip,
            recipe=Recipe.from_options(jpeg_draft, draft_gap),
            batch_size=batch_size,
            token_budget=token_budget,
            compile=compile_model,
            num_workers=workers,
            device=device,
            shard_mb=shard_mb,
            limit=limit,
            rank=rank,
            world_size=world_size,
            progress=not as_json,
        )
        if bucket_spec is not None:
            cfg = cfg.with_bucket_spec(bucket_spec)
        from dinofeat.extraction.config import FINGERPRINTED

        s = extract_processes(
            source,
            cache,
            cfg,
            num_processes,
            overwrite=overwrite,
            dry_run=dry_run,
            repair=repair,
            prune=prune,
            inherit=set(FINGERPRINTED) - _given(ctx),
        )
    except DinofeatError as e:
        _fail(e)
    except KeyboardInterrupt:
        _interrupted(cache)
    if s.rank != 0:  # under accelerate launch / torchrun every rank gets here; rank 0 speaks for the run
        return
    if as_json:
        typer.echo(json.dumps(s.to_dict(), indent=2, default=str))
        return
    if s.inherited:
        taken = ", ".join(f"{k} {_show(v)}" for k, v in sorted(s.inherited.items()))
        typer.echo(f"settings from the cache (not given on this command line): {taken}")
    if dry_run:
        typer.echo(f"plan: {s.total} images, {s.failed} unreadable, {len(s.histogram)} buckets")
        for name, n in s.histogram:
            typer.echo(f"  {name:>11}  {n:>8}  {'#' * max(1, round(40 * n / max(c for _, c in s.histogram)))}")
        typer.echo(f"projected size on disk: {_gb(s.projected_bytes)}")
        return
    typer.echo(
        f"{s.cache}: {s.done} done, {s.failed} failed, {s.pending} pending of {s.total}; "
        f"this run {s.processed} images in {s.seconds:.1f}s ({s.images_per_s:.1f} img/s"
        f"{f' by {s.world_size} processes' if s.world_size > 1 else ''}), "
        f"{_gb(s.bytes_written)} written{'; sealed' if s.sealed else ''}"
    )
    for reason, n in sorted(s.failures_by_reason.items()):
        typer.echo(f"  failed ({reason}): {n}")
    if s.appended:
        typer.echo(f"  incremental: {s.appended} images new to the folder were added (finished shards untouched)")
    if s.new_files:
        typer.echo(f"  {s.new_files} images in the folder are not in the plan (outside --limit)")
    if s.removed_files:
        typer.echo(
            f"  {s.removed_files} cached images are gone from the source (still served; rerun with --prune to drop "
            "them), e.g. " + ", ".join(s.removed_examples)
        )
    if s.pruned_now:
        typer.echo(f"  pruned {s.pruned_now} images gone from the source: no longer served; statistics recomputed")
    if s.repaired:
        typer.echo(f"  repaired {len(s.repaired)} damaged shards (re-extracted): " + "; ".join(s.repaired[:5]))
    elif "repair" in sys.argv[1:] or "--repair" in sys.argv[1:]:
        typer.echo("  repair: every shard checked, none damaged")
    if s.damaged:
        typer.echo(
            f"  {len(s.damaged)} marked shards are damaged or lost (e.g. {s.damaged[0]}): rerun the same command with "
            "--repair to re-extract only those"
        )
    if s.cleaned_files:
        typer.echo(f"  cleaned {s.cleaned_files} partial files left by an interrupted run")


@app.command()
def validate(
    cache: Annotated[str, typer.Argument(help=CACHE_HELP)],
    images: Annotated[
        str | None, typer.Option(help="The source to compare against (missing/extra/stale): folder, shards, parquet.")
    ] = None,
    recompute: Annotated[int, typer.Option(help="Re-extract K random images and compare (cosine per patch).")] = 0,
    sample: Annotated[float, typer.Option(help="Fraction of shards whose values are checked.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for --sample and --recompute.")] = 0,
    as_json: AsJson = False,
) -> None:
    """Check a cache is complete and correct; exit 0 only when every check passes."""
    from dinofeat.errors import DinofeatError
    from dinofeat.inspection.validate import validate as run_validate

    try:
        report = run_validate(cache, images, recompute, sample, seed, progress=not as_json)
    except DinofeatError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        first = [p for p in report.problems if p.check == "complete" and p.where == "cache"]  # unfinished: first
        for p in first + [p for p in report.problems if p not in first]:
            typer.secho(f"FAIL {p.check:<10} {p.where}: {p.reason}", fg=typer.colors.RED)
        for p in report.warnings:
            typer.secho(f"warn {p.check:<10} {p.where}: {p.reason}", fg=typer.colors.YELLOW)
        for line in report.advice():
            typer.echo(f"fix: {line}")
        checked = ", ".join(f"{k} {v}" for k, v in report.checked.items())
        typer.echo(
            f"{'OK' if report.ok else 'FAILED'}: {cache} ({checked + '; ' if checked else ''}"
            f"{len(report.problems)} problems, {len(report.warnings)} warnings)"
        )
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def info(cache: Annotated[str, typer.Argument(help=CACHE_HELP)], as_json: AsJson = False) -> None:
    """Model, dtypes, per-bucket counts, failures by reason, size on disk, per-channel feature statistics."""
    from dinofeat.errors import DinofeatError
    from dinofeat.inspection.info import info as run_info

    try:
        d = run_info(cache)
    except DinofeatError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    m = d["model"]
    counts = f"{d['done']} done, {d['failed']} failed" + "".join(
        f", {d[k]} {k}" for k in ("pending", "pruned") if d.get(k)
    )
    typer.echo(
        f"{d['cache']} ({d['state']}): {counts} of {d['images']}; {_gb(d['disk_bytes'])} on disk; format "
        f"{d['format_version']}{', checksummed' if d['checksums'] else ' (no checksums)'}; made by dinofeat "
        f"{d['dinofeat_version']}"
    )
    if d["state"] != "sealed":
        typer.echo("unfinished: rerun the same precompute command to finish it (finished shards are kept)")
    typer.echo(
        f"model {m['id']}{' (RANDOM WEIGHTS)' if m['random_weights'] else ''}, {m['model_type']}, patch "
        f"{m['patch_size']}, {m['num_register_tokens']} registers, D={m['hidden_size']}; "
        f"compute {d['dtypes']['compute']}, stored {d['dtypes']['store']}"
    )
    f = d["features"]
    tied = d["bucket_spec"].get("tied")
    typer.echo(
        f"features: blocks {f['layers']} (block {f['primary_layer']} as cls/patches"
        f"{', final norm on each' if f['layer_norm'] else ', raw block outputs'})"
        + ("; mirrored images too (_flip)" if f["flip"] else "")
        + (f"; buckets tied to the DiT buckets x {tied['scale']}" if tied else "")
    )
    typer.echo(f"{'bucket':>11}  {'grid':>7}  {'tokens':>6}  {'done':>7}  {'failed':>6}  {'shards':>6}")
    for b in d["buckets"]:
        dit = f"  DiT {b['dit_size'][0]}x{b['dit_size'][1]}" if "dit_size" in b else ""
        typer.echo(
            f"{b['bucket']:>11}  {b['grid'][0]:>3}x{b['grid'][1]:<3}  {b['tokens']:>6}  {b['done']:>7}  "
            f"{b['failed']:>6}  {b['shards']:>6}{dit}"
        )
    for reason, n in sorted(d["failures_by_reason"].items()):
        typer.echo(f"failed ({reason}): {n}")
    cs = d["channel_stats"]
    if cs.get("images"):
        mean, std = cs["mean"], cs["std"]
        how = f"all {cs['tokens']} patch tokens (recorded)" if cs.get("exact") else f"{cs['images']} sampled images"
        typer.echo(
            f"patch features over {how}: channel mean in [{min(mean):.3g}, {max(mean):.3g}], "
            f"channel std in [{min(std):.3g}, {max(std):.3g}] (--json for all channels)"
        )


@app.command()
def show(
    cache: Annotated[str, typer.Argument(help=CACHE_HELP)],
    keys: Annotated[list[str], typer.Argument(help="Image keys (paths relative to the source folder).")],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("dinofeat-show"),
    grid: Annotated[bool, typer.Option(help="One tiled PNG with a PCA shared by all images.")] = False,
    images: Annotated[str | None, typer.Option(help="Source folder (default: the one recorded).")] = None,
) -> None:
    """Write the resized input beside a PCA (3 components -> RGB) of its patch grid."""
    from dinofeat.errors import DinofeatError
    from dinofeat.inspection.show import show as run_show

    try:
        paths = run_show(cache, keys, out, grid, images)
    except (DinofeatError, KeyError) as e:
        _fail(e)
    for p in paths:
        typer.echo(str(p))


@app.command()
def bench(
    model: Annotated[
        str | None,
        typer.Option(
            help="Hub id, local directory, or random:vits16|vitb16|vitl16|... (GPU: random:vitl16, CPU: random:vits16)."
        ),
    ] = None,
    area: Annotated[int | None, typer.Option(help="Target area side (GPU: 1024, CPU: 512).")] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto|fp16|bf16|fp32.")] = "auto",
    images: Annotated[Path | None, typer.Option(help="Your own image folder (default: synthetic photos).")] = None,
    count: Annotated[int | None, typer.Option(help="Images to time (default 256 on GPU, 16 on CPU).")] = None,
    megapixels: Annotated[float, typer.Option(help="Size of the synthetic photos.")] = 2.0,
    workers: Annotated[int | None, typer.Option(help="Decode worker processes.")] = None,
    eta_images: Annotated[int, typer.Option(help="Print the time this many images would take.")] = 1_000_000,
    as_json: AsJson = False,
) -> None:
    """Measure model-only and end-to-end images/s on this machine, next to the device's peak, with an ETA."""
    from dinofeat.errors import DinofeatError
    from dinofeat.inspection.bench import bench as run_bench

    try:
        say = None if as_json else (lambda line: typer.echo(line, err=True))
        r = run_bench(model, area, device, dtype, images, count, megapixels, workers, progress=not as_json, say=say)
    except DinofeatError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({**r.to_dict(), "eta_images": eta_images, "eta_s": r.eta_s(eta_images)}, indent=2))
        return
    typer.echo(f"{r.model} at area {r.area}, {r.device} {r.dtype}, {r.images} images in {r.buckets} buckets")
    typer.echo(
        f"  model-only  {r.model_only_img_s:8.2f} img/s  ({r.gflop_per_image:.1f} GFLOP/img = {r.model_tflops:.2f} "
        f"TFLOP/s, {r.utilization:.0%} of the measured {r.peak_tflops:.2f} TFLOP/s matmul peak)"
    )
    typer.echo(
        f"  end-to-end  {r.end_to_end_img_s:8.2f} img/s  ({r.end_to_end_over_model_only:.0%} of model-only; "
        f"{r.end_to_end_wall_img_s:.2f} img/s counting probe, plan and model load; decode workers: {r.workers})"
    )
    hours = r.eta_s(eta_images) / 3600
    typer.echo(f"  ETA for {eta_images:,} images: {hours:.1f} h on one such device, {hours / 8:.1f} h on 8")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # finished shards are safe; rerun to resume
        typer.secho("interrupted: finished shards are kept; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
