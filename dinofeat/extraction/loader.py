"""Decode + resize in DataLoader worker processes. One item is one whole batch of one bucket, shipped as uint8."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinofeat.cache.layout import VACANT
from dinofeat.errors import ImageError, SourceChangedError
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
    pixels: torch.Tensor  # [B, H, W, 3] uint8; rows of failed images are zeros
    failed: dict[int, str]  # row -> reason
    changed: dict[int, Facts] = field(default_factory=dict)  # row -> facts of the bytes read, where not as planned

    def pin_memory(self) -> DecodedBatch:
        """Called by DataLoader's pin thread (pin_memory=True) so the host-to-device copy can be asynchronous."""
        return DecodedBatch(self.job, self.pixels.pin_memory(), self.failed, self.changed)


class BatchDecodeDataset(Dataset):
    """Map-style over batch jobs; nothing heavy is held, so it pickles cheaply into workers."""

    def __init__(self, jobs: Sequence[BatchJob], recipe: Recipe) -> None:
        self.jobs = list(jobs)
        self.recipe = recipe

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> DecodedBatch:
        job = self.jobs[i]
        w, h = job.size
        out = np.zeros((len(job.paths), h, w, 3), np.uint8)
        failed: dict[int, str] = {}
        changed: dict[int, Facts] = {}
        for k, path in enumerate(job.paths):
            if path is None:
                failed[job.start + k] = VACANT  # zeros, left out of the statistics, never served
                continue
            try:
                now = _facts_now(path) if job.planned else None
                # an image of other dimensions than planned (replaced since) fails here: resized into this bucket
                # it would be stored with another aspect; the next run plans it again (ImageChangedError)
                out[k] = load_resized(path, job.size, self.recipe, job.sizes[k] if job.sizes else None)
                if now is not None and not same_facts(now, job.planned[k]):
                    changed[job.start + k] = now  # the source changed since planning: the index will say what we read
            except ImageError as e:
                failed[job.start + k] = str(e)
            except SourceChangedError:
                raise  # not this image's fault: the plan no longer fits the source, so the run stops (resumably)
            except Exception as e:  # a decoder bug on one file must not end a multi-hour run
                failed[job.start + k] = f"decode error: {type(e).__name__}: {e}"
        return DecodedBatch(job, torch.from_numpy(out), failed, changed)


def _facts_now(path: str | Member) -> Facts | None:
    """The facts of what is about to be read; None when the file cannot be stat'ed (its decode fails and says why)."""
    try:
        return facts_of(path)
    except OSError:
        return None


def _identity(x: DecodedBatch) -> DecodedBatch:
    return x


def make_loader(
    jobs: Sequence[BatchJob], recipe: Recipe, num_workers: int, pin_memory: bool, timeout_s: float = 0
) -> DataLoader:
    """In-order loader (batches of a shard arrive consecutively), `prefetch_factor` batches ahead per worker.
    `timeout_s` turns a worker stuck on one file (a hung network mount) into an error instead of a silent stall:
    the run stops, finished shards are kept, and a rerun resumes."""
    return DataLoader(
        BatchDecodeDataset(jobs, recipe),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
        timeout=timeout_s if num_workers > 0 else 0,
    )
