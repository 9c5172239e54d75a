"""What the commands print: every line a person reads, kept out of the commands so each of those only parses,
calls the library and sets the exit code."""

from __future__ import annotations

from typing import Any

import typer

from dinofeat.errors import CHANGED_SINCE_PLANNED

# ExtractConfig settings as the option a user would type (internal ones, like the bucket table's version, are
# not shown)
_AS_OPTION = {
    "model": "--model", "revision": "--revision", "dtype": "--dtype", "store_dtype": "--store-dtype", "area": "--area",
    "multiple": "--multiple", "min_ar": "--min-ar", "max_ar": "--max-ar", "num_buckets": "--num-buckets",
    "dit_scale": "--dit-scale", "dit_token": "--dit-token", "layers": "--layers", "limit": "--limit",
}  # fmt: skip
_FLAGS = {
    "flip": ("--flip", "--no-flip"),
    "layer_norm": ("--layer-norm", "--no-layer-norm"),
    "keep_registers": ("--keep-registers", "--no-keep-registers"),
    "bucket_mode": ("--fit", "--no-fit"),
}


def gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def as_options(settings: dict[str, Any]) -> str:
    """Settings taken from a cache, written as the options that would give them (`--area 64 --flip`)."""
    out = []
    for k, v in sorted(settings.items()):
        if k in _FLAGS:
            on = v == "fit" if k == "bucket_mode" else bool(v)
            out.append(_FLAGS[k][0 if on else 1])
        elif k == "recipe":
            out.append("--no-jpeg-draft" if not v.jpeg_draft else f"--jpeg-draft --draft-gap {v.jpeg_draft}")
        elif k in _AS_OPTION and v is not None:
            out.append(f"{_AS_OPTION[k]} {','.join(map(str, v)) if isinstance(v, tuple) else v}")
    return " ".join(out)


def interrupted(where: str) -> None:
    typer.secho(f"\ninterrupted: {where}; rerun the same command to resume", err=True)


def dry_run(s: Any) -> None:
    typer.echo(f"plan: {count(s.total, 'image')}, {s.failed} unreadable, {count(len(s.histogram), 'bucket')}")
    for name, n in s.histogram:
        typer.echo(f"  {name:>11}  {n:>8}  {'#' * max(1, round(40 * n / max(c for _, c in s.histogram)))}")
    typer.echo(f"projected size on disk: {gb(s.projected_bytes)}")


def summary(s: Any, repair_asked: bool) -> None:
    """A run's outcome: counts, speed, and every note that asks the user to do something."""
    if s.manual_split and s.pending:  # this rank finished first: the rest is the other ranks' share, still running
        left = f" of {s.total}, {s.pending} in the other ranks' shards (the last rank to finish seals the cache)"
    else:
        left = f", {s.pending} pending of {s.total}"
    by = f" by {s.world_size} processes" if s.world_size > 1 and not s.manual_split else ""
    typer.echo(
        f"{s.cache}: {s.done} done, {s.failed} failed{left}; "
        f"{'this rank' if s.manual_split else 'this run'} {count(s.processed, 'image')} in {s.seconds:.1f}s "
        f"({s.images_per_s:.1f} img/s{by}), {gb(s.bytes_written)} written{'; sealed' if s.sealed else ''}"
    )
    for line in rank_lines(s):
        typer.echo(f"  {line}")
    for reason, n in sorted(s.failures_by_reason.items()):
        typer.echo(f"  failed ({reason}): {n}")
    for line in _notes(s, repair_asked):
        typer.echo(f"  {line}")


def rank_lines(s: Any) -> list[str]:
    """What each process of a split run did itself (none for a run of one process)."""
    if s.world_size == 1:
        return []
    return [
        f"rank {r.rank} of {s.world_size}: {count(r.images, 'image')} ({r.failed} failed), "
        f"{count(r.shards, 'shard')} written in {r.seconds:.1f}s"
        for r in s.ranks
    ]


