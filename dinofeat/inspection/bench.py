"""`dinofeat bench`: how fast this machine extracts, so a job can be sized before it starts.

On the same images and model, in one process: model-only throughput (pre-decoded uint8 batches, the pipeline's own
batches: the ceiling), end-to-end throughput (`extract` into a temporary cache), the model's FLOPs per image and the
device's measured matmul peak in the compute dtype, so every figure sits next to its limit. Then the pipeline's own
ceiling: the same extraction with a stub encoder (the model's output shapes, no compute), with real shard writes and
with writes dropped, and where its time went (decode wait, copies, each writer stage). End to end near model-only
means the model sets the pace; the stub's rate far above model-only means the pipeline can feed a faster device.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinofeat.errors import ConfigError
from dinofeat.extraction.config import ExtractConfig
from dinofeat.extraction.loop import DEFAULT_TOKEN_BUDGET, default_workers, pipeline_ceiling
from dinofeat.extraction.model import TORCH_DTYPES, Encoder
from dinofeat.extraction.plan import batch_size_for
from dinofeat.extraction.prepare import build_plan, prepare
from dinofeat.extraction.run import extract
from dinofeat.extraction.tokens import split_tokens
from dinofeat.images.preprocess import load_resized
from dinofeat.images.recipe import Recipe
from dinofeat.images.synthetic import make_images
from dinofeat.progress import bar as progress_bar
from dinofeat.sources.discover import discover


@dataclass(frozen=True)
class BenchResult:
    model: str
    area: int
    device: str
    dtype: str
    images: int
    buckets: int
    workers: int
    model_only_img_s: float
    end_to_end_img_s: float  # the extraction loop: decode, model, writes
    end_to_end_wall_img_s: float  # the whole call: discovery, header probes, planning, model load, extraction
    gflop_per_image: float  # mean over the images' buckets
    peak_tflops: float  # measured dense matmul rate of this device in the compute dtype
    compile: bool = False
    warmup_s: float = 0.0  # model-only first pass minus a warm one: kernel autotuning, or compiling each shape
    write_gb_s: float = 0.0  # feature bytes written per second of the end-to-end extraction
    pipeline_img_s: float = 0.0  # the extraction with a stub encoder: decode, copies, statistics and writes only
    pipeline_dropped_img_s: float = 0.0  # the same with every shard dropped at the writer
    pipeline_timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the stub run (writes)
    pipeline_shards: int = 0  # shards the stub run wrote (per-shard writer figures divide by it)
    startup_s: float = 0.0  # the end-to-end call's seconds before its extraction loop: listing, probes, plan, model
    failed: int = 0  # images of the folder skipped as precompute skips them (unreadable, not an image, too large)
    failures_by_reason: dict[str, int] = field(default_factory=dict)  # precompute's reason classes

    @property
    def model_tflops(self) -> float:
        return self.model_only_img_s * self.gflop_per_image / 1e3

    @property
    def utilization(self) -> float:
        """Model-only FLOP rate over the measured matmul peak."""
        return self.model_tflops / self.peak_tflops if self.peak_tflops else 0.0

    @property
    def end_to_end_over_model_only(self) -> float:
        return self.end_to_end_img_s / self.model_only_img_s if self.model_only_img_s else 0.0

    @property
    def writes_over_dropped(self) -> float:
        """The pipeline's rate with shard writes over its rate without: what writing costs (1.0: nothing)."""
        return self.pipeline_img_s / self.pipeline_dropped_img_s if self.pipeline_dropped_img_s else 0.0

    def eta_s(self, num_images: int, processes: int = 1) -> float:
        """Seconds for `num_images` at the end-to-end rate, assuming `processes` devices like this one."""
        return num_images / (self.end_to_end_img_s * processes) if self.end_to_end_img_s else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "model_tflops": self.model_tflops,
            "utilization": self.utilization,
            "end_to_end_over_model_only": self.end_to_end_over_model_only,
            "writes_over_dropped": self.writes_over_dropped,
        }


def vit_flops(config: dict[str, Any], grid: tuple[int, int], registers: int = 0) -> float:
    """Forward FLOPs (2 per multiply-add) of one image through a DINOv2/v3 ViT: patch embedding, per layer the
    q/k/v/o projections, attention scores and weighted sum, and the MLP (gated MLPs have three matrices)."""
    d, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    inter = int(config.get("intermediate_size") or d * float(config.get("mlp_ratio", 4)))
    gated = bool(config.get("use_gated_mlp") or config.get("use_swiglu_ffn"))
    if config.get("use_swiglu_ffn") and not config.get("intermediate_size"):
        inter = (int(inter * 2 / 3) + 7) // 8 * 8  # DINOv2's SwiGLU hidden width
    p = config["patch_size"] if isinstance(config["patch_size"], int) else config["patch_size"][0]
    patches = grid[0] * grid[1]
    tokens = 1 + registers + patches
    embed = 2 * patches * 3 * p * p * d
    per_layer = 2 * tokens * 4 * d * d + 4 * tokens * tokens * d + 2 * tokens * d * inter * (3 if gated else 2)
    return float(embed + layers * per_layer)


