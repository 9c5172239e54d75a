"""Tar shards as other tools write them (issue 32.1): webdataset's TarWriter, Python's `tarfile.add`, GNU tar in
its gnu and posix formats, bsdtar. Pax writers keep a fractional mtime and long or non-ASCII names in extended
headers and put a rounded (tarfile) or truncated (GNU, bsdtar) mtime and a shortened name in the member's own
header block; the listing and the per-read check must agree on every one, and still catch another member at the
same offset."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from dinofeat.extraction.run import extract
from dinofeat.inspection.validate import validate
from dinofeat.read.reader import FeatureCache
from dinofeat.sources.archive import Member, header_mismatch, list_images, names_agree
from dinofeat.sources.discover import IMAGE_EXTENSIONS
from tests.helpers import FAST, assert_same_pairs, png_bytes

LONG_DIR = "d" * 120  # a folder name no ustar header holds: bsdtar drops it from the header block
NAMES = [  # (name in the tar and in the folder, image size)
    "000000.png",
    "000001.png",
    f"{LONG_DIR}/000002.png",
    "y" * 110 + ".png",  # a file name over 100 bytes
    "bébé-çà.png",  # non-ASCII: tarfile's pax header block spells it 'b?b?-??.png'
    "üü" * 30 + ".png",  # non-ASCII and over 100 bytes in UTF-8
    "000006.seg.png",  # webdataset's multi-dot suffix: key 000006
]
SIZES = [(64, 48), (48, 64), (64, 64), (80, 60), (64, 48), (48, 64), (64, 64)]
FRACTION_NS = 700_000_000  # >= 0.5 s: tarfile rounds up in the header block, GNU tar and bsdtar truncate


def _folder(root: Path) -> Path:
    """The images as files, each with a fractional mtime (what `tarfile.add` and `tar` then store)."""
    root.mkdir(parents=True)
    for i, (name, (w, h)) in enumerate(zip(NAMES, SIZES, strict=True)):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(png_bytes(w, h, 50 + i))
        os.utime(p, ns=(time.time_ns(), (1_700_000_000 + i) * 10**9 + FRACTION_NS))
    return root


def _webdataset(folder: Path, tar: Path) -> None:
    """As webdataset's TarWriter writes a sample (its facts: a stream in "w|" mode, the default pax format,
    mtime = time.time() per member, mode 0o444, uname/gname "bigdata"), with a caption beside each image."""
    with tarfile.open(tar, "w|") as tf:
        for name in NAMES:
            for member, data in ((name, (folder / name).read_bytes()), (name.split(".", 1)[0] + ".txt", b"caption")):
                ti = tarfile.TarInfo(member)
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), time.time(), 0o444, "bigdata", "bigdata"
                tf.addfile(ti, io.BytesIO(data))


def _tarfile_add(folder: Path, tar: Path) -> None:
    with tarfile.open(tar, "w") as tf:  # the default format: pax
        for name in NAMES:
            tf.add(folder / name, arcname=name)


def _tarfile_add_dot(folder: Path, tar: Path) -> None:
    """Names spelled './name', as `tar -C folder -cf x.tar .` writes them (the header block keeps the './')."""
    with tarfile.open(tar, "w") as tf:
        for name in NAMES:
            tf.add(folder / name, arcname=f"./{name}")


def _system_tar_dot(*args: str):
    def write(folder: Path, tar: Path) -> None:
        subprocess.run([*args, "-cf", str(tar), "-C", str(folder), "."], check=True, capture_output=True)

    return write


def _system_tar(*args: str):
    def write(folder: Path, tar: Path) -> None:
        subprocess.run([*args, "-cf", str(tar), "-C", str(folder), *NAMES], check=True, capture_output=True)

    return write


WRITERS = {
    "webdataset": _webdataset,
    "tarfile.add": _tarfile_add,
    "tarfile.add ./names": _tarfile_add_dot,
    "gnu tar -C folder .": _system_tar_dot("tar", "--format=posix"),
    "gnu tar --format=gnu": _system_tar("tar", "--format=gnu"),
    "gnu tar --format=posix": _system_tar("tar", "--format=posix"),
    "bsdtar": _system_tar("bsdtar"),
    "bsdtar --format=pax": _system_tar("bsdtar", "--format=pax"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dinov3_path) -> tuple[Path, Path]:
    """The images as a folder and the cache made from it."""
    root = tmp_path_factory.mktemp("tar-writers")
    folder = _folder(root / "images")
    extract(folder, root / "from-folder", model=str(dinov3_path), area=64, **FAST)
    return folder, root / "from-folder"


@pytest.mark.parametrize("writer", list(WRITERS))
def test_tars_from_common_writers_extract_resume_and_validate(writer, reference, tmp_path, dinov3_path):
    tool = WRITERS[writer]
    binary = writer.split()[0]
    if binary in ("tar", "bsdtar") and shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (the committed bsdtar shard below is tested everywhere)")
    folder, from_folder = reference
    tar = tmp_path / "shard-000000.tar"
    tool(folder, tar)
    cache = tmp_path / "cache"
    s = extract(str(tar), cache, model=str(dinov3_path), area=64, **FAST)
    assert (s.done, s.failed, s.sealed) == (len(NAMES), 0, True)
    pairs = {f"shard-000000/{n.split('.', 1)[0]}": n for n in NAMES}
    assert set(FeatureCache(cache).keys()) == set(pairs)
    assert_same_pairs(FeatureCache(cache), FeatureCache(from_folder), pairs)
    assert extract(str(tar), cache, model=str(dinov3_path), area=64, **FAST).processed == 0  # a rerun: nothing to do
    report = validate(cache, images=str(tar), recompute=2, progress=False)
    assert report.ok, report.problems


def test_a_shard_written_by_bsdtar_on_another_machine(tmp_path, dinov3_path):
    """tests/data/bsdtar-pax.tar was made by bsdtar 3.6.2 (`bsdtar --format=pax -cf`) from three PNGs with
    fractional mtimes, a long folder name and a non-ASCII name, so this runs where bsdtar is not installed."""
    tar = Path(__file__).parent / "data" / "bsdtar-pax.tar"
    s = extract(str(tar), tmp_path / "c", model=str(dinov3_path), area=64, **FAST)
    assert (s.done, s.failed) == (3, 0)
    report = validate(tmp_path / "c", images=str(tar), recompute=3, progress=False)
    assert report.ok, report.problems


@pytest.mark.parametrize("writer", ["tarfile.add", "gnu tar --format=posix", "bsdtar --format=pax"])
def test_the_read_check_still_refuses_another_member_at_the_same_offset(writer, tmp_path):
    """Every member of a shard listed, then the shard rewritten with each member's bytes swapped for the next
    one's of the same size (other names, same offsets): each read must be refused."""
    if writer.startswith("bsdtar") and shutil.which("bsdtar") is None:
        pytest.skip("bsdtar is not installed")
    folder = tmp_path / "images"
    folder.mkdir()
    data = png_bytes(32, 32, 1)
    for name in NAMES:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)  # one size for all: only the name tells members apart
        os.utime(p, ns=(0, 1_700_000_000 * 10**9 + FRACTION_NS))
    tar = tmp_path / "s.tar"
    WRITERS[writer](folder, tar)
    listed = list_images(str(tar), IMAGE_EXTENSIONS)
    with tarfile.open(tar) as tf:
        blocks = {m.name: _block(tar, m.offset_data) for m in tf.getmembers() if m.isreg()}
    names = sorted(m.name for m in listed.values())
    for m in listed.values():
        assert header_mismatch(blocks[m.name], m) is None
        other = names[(names.index(m.name) + 1) % len(names)]
        why = header_mismatch(blocks[other], m)
        assert why is not None and "is now" in why, (m.name, other)


