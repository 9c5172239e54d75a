"""Decode + resize in DataLoader worker processes, shipped as uint8. A worker's item is a decode task of a few
images of one model batch, not the whole batch: with batches of 127 images and 15 workers, whole-batch items kept
most workers idle on short runs and made the first batch wait for one worker to decode 127 images. `batches`
re-assembles the tasks, which arrive in plan order, into exactly the model batches of the plan (so the cache is
the same, byte for byte)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinofeat.cache.layout import VACANT
from dinofeat.errors import ImageError, SourceChangedError
from dinofeat.extraction.devicedecode import Decode, EncodedJpeg, decode_into, load_for_device, nvjpeg
from dinofeat.images.preprocess import load_resized
from dinofeat.images.recipe import Recipe
from dinofeat.sources.archive import Member
from dinofeat.sources.discover import Facts, facts_of, same_facts


@dataclass(frozen=True)
class BatchJob:
    """Rows [start, stop) of one bucket; `paths[i]` is the file (or tar member) for row start + i (None: a vacant
    row, held by no image), `planned[i]` its facts and `sizes[i]` its displayed (width, height) as the plan recorded
    them."""

    bucket: str
    start: int
    stop: int
    size: tuple[int, int]  # (width, height)
    paths: tuple[str | Member | None, ...]
    planned: tuple[Facts, ...] = ()
    sizes: tuple[tuple[int, int], ...] = ()


@dataclass
class DecodedBatch:
    job: BatchJob
    pixels: torch.Tensor  # [B, H, W, 3] uint8; rows of failed images (and of encoded ones, until decoded) are zeros
    failed: dict[int, str]  # row -> reason
    changed: dict[int, Facts] = field(default_factory=dict)  # row -> facts of the bytes read, where not as planned
    encoded: dict[int, EncodedJpeg] = field(default_factory=dict)  # row -> JPEG bytes for the device (--decode gpu)

    def pin_memory(self) -> DecodedBatch:
        """Called by DataLoader's pin thread (pin_memory=True) so the host-to-device copy can be asynchronous."""
        return DecodedBatch(self.job, self.pixels.pin_memory(), self.failed, self.changed, self.encoded)


@dataclass(frozen=True)
class DecodeTask:
    """Images [a, b) of one batch job: what one worker decodes at a time."""

    job: BatchJob
    a: int
    b: int


class BatchDecodeDataset(Dataset):
    """Map-style over decode tasks; nothing heavy is held, so it pickles cheaply into workers."""

    def __init__(self, jobs: Sequence[BatchJob], recipe: Recipe, task_images: int | None = None) -> None:
        self.tasks = [
            DecodeTask(job, a, min(a + (task_images or len(job.paths)), len(job.paths)))
            for job in jobs
            for a in range(0, len(job.paths), task_images or max(1, len(job.paths)))
        ]
        self.recipe = recipe

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> DecodedBatch:
        task = self.tasks[i]
        job = task.job
        w, h = job.size
        out = np.zeros((task.b - task.a, h, w, 3), np.uint8)
        failed: dict[int, str] = {}
        changed: dict[int, Facts] = {}
        encoded: dict[int, EncodedJpeg] = {}
        on_device = self.recipe.decode == "gpu"
        for k in range(task.a, task.b):
            path = job.paths[k]
            if path is None:
                failed[job.start + k] = VACANT  # zeros, left out of the statistics, never served
                continue
            try:
                now = _facts_now(path) if job.planned else None
                # an image of other dimensions than planned (replaced since) fails here: resized into this bucket
                # it would be stored with another aspect; the next run plans it again (ImageChangedError)
                planned = job.sizes[k] if job.sizes else None
                if on_device:
                    got = load_for_device(path, job.size, self.recipe, planned)
                    if isinstance(got, EncodedJpeg):
                        encoded[job.start + k] = got
                    else:
                        out[k - task.a] = got
                else:
                    out[k - task.a] = load_resized(path, job.size, self.recipe, planned)
                if now is not None and not same_facts(now, job.planned[k]):
                    changed[job.start + k] = now  # the source changed since planning: the index will say what we read
            except ImageError as e:
                failed[job.start + k] = str(e)
            except SourceChangedError:
                raise  # not this image's fault: the plan no longer fits the source, so the run stops (resumably)
            except Exception as e:  # a decoder bug on one file must not end a multi-hour run
                failed[job.start + k] = f"decode error: {type(e).__name__}: {e}"
        return DecodedBatch(job, torch.from_numpy(out), failed, changed, encoded)