def matmul_peak_tflops(device: torch.device, dtype: str, seconds: float = 1.0) -> float:
    """Dense square matmul rate: what the tensor cores (or AMX / AVX units) deliver in this dtype here."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=TORCH_DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=TORCH_DTYPES[dtype])
    _sync(device)
    torch.mm(a, b)
    _sync(device)
    step = 10 if device.type == "cuda" else 1  # GPU: queue several, then wait, so launch latency does not count
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(step):
            torch.mm(a, b)
        _sync(device)
        reps += step
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# What `dinofeat bench` measures when not told: the production setting on a GPU; on a CPU a small model and area,
# so that the defaults finish in about a minute there (ViT-L/16 at 1024 takes ~40 s per image on 2 cores in fp32)
DEFAULTS = {"cuda": ("random:vitl16", 1024, 256), "cpu": ("random:vits16", 512, 16)}
PASSES = 3  # the model-only warm-up and timed passes, and the end-to-end run
MODEL_EFFICIENCY = 0.5  # the share of the matmul peak a ViT forward pass reaches, for the up-front estimate only
# the up-front guess (from the matmul peak, before any image is decoded) against measured runs: 2-9x too low on a
# machine whose cores other jobs share, about right on an idle one; the figure after the warm-up pass is measured
ROUGH = "a rough guess from the matmul peak: up to several times longer on a busy machine"


def bench(
    model: str | None = None,
    area: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    images: str | os.PathLike[str] | None = None,
    count: int | None = None,
    megapixels: float = 2.0,
    workers: int | None = None,
    progress: bool = True,
    compile: bool = False,
    say: Callable[[str], None] | None = None,
    decode: str = "cpu",
) -> BenchResult:
    """Measure on `count` images from `images` (a folder), or on synthetic photo-like JPEGs of `megapixels`.
    `compile` torch.compiles the encoder of both measurements (one graph per bucket shape). Model, area and count
    default by device (DEFAULTS). `say` gets one line per phase, the first with the time the run will take here.
    `decode` = "gpu" decodes JPEGs on the device end to end (--decode gpu); model-only decodes up front either way."""
    if count is not None and count < 1:
        raise ConfigError(f"--count is a number of images >= 1, got {count}")
    if megapixels <= 0:
        raise ConfigError(f"--megapixels must be > 0, got {megapixels}")
    if area is not None and area < 1:
        raise ConfigError(f"--area is the side of the target area in pixels, >= 1, got {area}")
    say = say or (lambda _: None)
    kind = "cuda" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    model, area, count = model or DEFAULTS[kind][0], area or DEFAULTS[kind][1], count or DEFAULTS[kind][2]
    cfg = ExtractConfig(
        model=model, area=area, device=device, dtype=dtype, num_workers=workers, progress=progress, compile=compile,
        recipe=Recipe(decode=decode),
    )  # fmt: skip
    prep = prepare(cfg)
    peak = matmul_peak_tflops(prep.device, prep.dtype)
    square = (area // prep.model.patch_size,) * 2
    per_image = vit_flops(prep.model.config, square, prep.model.num_register_tokens) / (peak * 1e12 * MODEL_EFFICIENCY)
    say(
        f"bench: {model} at area {area} on {prep.device} ({prep.dtype}, measured matmul peak {peak:.2f} TFLOP/s), "
        f"{count} {'images' if images else f'synthetic {megapixels:g} MP photos'}: about "
        f"{_duration(count * PASSES * per_image)} here ({ROUGH}; a measured figure follows the model's warm-up)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="dinofeat-bench-"))
    try:
        src_dir = Path(images) if images is not None else tmp / "images"
        if images is None:
            make_images(src_dir, count, megapixels, progress=progress)
        src = discover(src_dir, limit=count)
        if not src.keys:
            raise ConfigError(f"no images under {src_dir}")
        plan = build_plan(src, prep, progress=False)
        say(f"bench: model only ({len(plan.buckets)} bucket shapes, decoded up front, a warm-up pass, a timed pass)")
        encoder = Encoder(prep.model, prep.device, prep.dtype, compile, shapes=len(plan.buckets))
        measured = _model_only(encoder, prep, src, plan, progress, say)
        model_only, flops, warmup = measured.img_s, measured.flops, measured.warmup_s
        del encoder
        say("bench: end to end (decode, model, writes into a temporary cache)")
        t0 = time.perf_counter()
        summary = extract(src_dir, tmp / "cache", replace(cfg, limit=len(src.keys)))
        elapsed = time.perf_counter() - t0
        wall = len(src.keys) / elapsed
        say("bench: the pipeline's ceiling (a stub encoder of the model's shapes; with writes, then writes dropped)")
        ceiling = {}
        for drop in (False, True):
            with pipeline_ceiling(drop_writes=drop):
                ceiling[drop] = extract(src_dir, tmp / f"ceiling-{drop}", replace(cfg, limit=len(src.keys)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BenchResult(
        model=model,
        area=area,
        device=str(prep.device),
        dtype=prep.dtype,
        images=summary.done,  # a fresh cache: every done image is this run's; failed ones are skipped, as there
        buckets=len(plan.buckets),
        workers=workers if workers is not None else default_workers(prep.device),
        model_only_img_s=model_only,
        end_to_end_img_s=summary.images_per_s,
        end_to_end_wall_img_s=wall,
        gflop_per_image=flops / 1e9,
        peak_tflops=peak,
        compile=compile,
        warmup_s=warmup,
        write_gb_s=summary.bytes_written / summary.seconds / 1e9 if summary.seconds else 0.0,
        pipeline_img_s=ceiling[False].images_per_s,
        pipeline_dropped_img_s=ceiling[True].images_per_s,
        pipeline_timings=ceiling[False].timings,
        pipeline_shards=ceiling[False].shards_written,
        startup_s=max(0.0, elapsed - summary.seconds),
        failed=summary.failed,
        failures_by_reason=summary.failures_by_reason,
    )


def _duration(seconds: float) -> str:
    return (
        "under a second"
        if seconds < 1
        else f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


@dataclass(frozen=True)
class ModelOnly:
    img_s: float
    flops: float  # mean per image
    warmup_s: float  # the warm-up pass's seconds beyond a warm one


def _decode(load: Callable[[Any], np.ndarray], path: Any) -> np.ndarray | Exception:
    """One image's pixels, or why it has none: a bad file is skipped, as precompute skips it (any decoder error
    there too: one decoder's bug must not end the run; the end-to-end pass counts it with its reason)."""
    try:
        return load(path)
    except Exception as e:
        return e


