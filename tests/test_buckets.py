"""Bucket tables, assignment and fit mode: tables of cases plus properties (hypothesis)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinofeat.buckets import (
    Bucket,
    BucketSpec,
    BucketSpecError,
    area_bound,
    aspects,
    assign,
    fit_size,
    in_range,
    load_spec,
    make_buckets,
    nearest_bucket,
    round_to_multiple,
    size_for_aspect,
    table_document,
    table_rows,
)

SPECS = [
    BucketSpec(),
    BucketSpec(area=512),
    BucketSpec(area=768),
    BucketSpec(area=518, multiple=14),
    BucketSpec(area=1024, multiple=14),
    BucketSpec(area=256, multiple=16),
    BucketSpec(area=1024, multiple=64),  # e.g. VAE 8 x DiT patch 2 x 4
    BucketSpec(area=512, multiple=16, min_ar=0.5, max_ar=2.0, num_buckets=9),
    BucketSpec(area=1024, num_buckets=1),
]


@pytest.mark.parametrize(
    ("x", "m", "want"),
    [
        (0, 16, 16),
        (7.9, 16, 16),
        (8, 16, 16),
        (23.99, 16, 16),
        (24, 16, 32),
        (1024, 16, 1024),
        (20.9, 14, 14),
        (21, 14, 28),
        (517.9, 14, 518),
    ],
)
def test_round_to_multiple(x, m, want):
    assert round_to_multiple(x, m) == want


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.to_json())
def test_every_side_is_a_multiple_and_area_within_bound(spec):
    table = make_buckets(spec)
    assert table, "empty table"
    for a in aspects(spec):
        b = size_for_aspect(a, spec)
        assert b in table
        assert abs(b.width * b.height - spec.target_pixels) <= area_bound(a, spec) + 1e-6
    for b in table:
        assert b.width % spec.multiple == 0 and b.height % spec.multiple == 0
        assert b.width >= spec.multiple and b.height >= spec.multiple


@pytest.mark.parametrize("spec", SPECS[:7], ids=lambda s: s.to_json())
def test_default_aspect_range_areas_within_7_percent(spec):
    """The practical statement: for the default 1:4..4:1 range every bucket's area is within 7% of the target
    when the multiple is at most 1/8 of the area side (the worst case is the short side of a 4:1 bucket)."""
    if spec.multiple * 8 > spec.area:
        pytest.skip("coarse multiple")
    for b in make_buckets(spec):
        assert abs(b.width * b.height / spec.target_pixels - 1) <= 0.07


def test_table_is_sorted_and_distinct_and_spans_the_range():
    spec = BucketSpec()
    table = make_buckets(spec)
    assert len(set(table)) == len(table)
    ars = [b.aspect for b in table]
    assert ars == sorted(ars)
    assert table[0] == Bucket(512, 2048) and table[-1] == Bucket(2048, 512)
    assert Bucket(1024, 1024) in table


@pytest.mark.parametrize(
    ("w", "h", "want"),
    [
        (1000, 1000, Bucket(1024, 1024)),
        (4000, 1000, Bucket(2048, 512)),
        (1000, 4000, Bucket(512, 2048)),
        (100000, 10, Bucket(2048, 512)),
        (10, 100000, Bucket(512, 2048)),
        (1920, 1080, None),
    ],
)
def test_nearest_bucket_cases(w, h, want):
    a = nearest_bucket(make_buckets(BucketSpec()), w, h)
    if want is not None:
        assert a.bucket == want
    others = [abs(math.log(b.aspect / (w / h))) for b in make_buckets(BucketSpec())]
    assert a.distortion == pytest.approx(min(others))


def test_ties_go_to_the_lower_index():
    table = (Bucket(32, 16), Bucket(16, 32))  # aspects 2 and 1/2: a square image is equally far from both
    assert nearest_bucket(table, 100, 100).index == 0
    assert nearest_bucket(tuple(reversed(table)), 100, 100).bucket == Bucket(16, 32)


@pytest.mark.parametrize("bad", [(0, 10), (10, 0), (-1, 5)])
def test_assignment_rejects_empty_sizes(bad):
    with pytest.raises(ValueError):
        assign(BucketSpec(), *bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"multiple": 0},
        {"area": 8, "multiple": 16},
        {"min_ar": 2.0},
        {"max_ar": 0.5},
        {"min_ar": 0},
        {"num_buckets": 0},
        {"mode": "crop"},
        {"max_ar": float("inf")},
    ],
)
def test_invalid_specs_raise(kwargs):
    with pytest.raises(BucketSpecError):
        BucketSpec(**kwargs)


@pytest.mark.parametrize(
    ("w", "h", "want"),
    [(1000, 1000, (1024, 1024)), (1600, 900, (1360, 768)), (900, 1600, (768, 1360)), (10000, 100, (2048, 512))],
)
def test_fit_mode_keeps_aspect_and_area(w, h, want):
    spec = BucketSpec(mode="fit")
    a = fit_size(spec, w, h)
    assert (a.bucket.width, a.bucket.height) == want
    assert a.index == -1
    assert assign(spec, w, h) == a


def test_spec_json_round_trip_and_stable_hash():
    spec = BucketSpec(area=768, multiple=14, min_ar=0.5, max_ar=3, num_buckets=17, mode="fit")
    again = BucketSpec.from_dict(json.loads(spec.to_json()))
    assert again == spec and again.hash == spec.hash
    assert BucketSpec(max_ar=4).hash == BucketSpec(max_ar=4.0).hash
    assert BucketSpec().hash != BucketSpec(area=512).hash
    # the hash is sha256 of this canonical JSON: a dataloader in another codebase can recompute it
    canonical = b'{"area":1024,"max_ar":4.0,"min_ar":0.25,"mode":"list","multiple":16,"num_buckets":33,"version":2}'
    assert BucketSpec().hash == hashlib.sha256(canonical).hexdigest()[:16]
    # a version 1 spec (dinofeat <= 0.5) keeps the very hash those caches recorded
    assert BucketSpec(version=1).hash == "53541e25482d10ed" == hashlib.sha256(canonical[:-2] + b"1}").hexdigest()[:16]


def test_spec_from_dict_rejects_unknown_fields_and_versions():
    with pytest.raises(BucketSpecError):
        BucketSpec.from_dict({"area": 512, "bogus": 1})
    with pytest.raises(BucketSpecError):
        BucketSpec.from_dict({"version": 99})


def test_table_rows_for_multiples_16_and_14():
    r16 = table_rows(BucketSpec(area=1024, multiple=16))
    sq = next(r for r in r16 if r["width"] == r["height"])
    assert (sq["grid_h"], sq["grid_w"], sq["tokens"]) == (64, 64, 4096)
    r14 = table_rows(BucketSpec(area=518, multiple=14))
    sq = next(r for r in r14 if r["width"] == r["height"])
    assert (sq["width"], sq["grid_h"], sq["tokens"]) == (518, 37, 37 * 37)
    for r in r14:
        assert r["width"] == 14 * r["grid_w"] and r["height"] == 14 * r["grid_h"]


specs = st.builds(
    BucketSpec,
    area=st.integers(64, 2048),
    multiple=st.sampled_from([8, 14, 16, 32, 64]),
    min_ar=st.floats(0.2, 1.0),
    max_ar=st.floats(1.0, 5.0),
    num_buckets=st.integers(1, 64),
).filter(lambda s: s.area >= 4 * s.multiple)
sides = st.integers(1, 20000)


@settings(max_examples=300, deadline=None)
@given(spec=specs, w=sides, h=sides)
def test_every_image_gets_a_valid_bucket(spec, w, h):
    a = assign(spec, w, h)
    assert a.bucket in make_buckets(spec)
    assert a.bucket.width % spec.multiple == 0 and a.bucket.height % spec.multiple == 0
    assert a.distortion == pytest.approx(abs(math.log(a.bucket.aspect / (w / h))))


@settings(max_examples=300, deadline=None)
@given(spec=specs, w=sides, h=sides)
def test_aspect_error_is_bounded_inside_the_range(spec, w, h):
    """Inside [min_ar, max_ar] the error is at most half the widest gap between neighbouring buckets' log aspect
    ratios, or the distance from a range end to the nearest bucket; the generated spacing keeps that small."""
    ar = w / h
    if not spec.min_ar <= ar <= spec.max_ar:
        return
    logs = [math.log(b.aspect) for b in make_buckets(spec)]
    gaps = [(b - a) / 2 for a, b in itertools.pairwise(logs)]
    ends = [abs(logs[0] - math.log(spec.min_ar)), abs(logs[-1] - math.log(spec.max_ar))]
    bound = max(gaps + ends)
    assert assign(spec, w, h).distortion <= bound + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    spec=specs.map(lambda s: BucketSpec(s.area, s.multiple, s.min_ar, s.max_ar, s.num_buckets, "fit")), w=sides, h=sides
)
def test_fit_mode_sides_and_area(spec, w, h):
    a = assign(spec, w, h)
    assert a.bucket.width % spec.multiple == 0 and a.bucket.height % spec.multiple == 0
    clamped = min(max(w / h, spec.min_ar), spec.max_ar)
    assert abs(a.bucket.width * a.bucket.height - spec.target_pixels) <= area_bound(clamped, spec) + 1e-6


@settings(max_examples=100, deadline=None)
@given(spec=specs)
def test_json_round_trip_property(spec):
    assert BucketSpec.from_dict(json.loads(spec.to_json())) == spec
    assert make_buckets(BucketSpec.from_dict(spec.to_dict())) == make_buckets(spec)


# ---- version 2: sizes inside the aspect range; how a table came to be (issue 23) ---------------------------------
@settings(max_examples=300, deadline=None)
@given(
    area=st.integers(32, 2048),
    multiple=st.sampled_from([8, 14, 16, 32, 64]),
    lo=st.floats(0.2, 1.0),
    hi=st.floats(1.0, 5.0),
    n=st.integers(1, 40),
)
def test_version_2_buckets_stay_in_the_aspect_range_when_the_multiple_allows(area, multiple, lo, hi, n):
    if area < multiple:
        return
    spec = BucketSpec(area, multiple, lo, hi, n)
    old = make_buckets(BucketSpec(area, multiple, lo, hi, n, version=1))
    for a in aspects(spec):
        b, plain = size_for_aspect(a, spec), size_for_aspect(a, BucketSpec(area, multiple, lo, hi, n, version=1))
        if in_range(plain, spec):
            assert b == plain  # version 2 changes only what version 1 put outside the range
        elif b != plain:
            assert in_range(b, spec)
            assert abs(b.width - plain.width) <= multiple and abs(b.height - plain.height) <= multiple
    assert len(make_buckets(spec)) <= len(aspects(spec)) and len(old) <= len(aspects(spec))


@pytest.mark.parametrize(
    ("area", "lo", "hi", "kept"),
    [(1024, 0.5, 2.0, ["720x1440", "1440x720"]), (1024, 0.25, 4.0, []), (256, 0.25, 4.0, [])],
)
def test_rounding_notes_name_merged_and_kept_buckets(area, lo, hi, kept):
    spec = BucketSpec(area, 16, lo, hi, 33)
    notes = table_document(spec)["rounding"]
    assert notes["kept_in_range"] == kept
    assert notes["merged"] == 33 - len(make_buckets(spec)) == notes["aspects"] - notes["buckets"]


def test_a_version_1_spec_rebuilds_the_buckets_it_recorded():
    """Caches of dinofeat <= 0.5 recorded version 1 specs: they keep their tables (and hashes) exactly."""
    recorded = {"version": 1, "area": 1024, "multiple": 16, "min_ar": 0.5, "max_ar": 2.0, "num_buckets": 33,
                "mode": "list"}  # fmt: skip
    spec = load_spec(recorded)
    assert spec.version == 1 and spec.to_dict() == recorded
    assert make_buckets(spec)[0].name == "720x1456"  # outside 0.5..2, as 0.5 planned it
    assert load_spec({k: v for k, v in recorded.items() if k != "version"}).version == 1


def test_load_spec_reads_the_file_buckets_out_writes(tmp_path):
    from typer.testing import CliRunner

    from dinofeat.cli import app

    out = tmp_path / "buckets.json"
    r = CliRunner().invoke(app, ["buckets", "--area", "512", "--min-ar", "0.5", "--max-ar", "2", "--out", str(out)])
    assert r.exit_code == 0 and f"wrote {out}: " in r.output
    spec = load_spec(out)  # a path, as docs/dit-integration.md writes it
    assert spec == load_spec(str(out)) == load_spec(json.loads(out.read_text())) == BucketSpec(512, 16, 0.5, 2.0)
    with pytest.raises(BucketSpecError, match="cannot read a bucket spec"):
        load_spec(tmp_path / "nosuch.json")