def _block(tar: Path, offset_data: int) -> bytes:
    with open(tar, "rb") as f:
        f.seek(offset_data - 512)
        return f.read(512)


NAME_CASES = [  # (name in the header block, planned name or key, agrees)
    ("000001.png", "000001.png", True),
    ("000001.png", "000001", True),
    ("000002.png", "000001", False),
    ("000001.png", "000001.png.bak", False),
    ("b?b?.png", "bébé.png", True),  # tarfile: '?' for each non-ASCII character
    ("b?b?.png", "bébé", True),
    ("baba.png", "bébé.png", False),
    ("?" * 60 + ".png", "üü" * 30 + ".png", True),
    ("?" * 100, "y" * 110 + ".png", False),  # '?' stands for non-ASCII characters only
    ("çà-" + "ü" * 47 + "\udcc3", "çà-" + "ü" * 50 + ".png", True),  # bsdtar cut inside a UTF-8 character
    ("y" * 100, "y" * 110 + ".png", True),  # truncated at 100 bytes
    ("y" * 98, "y" * 110, True),  # bsdtar cuts earlier
    ("000002.png", f"{LONG_DIR}/000002", True),  # bsdtar drops folders that do not fit
    ("000003.png", f"{LONG_DIR}/000002", False),
    ("x" + "y" * 99, "y" * 110 + ".png", False),
    # another member, not a shortening (a review's cases: subsequences of the planned name)
    ("猫_002.png", "猫_0012.png", False),
    ("?_002.png", "猫_0012.png", False),
    ("?_1.jpg", "犬_123.jpg", False),
    ("0.jpg", f"{LONG_DIR}/000123.jpg", False),
    ("img_12.jpg", "p" * 90 + "/img_123.jpg", False),
    ("??.jpg", "猫猫猫.jpg", False),
    ("?" * 10, "ü" * 60 + ".png", False),  # too short to be a cut at the block's length
    ("b?b?", "bébé.png", False),
    # './' before the name (tar -C dir .): the planned key never has it (found by the review)
    ("./" + "y" * 98, "y" * 110, True),
    ("./b?b?.png", "bébé", True),
    ("./" + "?" * 60 + ".png", "üü" * 30, True),
    (".//x/./" + "y" * 93, "x/" + "y" * 110, True),
    ("./" + "y" * 98, "z" * 110, False),
    # a name in another encoding (tarfile gives its bytes as surrogates): its key spells them \xNN
    ("caf\udce9.png", "caf\\xe9", True),
    ("caf\udce9.png", "caf\\xe9.png", True),
    ("caf\udce9.png", "cafe", False),
]