def _model_only(
    encoder: Encoder, prep: Any, src: Any, plan: Any, progress: bool = False, say: Callable[[str], None] | None = None
) -> ModelOnly:
    """Images/s through the encoder on pre-decoded uint8 batches (the pipeline's batching, every shape warmed up
    first: CPU kernels specialise per shape, GPU kernels autotune, compiled encoders compile), the mean FLOPs per
    image, and the seconds the warm-up pass took beyond a warm one. Decoding for it uses every core (threads: PIL
    releases the GIL), so a 1,000-image folder of 12 MP photos is ready in seconds, not minutes. Images that fail
    to decode (a truncated JPEG) are left out and returned with their reasons. After the warm-up pass, `say` gets
    the time the rest of the bench will take, measured: that pass's time and the decoding's."""
    cfg, regs = prep.config, prep.model.num_register_tokens
    budget = cfg.token_budget or DEFAULT_TOKEN_BUDGET.get(prep.device.type, 8192)
    positions = plan.rows_to_keys()
    batches, flops, n, unreadable = [], 0.0, 0, 0
    t0 = time.perf_counter()
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
        progress_bar(total=sum(b.rows for b in plan.buckets), desc="decode", unit="img", enabled=progress) as bar,
    ):
        for b in plan.buckets:
            bs = batch_size_for(b.grid[0] * b.grid[1] + 1 + regs, budget, cfg.batch_size)
            keys = [plan.keys[i] for i in positions[b.name] if i >= 0]
            load = functools.partial(load_resized, size=b.size, recipe=cfg.recipe)
            decoded = []
            for x in pool.map(functools.partial(_decode, load), map(src.path, keys)):
                if isinstance(x, Exception):
                    unreadable += 1
                else:
                    decoded.append(x)
                bar.update(1)
            if not decoded:
                continue
            u8 = np.stack(decoded)
            batches += [(b, torch.from_numpy(u8[s : s + bs])) for s in range(0, len(u8), bs)]
            flops += len(decoded) * vit_flops(prep.model.config, b.grid, regs)
            n += len(decoded)
    decode_s = time.perf_counter() - t0
    if not n:
        raise ConfigError(
            f"none of the {len(plan.keys)} images could be read ({len(plan.probe_errors) + unreadable} "
            "unreadable): nothing to time"
        )

    def one_pass(desc: str) -> float:
        t0 = time.perf_counter()
        for b, x in progress_bar(batches, desc=desc, unit="batch", enabled=progress):
            hidden = encoder.encode_uint8(x, cfg.recipe.mean, cfg.recipe.std)
            split_tokens(hidden, regs, b.grid)[2].to(TORCH_DTYPES[cfg.store_dtype]).cpu()
        _sync(prep.device)
        return time.perf_counter() - t0

    first = one_pass("model warm-up")
    if say is not None:  # the timed pass and the end-to-end model time are at most a warm-up each; decoding 3 times
        say(f"bench: measured: the rest takes about {_duration(2 * first + 3 * decode_s)} here")
    warm = one_pass("model timed")
    return ModelOnly(n / warm, flops / n, max(0.0, first - warm))