def batches(
    tasks: Iterable[DecodedBatch], device: torch.device, recipe: Recipe | None = None, decode: Decode = nvjpeg
) -> Iterator[DecodedBatch]:
    """Decoded tasks (in plan order) -> whole batch jobs. Each task's pixels go to the device as they arrive (from
    pinned memory: asynchronously); a job's pixels are joined there, and its JPEGs left encoded for the device
    (--decode gpu) are decoded into it with `decode`."""
    parts: list[torch.Tensor] = []
    failed: dict[int, str] = {}
    changed: dict[int, Facts] = {}
    encoded: dict[int, EncodedJpeg] = {}
    for task in tasks:
        parts.append(task.pixels.to(device, non_blocking=True))
        failed |= task.failed
        changed |= task.changed
        encoded |= task.encoded
        job = task.job
        if sum(len(p) for p in parts) == len(job.paths):
            pixels = parts[0] if len(parts) == 1 else torch.cat(parts)
            if encoded:
                rows = {r - job.start: e for r, e in encoded.items()}
                lost = decode_into(pixels, rows, job.size, recipe or Recipe(decode="gpu"), decode)
                failed |= {job.start + r: why for r, why in lost.items()}
            yield DecodedBatch(job, pixels, failed, changed)
            parts, failed, changed, encoded = [], {}, {}, {}
    if parts:
        raise RuntimeError("the decode tasks ended inside a batch")  # cannot happen: tasks cover whole jobs


def task_images(jobs: Sequence[BatchJob], num_workers: int) -> int | None:
    """Images per decode task: None (whole batches) when decoding inline; else the largest batch split evenly over
    the workers, so every worker takes a part of every batch and the first batch arrives after one part's decode
    (ViT-S/16 at 512 on 15 workers: tasks of 9 images, not one worker on 127). Not smaller: each task costs the
    main process a hand-over (receiving its shared-memory tensor, and joining the batch), which on a small machine
    competes with the workers for the cores (2 cores, 2 workers: tasks of 4 of a batch of 23 decoded 0.6x as fast;
    benchmarks/loader.py)."""
    if num_workers == 0 or not jobs:
        return None
    largest = max(len(j.paths) for j in jobs)
    return max(1, -(-largest // num_workers))


def _facts_now(path: str | Member) -> Facts | None:
    """The facts of what is about to be read; None when the file cannot be stat'ed (its decode fails and says why)."""
    try:
        return facts_of(path)
    except OSError:
        return None


def _identity(x: DecodedBatch) -> DecodedBatch:
    return x


def make_loader(
    jobs: Sequence[BatchJob],
    recipe: Recipe,
    num_workers: int,
    pin_memory: bool,
    timeout_s: float = 0,
    split: bool = True,
) -> DataLoader:
    """In-order loader of decode tasks (the tasks of a batch, and the batches of a shard, arrive consecutively),
    enough tasks ahead per worker for about two of the largest batches in flight. `split`: batches are split into
    tasks (`task_images`); a CUDA run splits (its tasks are joined on the device, after asynchronous copies), a CPU
    run does not (the join would be a host copy in the main process: 2 ms of its CPU per image at 512^2 on a 2-core
    VM, taken from the workers, benchmarks/loader.py). `timeout_s` turns a worker stuck on one file (a hung network
    mount) into an error instead of a silent stall: the run stops, finished shards are kept, and a rerun resumes."""
    per_task = task_images(jobs, num_workers) if split else None
    largest = max((len(j.paths) for j in jobs), default=1)
    ahead = max(4, -(-2 * largest // (max(1, num_workers) * (per_task or largest))))
    return DataLoader(
        BatchDecodeDataset(jobs, recipe, per_task),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        prefetch_factor=ahead if num_workers > 0 else None,
        persistent_workers=False,
        timeout=timeout_s if num_workers > 0 else 0,
    )
