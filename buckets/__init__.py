"""Aspect-ratio buckets shared by feature extraction and DiT training. Pure Python: no torch, no zarr."""

from buckets.assign import Assignment, assign, fit_size, log_distortion, nearest_bucket
from buckets.spec import BucketSpec, BucketSpecError
from buckets.table import Bucket, area_bound, aspects, make_buckets, round_to_multiple, size_for_aspect, table_rows

__all__ = [
    "Assignment",
    "Bucket",
    "BucketSpec",
    "BucketSpecError",
    "area_bound",
    "aspects",
    "assign",
    "fit_size",
    "log_distortion",
    "make_buckets",
    "nearest_bucket",
    "round_to_multiple",
    "size_for_aspect",
    "table_rows",
]