@pytest.mark.parametrize(("stored", "planned", "agrees"), NAME_CASES)
def test_names_agree(stored, planned, agrees):
    assert names_agree(stored, planned) is agrees


def test_member_mtime_is_the_header_blocks_own(tmp_path):
    """What the listing records is what the read compares: tarfile rounds 0.7 s up in the block."""
    p = tmp_path / "a.png"
    p.write_bytes(png_bytes(8, 8, 0))
    os.utime(p, ns=(0, 1_700_000_000 * 10**9 + FRACTION_NS))
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        tf.add(p, arcname="a.png")
    (m,) = list_images(str(tmp_path / "a.tar"), IMAGE_EXTENSIONS).values()
    assert m.mtime_ns == 1_700_000_001 * 10**9
    assert isinstance(m, Member) and header_mismatch(_block(tmp_path / "a.tar", m.offset), m) is None


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_member_names_in_another_encoding_are_keyed_as_files_of_that_name_are(fmt, tmp_path, dinov3_path):
    """A tar written with latin-1 names (an old tool, another locale): the listing gives their bytes as surrogates,
    which the cache cannot store (zarr refused them: the run crashed after creating the cache's folder, found by the
    hostile pass). Each undecodable byte is spelled \\xNN in the key, as for a file of that name; the run extracts,
    resumes and validates, long names (a GNU long-name block, its header's copy cut at 100 bytes) included."""
    names = ["caf\xe9.png", "plain.png", "\xe9t\xe9/" + "n" * 110 + ".png"]
    tar = tmp_path / "shard-000000.tar"
    with tarfile.open(tar, "w", format=fmt, encoding="latin-1") as tf:
        for i, name in enumerate(names):
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                continue
            data = png_bytes(64, 48, i)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    cache = tmp_path / "cache"
    s = extract(str(tar), cache, model=str(dinov3_path), area=64, **FAST)
    want = {"shard-000000/caf\\xe9", "shard-000000/plain"}
    if fmt == tarfile.GNU_FORMAT:
        want.add("shard-000000/\\xe9t\\xe9/" + "n" * 110)
    assert (s.done, s.failed, s.sealed) == (len(want), 0, True)
    assert set(FeatureCache(cache).keys()) == want
    assert extract(str(tar), cache, model=str(dinov3_path), area=64, **FAST).processed == 0
    assert validate(cache, images=str(tar), progress=False).ok
