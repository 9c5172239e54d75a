"""The displayed size of a plain JPEG from its first bytes, without PIL: planning probes every image's header, and
PIL's JPEG parser (every marker, every quantisation table, in Python) was most of a probe's time (~30 us of ~40).

It must agree with what PIL reports (the decoder uses PIL, and a size that differs from the plan fails the image as
changed), so it answers only for the common, clean layout and returns None for anything else, which PIL then
probes as before: a marker PIL handles specially (MPO's MPF, XMP, which may carry an orientation, several EXIF
segments, SOF types but baseline, extended and progressive), fill bytes or junk between markers, a segment that runs
past the bytes given, a size PIL would refuse, and EXIF that is not a clean little or big-endian TIFF directory (PIL
may then fail the file or ignore the orientation). tests/test_jpeghead.py checks agreement on JPEGs as encoders
write them and on thousands of damaged ones."""

from __future__ import annotations

import struct

HEAD_BYTES = 1 << 16  # the most a probe reads for it: a JPEG's header with EXIF and a thumbnail fits in 64 KB
JPEG = b"\xff\xd8\xff"

_SOF = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman)
_SKIPPED = {0xC4, 0xDD, 0xFE}  # DHT, DRI, COM: PIL reads past them
_EXIF = b"Exif\0\0"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
# TIFF field types PIL reads, and their unit sizes (PIL's ImageFileDirectory_v2._load_dispatch)
_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
_ORIENTATION = 0x0112


def jpeg_size(head: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation 1-8) of the JPEG whose first bytes are `head`, as PIL would report them;
    None when this is not a clean JPEG header wholly inside `head` (PIL decides), or its pixels exceed `max_pixels`
    (PIL's path words that error)."""
    if not head.startswith(JPEG):
        return None
    pos, size, exif = 2, None, None
    n = len(head)
    while True:
        if pos + 4 > n or head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        length = head[pos + 2] << 8 | head[pos + 3]
        end = pos + 2 + length
        if length < 2 or end > n:
            return None
        if marker == 0xDA:  # start of scan: the header is over (PIL reads this segment too)
            break
        body = head[pos + 4 : end]
        if marker in _SOF:  # PIL reads the component list 3 bytes at a time: a partial entry fails it
            if size is not None or len(body) < 6 or (len(body) - 6) % 3 or body[0] != 8 or body[5] not in (1, 3, 4):
                return None
            size = (body[3] << 8 | body[4], body[1] << 8 | body[2])
        elif marker == 0xDB:
            if not _tables_whole(body):
                return None
        elif 0xE0 <= marker <= 0xEF:
            if marker == 0xE1 and body.startswith(_EXIF):
                if exif is not None:
                    return None
                exif = body[len(_EXIF) :]
            elif not _app_reads_in_pil(marker, body):
                return None
        elif marker not in _SKIPPED:
            return None
        pos = end
    if size is None or size[0] <= 0 or size[1] <= 0 or size[0] * size[1] > max_pixels:
        return None
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and size[0] * size[1] > 2 * Image.MAX_IMAGE_PIXELS:
        return None
    orientation = 1 if exif is None else _orientation(exif)
    return None if orientation is None else (*size, orientation)


def _app_reads_in_pil(marker: int, body: bytes) -> bool:
    """Whether PIL's APP handler reads this segment as it reads a plain one (so its answer is ours): not XMP (it may
    carry the orientation) or MPO's MPF (another image class), and none of the short segments PIL's parsers index
    past the end of (JFIF, Adobe, an ICC chunk header, a Photoshop resource list)."""
    if (marker == 0xE1 and body.startswith(_XMP)) or (marker == 0xE2 and body.startswith(b"MPF\0")):
        return False
    if marker == 0xE0 and body.startswith(b"JFIF"):
        return len(body) >= 7
    if marker == 0xEE and body.startswith(b"Adobe"):
        return len(body) >= 7
    if marker == 0xE2 and body.startswith(b"ICC_PROFILE\0"):
        return len(body) >= 14
    if marker == 0xED and body.startswith(b"Photoshop 3.0\x00"):
        return _photoshop_reads(body)
    return True


def _photoshop_reads(body: bytes) -> bool:
    """PIL walks a Photoshop segment's 8BIM resources and stops quietly at a short field, except the name length
    byte, which it indexes: past the end, the open fails. Walked as PIL walks it."""
    at = 14
    while body[at : at + 4] == b"8BIM":
        at += 4
        if at + 2 > len(body):
            return True  # PIL: struct.error, caught
        at += 2
        if at >= len(body):
            return False  # PIL: IndexError, not caught
        at += 1 + body[at]
        at += at & 1
        if at + 4 > len(body):
            return True
        size = int.from_bytes(body[at : at + 4], "big")
        at += 4 + size  # a short ResolutionInfo is a struct.error in PIL: caught
        at += at & 1
    return True


def _tables_whole(body: bytes) -> bool:
    """Every quantisation table of a DQT segment is complete (PIL refuses the file otherwise)."""
    at = 0
    while at < len(body):
        at += 1 + (64 if body[at] >> 4 == 0 else 128)
        if at > len(body):
            return False
    return True


def _orientation(tiff: bytes) -> int | None:
    """The orientation in EXIF's first directory (1 without one, or out of range); None when the directory is not
    clean: a header other than classic TIFF, a directory or value outside the data, the tag of another type."""
    if tiff.startswith(_EXIF) or len(tiff) < 8:
        return None
    if tiff[:4] == b"II*\0":
        end = "<"
    elif tiff[:4] == b"MM\0*":
        end = ">"
    else:
        return None
    (ifd,) = struct.unpack_from(end + "L", tiff, 4)
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(end + "H", tiff, ifd)
    if ifd + 2 + 12 * count + 4 > len(tiff):
        return None
    value, total, seen = 1, 0, False
    for k in range(count):
        tag, typ, n, where = struct.unpack_from(end + "HHLL", tiff, ifd + 2 + 12 * k)
        if typ not in _UNIT:  # PIL skips a type it does not know
            if tag == _ORIENTATION:
                return None
            continue
        size = n * _UNIT[typ]
        if size > 4:
            total += size
            if where + size > len(tiff) or total > len(tiff):
                return None
        if tag == _ORIENTATION:
            if seen or typ != 3 or n != 1:
                return None
            seen = True
            (got,) = struct.unpack_from(end + "H", tiff, ifd + 2 + 12 * k + 8)
            value = got if 1 <= got <= 8 else 1
    return value
