"""The plain-JPEG header reader (dinofeat.images.jpeghead) against PIL, which decodes: whenever it answers, PIL opens
the file and reports the same displayed size; it answers for JPEGs as encoders write them (or planning would not be
faster), and leaves to PIL what PIL treats specially."""

from __future__ import annotations

import io
import random
import struct

import pytest
from PIL import Image

from dinofeat.errors import ImageError
from dinofeat.images.decode import DEFAULT_MAX_PIXELS, open_image, oriented_size
from dinofeat.images.jpeghead import HEAD_BYTES, jpeg_size
from dinofeat.images.probe import probe


def _jpeg(size=(40, 24), mode="RGB", **save) -> bytes:
    im = Image.new(mode, size, 128 if mode == "L" else None)
    if mode != "L":
        im = Image.frombytes(
            mode, size, bytes(random.Random(1).randrange(256) for _ in range(size[0] * size[1] * len(mode)))
        )
    buf = io.BytesIO()
    im.save(buf, "JPEG", **save)
    return buf.getvalue()


def _tiff(orientation: int | None, order: str = "<", extra: list[tuple[int, int, int, bytes]] = ()) -> bytes:
    """A TIFF directory as cameras write EXIF: entries (tag, type, count, value or out-of-line bytes), sorted."""
    entries = [(0x0112, 3, 1, struct.pack(order + "H", orientation) + b"\0\0")] if orientation is not None else []
    entries += list(extra)
    entries.sort()
    head = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "L", 8)
    after = 8 + 2 + 12 * len(entries) + 4
    body, blobs = struct.pack(order + "H", len(entries)), b""
    for tag, typ, count, value in entries:
        if len(value) > 4:
            body += struct.pack(order + "HHLL", tag, typ, count, after + len(blobs))
            blobs += value
        else:
            body += struct.pack(order + "HHL", tag, typ, count) + value.ljust(4, b"\0")
    return head + body + struct.pack(order + "L", 0) + blobs


def _with_exif(tiff: bytes, **save) -> bytes:
    return _jpeg(exif=b"Exif\0\0" + tiff, **save)


def _pil(data: bytes) -> tuple[int, int] | str:
    try:
        with open_image(data) as im:
            return oriented_size(im)
    except ImageError as e:
        return f"error: {e}"


def _pil_exif(o: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = o
    return exif.tobytes()


RATIONAL = struct.pack("<LL", 72, 1)
CLEAN = {
    "baseline": _jpeg(),
    "progressive": _jpeg(progressive=True),
    "optimized 4:4:4": _jpeg(optimize=True, subsampling=0),
    "grayscale": _jpeg(mode="L"),
    "cmyk": _jpeg(mode="CMYK"),
    "1x1": _jpeg((1, 1)),
    "odd size": _jpeg((17, 9)),
    "jfif dpi": _jpeg(dpi=(300, 300)),
    "comment": _jpeg(comment=b"made by a camera"),
    "icc profile": _jpeg(icc_profile=b"\0" * 3000),
    "restart markers": _jpeg(restart_marker_blocks=1),
    **{f"PIL exif orientation {o}": _jpeg(exif=_pil_exif(o)) for o in range(1, 9)},
    **{f"camera exif {o} big-endian": _with_exif(_tiff(o, ">")) for o in (1, 3, 6, 8)},
    **{f"camera exif {o} little-endian": _with_exif(_tiff(o, "<")) for o in (2, 5, 7)},
    "exif with rationals and a string": _with_exif(
        _tiff(6, "<", [(0x011A, 5, 1, RATIONAL), (0x0128, 3, 1, b"\2\0"), (0x010F, 2, 12, b"SomeCamera\0\0")])
    ),
    "exif without orientation": _with_exif(_tiff(None, "<", [(0x011A, 5, 1, RATIONAL)])),
    "orientation out of range": _with_exif(_tiff(9, "<")),
    "orientation 0": _with_exif(_tiff(0, ">")),
}


@pytest.mark.parametrize("data", CLEAN.values(), ids=CLEAN.keys())
def test_clean_jpegs_are_read_without_pil_and_agree_with_it(data):
    found = jpeg_size(data[:HEAD_BYTES], DEFAULT_MAX_PIXELS)
    assert found is not None, "a plain JPEG went to PIL: planning would not be faster for it"
    w, h, turn = found
    assert _pil(data) == ((h, w) if turn in (5, 6, 7, 8) else (w, h))


def _xmp_jpeg() -> bytes:
    data = _jpeg()
    xmp = b'http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp + data[2:]


def _mpo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (20, 30))])
    return buf.getvalue()