def count(n: int, noun: str) -> str:
    """'1 image', '3 images': messages say what they count in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _notes(s: Any, repair_asked: bool) -> list[str]:
    out = []
    if s.appended:
        out.append(f"incremental: {count(s.appended, 'image')} new to the source added (finished shards untouched)")
    if s.new_files:
        out.append(f"{count(s.new_files, 'image')} in the source but not in the plan (outside --limit, or pruned)")
    if s.removed_files:
        out.append(
            f"{count(s.removed_files, 'planned image')} gone from the source (those stored are still served; rerun "
            "with --prune to drop them), e.g. " + ", ".join(map(_escaped, s.removed_examples))
        )
    if s.pruned_now:
        out.append(
            f"pruned {count(s.pruned_now, 'image')} gone from the source: no longer served; statistics recomputed"
        )
    if s.repaired:
        out.append(f"repaired {count(len(s.repaired), 'shard')} (re-extracted): " + "; ".join(s.repaired[:5]))
    elif repair_asked:
        out.append("repair: every shard checked, none damaged")
    if s.damaged:
        out.append(
            f"{count(len(s.damaged), 'marked shard')} damaged or lost (e.g. {s.damaged[0]}): rerun the same command "
            "with --repair to re-extract only those"
        )
    if s.cleaned_files:
        out.append(f"removed {s.cleaned_files} files of unfinished shards (an interrupted run's, redone now)")
    changed = s.failures_by_reason.get(CHANGED_SINCE_PLANNED, 0)
    if changed:
        out.append(
            f"{count(changed, 'image')} replaced by one of other dimensions since planned (not stored): rerun the same "
            "command to plan them again into the buckets of their new size"
        )
    return out


_CHECKED = {"value_shards": "value shards", "recompute_min_cosine": "min cosine"}  # report.checked's keys, as read


def report(r: Any, cache: str) -> None:
    """validate's report: an unfinished cache's summary first, then each problem, warning and fix."""
    first = [p for p in r.problems if p.check == "complete" and p.where == "cache"]
    for p in first + [p for p in r.problems if p not in first]:
        typer.secho(f"FAIL {p.check:<10} {_escaped(p.where)}: {p.reason}", fg=typer.colors.RED)
    for p in r.warnings:
        typer.secho(f"warn {p.check:<10} {_escaped(p.where)}: {p.reason}", fg=typer.colors.YELLOW)
    for line in r.advice():
        typer.echo(f"fix: {line}")
    checked = ", ".join(f"{_CHECKED.get(k, k)} {v}" for k, v in r.checked.items())
    typer.echo(
        f"{'OK' if r.ok else 'FAILED'}: {cache} ({checked + '; ' if checked else ''}"
        f"{len(r.problems)} problems, {len(r.warnings)} warnings)"
    )


def bench(r: Any, eta_images: int) -> None:
    typer.echo(f"{r.model} at area {r.area}, {r.device} {r.dtype}, {r.images} images in {r.buckets} buckets")
    if r.failed:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(r.failures_by_reason.items()))
        typer.echo(f"  skipped {count(r.failed, 'unreadable image')}, as precompute skips them ({reasons})")
    typer.echo(
        f"  model-only  {r.model_only_img_s:8.2f} img/s  ({r.gflop_per_image:.1f} GFLOP/img = {r.model_tflops:.2f} "
        f"TFLOP/s, {r.utilization:.0%} of the measured {r.peak_tflops:.2f} TFLOP/s matmul peak)"
    )
    typer.echo(
        f"  end-to-end  {r.end_to_end_img_s:8.2f} img/s  ({r.end_to_end_over_model_only:.0%} of model-only; "
        f"{r.end_to_end_wall_img_s:.2f} img/s counting {r.startup_s:.1f} s of listing, probes, plan and model load; "
        f"decode workers: {r.workers})"
    )
    typer.echo(
        f"  pipeline    {r.pipeline_img_s:8.2f} img/s  with a stub model ({r.pipeline_dropped_img_s:.2f} img/s with "
        f"writes dropped: writing keeps {r.writes_over_dropped:.0%})"
    )
    t, shards = r.pipeline_timings, max(1, r.pipeline_shards)
    typer.echo(
        f"    where it went: waiting for decoded batches {t.get('loader_wait', 0):.2f} s, copies "
        f"{t.get('host_copy', 0):.2f} s (waiting on the writers {t.get('writer_wait', 0):.2f} s)"
    )
    typer.echo(
        f"    per shard in the writers: statistics {t.get('writer_stats', 0) / shards:.3f} s, write + fsync "
        f"{t.get('writer_write', 0) / shards:.3f} s, marker {t.get('writer_marker', 0) / shards:.3f} s"
    )
    hours = r.eta_s(eta_images) / 3600
    typer.echo(f"  ETA for {eta_images:,} images: {hours:.1f} h on one such device, {hours / 8:.1f} h on 8")


def rounding_lines(notes: dict, multiple: int) -> list[str]:
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


def bucket_table(spec, doc: dict) -> None:
    rows = doc["buckets"]
    typer.echo(
        f"# {len(rows)} buckets, area {spec.area}^2, multiple {spec.multiple}, aspect {spec.min_ar:g}..{spec.max_ar:g}"
        f", spec hash {spec.hash}"
    )
    for line in rounding_lines(doc["rounding"], spec.multiple):
        typer.echo(line)
    typer.echo(f"{'W x H':>11}  {'grid h x w':>10}  {'tokens':>6}  {'aspect':>6}  {'area/A':>6}")
    for r in rows:
        typer.echo(
            f"{r['width']:>5} x {r['height']:<4}  {r['grid_h']:>4} x {r['grid_w']:<4}  {r['tokens']:>6}  "
            f"{r['aspect']:>6.3f}  {r['area_ratio']:>6.3f}"
        )


def tied_table(spec, doc: dict) -> None:
    d = spec.dit
    typer.echo(
        f"# {len(doc['buckets'])} buckets tied: DiT area {d.area}^2, multiple {d.multiple}, token {spec.dit_token} px; "
        f"DINO = DiT x {spec.scale}; k = {doc['grid_factor']} DiT tokens per DINO patch side; spec hash {spec.hash}"
    )
    for line in rounding_lines(doc["rounding"], d.multiple):
        typer.echo(line)
    typer.echo(f"{'DiT W x H':>11}  {'tokens h x w':>12}   {'DINO W x H':>11}  {'patches h x w':>13}  {'aspect':>6}")
    for r in doc["buckets"]:
        t, p = r["dit"], r["dino"]
        typer.echo(
            f"{t['width']:>5} x {t['height']:<4}  {t['grid_h']:>5} x {t['grid_w']:<5}   {p['width']:>5} x "
            f"{p['height']:<4}  {p['grid_h']:>6} x {p['grid_w']:<5}  {r['aspect']:>6.3f}"
        )


def failed_images(failed: list[tuple[str, str]]) -> None:
    """`info --failures`: one line per failed image, key and reason split by a tab (`cut -f1` gives the keys); the
    reason is one line (a reason's own line breaks and tabs become spaces), and a key's tab or line break is written
    `\\t`, `\\n`, `\\r`, as keys spell other bytes of a file name (`--json` has the keys as they are)."""
    for key, reason in failed:
        typer.echo(f"{_escaped(key)}\t{' '.join(reason.split())}")


def _escaped(key: str) -> str:
    return key.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def info(d: dict[str, Any]) -> None:
    m = d["model"]
    counts = f"{d['done']} done, {d['failed']} failed" + "".join(
        f", {d[k]} {k}" for k in ("pending", "pruned") if d.get(k)
    )
    typer.echo(
        f"{d['cache']} ({d['state']}): {counts} of {d['images']}; {gb(d['disk_bytes'])} on disk; format "
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
    if d["failed"]:
        typer.echo(f"  (dinofeat info {d['cache']} --failures lists each failed image with its reason)")
    cs = d["channel_stats"]
    if cs.get("images"):
        mean, std = cs["mean"], cs["std"]
        how = f"all {cs['tokens']} patch tokens (recorded)" if cs.get("exact") else f"{cs['images']} sampled images"
        typer.echo(
            f"patch features over {how}: channel mean in [{min(mean):.3g}, {max(mean):.3g}], "
            f"channel std in [{min(std):.3g}, {max(std):.3g}] (--json for all channels)"
        )
