"""Aspect-ratio buckets shared by feature extraction and DiT training. Pure Python: no torch, no zarr."""

from dinofeat.buckets.assign import Assignment, assign, fit_size, log_distortion, nearest_bucket
from dinofeat.buckets.spec import (
    AnySpec,
    BucketSpec,
    BucketSpecError,
    TiedSpec,
    load_spec,
    min_tied_multiple,
    parse_scale,
    spec_for,
)
from dinofeat.buckets.table import (
    Bucket,
    area_bound,
    aspects,
    in_range,
    make_buckets,
    round_to_multiple,
    rounding_notes,
    size_for_aspect,
    table_document,
    table_rows,
    tied_table_rows,
)

__all__ = [
    "AnySpec",
    "Assignment",
    "Bucket",
    "BucketSpec",
    "BucketSpecError",
    "TiedSpec",
    "area_bound",
    "aspects",
    "assign",
    "fit_size",
    "in_range",
    "load_spec",
    "log_distortion",
    "make_buckets",
    "min_tied_multiple",
    "nearest_bucket",
    "parse_scale",
    "round_to_multiple",
    "rounding_notes",
    "size_for_aspect",
    "spec_for",
    "table_document",
    "table_rows",
    "tied_table_rows",
]