def _segment(data: bytes, marker: int, body: bytes) -> bytes:
    return data[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body + data[2:]


LEFT_TO_PIL = {
    "xmp (may carry the orientation)": _xmp_jpeg(),
    "mpo": _mpo(),
    "two exif segments": _segment(_with_exif(_tiff(6)), 0xE1, b"Exif\0\0" + _tiff(3)),
    "exif header twice": _with_exif(b"Exif\0\0" + _tiff(6)),
    "exif directory past the end": _with_exif(_tiff(6)[:12]),
    "exif value past the end": _with_exif(_tiff(6, "<", [(0x010F, 2, 400, b"x" * 8)])[:-4]),
    "orientation as a long": _with_exif(_tiff(None, "<", [(0x0112, 4, 1, struct.pack("<L", 6))])),
    "orientation twice": _with_exif(_tiff(6, "<", [(0x0112, 3, 1, b"\3\0")])),
    "a bigtiff header": _with_exif(b"II+\0" + _tiff(6)[4:]),
    "a 12-bit frame": None,  # made below: PIL refuses it
    "lossless frame": None,
    "fill bytes before a marker": None,
    "header past the bytes given": None,
    "not a jpeg": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
    # short segments PIL's own parsers index past the end of (found by the hostile pass: PIL refuses these files)
    "a short JFIF segment": _segment(_jpeg(), 0xE0, b"JFIF\0"),
    "a short ICC chunk header": _segment(_jpeg(), 0xE2, b"ICC_PROFILE\0\x01"),
    "a Photoshop resource cut after its code": _segment(_jpeg(), 0xED, b"Photoshop 3.0\x00" + b"8BIM\x04\x04"),
    "a frame with a partial component entry": None,
    "empty": b"",
}


def _with_frame_bytes(data: bytes, extra: bytes) -> bytes:
    """`extra` bytes appended to the frame header (SOF) segment, its length field grown to match."""
    at = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    length = data[at + 2] << 8 | data[at + 3]
    end = at + 2 + length
    return data[: at + 2] + struct.pack(">H", length + len(extra)) + data[at + 4 : end] + extra + data[end:]


def _patched_frame(data: bytes, marker: int | None = None, precision: int | None = None) -> bytes:
    at = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    out = bytearray(data)
    if marker is not None:
        out[at + 1] = marker
    if precision is not None:
        out[at + 4] = precision
    return bytes(out)


LEFT_TO_PIL["a 12-bit frame"] = _patched_frame(_jpeg(), precision=12)
LEFT_TO_PIL["a frame with a partial component entry"] = _with_frame_bytes(_jpeg(), b"\x01")
LEFT_TO_PIL["lossless frame"] = _patched_frame(_jpeg(), marker=0xC3)
LEFT_TO_PIL["fill bytes before a marker"] = _jpeg()[:2] + b"\xff\xff" + _jpeg()[2:]
LEFT_TO_PIL["header past the bytes given"] = _jpeg(icc_profile=b"\0" * 3000)[:1000]


@pytest.mark.parametrize("data", LEFT_TO_PIL.values(), ids=LEFT_TO_PIL.keys())
def test_what_pil_treats_specially_is_left_to_it(data):
    assert jpeg_size(data, DEFAULT_MAX_PIXELS) is None


def test_a_size_over_the_pixel_limit_is_left_to_pil():
    data = _jpeg((40, 24))
    assert jpeg_size(data, 40 * 24) is not None and jpeg_size(data, 40 * 24 - 1) is None


def _damaged(rng: random.Random, data: bytes) -> bytes:
    """One or a few of the damages real files have: bytes flipped in the header, a cut, a segment length wrong."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4))):
        if len(out) < 8:
            break
        kind = rng.random()
        if kind < 0.5:
            at = rng.randrange(min(len(out), 400))
            out[at] = rng.randrange(256)
        elif kind < 0.7:
            del out[rng.randrange(2, min(len(out), 400)) :]
        elif kind < 0.9:
            at = rng.randrange(2, min(len(out), 400))
            out[at : at + 2] = struct.pack(">H", rng.randrange(65536))
        else:
            at = rng.randrange(2, min(len(out), 400))
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    return bytes(out)


def _agreements(make, n: int) -> int:
    """Check n files from `make()`: wherever the reader answers, PIL reports the same displayed size. Returns how
    many it answered for."""
    answered = 0
    for _ in range(n):
        data = make()
        found = jpeg_size(data[:HEAD_BYTES], DEFAULT_MAX_PIXELS)
        if found is not None:
            answered += 1
            w, h, turn = found
            assert _pil(data) == ((h, w) if turn in (5, 6, 7, 8) else (w, h)), data[:120]
    return answered


def test_damaged_jpegs_agree_with_pil_whenever_answered():
    """Thousands of damaged headers (seeded): where the reader answers, PIL opens the file and reports the same
    displayed size; a file PIL refuses is never given a size."""
    rng = random.Random(29)
    sources = list(CLEAN.values())
    answered = _agreements(lambda: _damaged(rng, rng.choice(sources)), 3000)
    assert answered > 300  # the damage left many headers clean: the comparison had something to compare


def _structured(rng: random.Random, data: bytes) -> bytes:
    """A segment of a kind PIL parses inside (JFIF, ICC, Photoshop, Adobe, EXIF, a comment) with a random body
    length, or a frame header with extra bytes: the damage a byte flip rarely makes, where PIL's parsers fail."""
    if rng.random() < 0.2:
        return _with_frame_bytes(data, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6))))
    marker, head = rng.choice(
        [
            (0xE0, b"JFIF\0"),
            (0xE2, b"ICC_PROFILE\0"),
            (0xED, b"Photoshop 3.0\x00"),
            (0xEE, b"Adobe"),
            (0xE1, b"Exif\0\0"),
            (0xFE, b""),
        ]
    )
    body = head
    if marker == 0xED:
        for _ in range(rng.randrange(3)):
            name = bytes(rng.randrange(256) for _ in range(rng.randrange(3)))
            value = bytes(rng.randrange(256) for _ in range(rng.randrange(20)))
            body += b"8BIM" + rng.choice([b"\x03\xed", b"\x04\x04"]) + bytes([len(name)]) + name
            body += (b"\0" if (len(name) + 1) % 2 else b"") + struct.pack(">L", len(value)) + value
    elif marker == 0xE1:
        body += _tiff(rng.randrange(10), rng.choice("<>"), [(0x011A, 5, 1, RATIONAL)])
    body += bytes(rng.randrange(256) for _ in range(rng.randrange(4)))
    return _segment(data, marker, body[: rng.randrange(len(body) + 1)])


def test_segments_pil_parses_inside_agree_with_pil_whenever_answered():
    """Segments of the kinds PIL's JPEG parser reads into (seeded, cut at random lengths): where the reader answers,
    PIL opens the file with the same displayed size."""
    rng = random.Random(7)
    assert _agreements(lambda: _structured(rng, rng.choice(list(CLEAN.values()))), 3000) > 1000


@pytest.mark.parametrize("name", ["PIL exif orientation 6", "icc profile", "xmp"])
def test_probe_agrees_with_pil_for_files_and_tar_members(tmp_path, name):
    import tarfile

    data = _xmp_jpeg() if name == "xmp" else CLEAN[name]
    (tmp_path / "a.jpg").write_bytes(data)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        tar.add(tmp_path / "a.jpg", "a.jpg")
    from dinofeat.sources.discover import discover

    src = discover(str(tmp_path / "s.tar"))
    want = _pil(data)
    for loc in (str(tmp_path / "a.jpg"), src.location(0)):
        p = probe(loc)
        assert p.error is None and (p.width, p.height) == want
