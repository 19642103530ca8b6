"""Factory of test images built with QEMU's own tools (qemu-img, qemu-io,
qemu-system-x86_64).

These images are the oracle corpus: qcow2engine's ``info``, ``check``,
``map``, ``compare`` and ``convert -O raw`` must agree with qemu-img on each.
Nothing here imports qcow2engine; the few raw byte edits (leaks, wild L2
entry, unknown header extension) are done with :mod:`struct` directly on the
file, following docs/interop/qcow2.rst.

Usage::

    from tests.helpers.images import VARIANTS, Variant
    for v in VARIANTS:
        img = v.build(tmp_path / v.name)

Every builder creates its image (and backing / data files) inside the given
directory, runs the QEMU tools with ``cwd`` set to that directory and with
relative file names, and returns the path of the top image.

qemu-img 7.2 quirk worth knowing: a *relative* external data file name
(``data_file=data.bin``) is resolved against the process' current directory,
not against the image's directory (unlike backing file names).  Variants with
``run_in_image_dir=True`` must therefore be examined with
``cwd=image.parent``; ``qemu-img check/map/convert`` fail with
"Could not open 'data.bin'" otherwise (``qemu-img info`` still works).
"""
from __future__ import annotations

import os
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from .qemu import QEMU_IMG, QEMU_SYSTEM, qemu_img_info, qemu_io, run

__all__ = [
    "Variant", "VARIANTS", "VARIANTS_BY_NAME", "create_image", "read_header",
    "read_extensions", "write_extensions", "set_refcount", "get_refcount",
    "l2_entry_file_offset", "build_savevm_image", "variant_params",
]

KiB = 1024
MiB = 1024 * KiB


def create_image(dirpath: Path, name: str, size: int | str, *, fmt: str = "qcow2",
                 opts: str | None = None, backing: str | None = None,
                 backing_fmt: str = "qcow2") -> Path:
    """``qemu-img create -q -f FMT [-b BACKING -F BACKING_FMT] [-o OPTS] NAME SIZE`` run in
    dirpath; returns dirpath / name."""
    args: list[Any] = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    if opts:
        args += ["-o", opts]
    args += [name, size]
    run(*args, cwd=dirpath)
    return Path(dirpath) / name


def _mkdir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------
# Raw byte level helpers (qcow2 header, extensions, refcounts, L2 entries)
# --------------------------------------------------------------------------

_V2_FMT = ">4sIQIIQIIQQIIQ"          # 72 bytes
_V3_FMT = ">QQQII"                   # 32 more bytes (offset 72..104)


def read_header(path: str | os.PathLike) -> dict[str, int]:
    with open(path, "rb") as f:
        buf = f.read(512)
    (magic, version, backing_file_offset, backing_file_size, cluster_bits,
     size, crypt_method, l1_size, l1_table_offset, refcount_table_offset,
     refcount_table_clusters, nb_snapshots, snapshots_offset
     ) = struct.unpack_from(_V2_FMT, buf, 0)
    if magic != b"QFI\xfb":
        raise ValueError(f"{path}: not a qcow2 image")
    hdr = dict(version=version, backing_file_offset=backing_file_offset,
               backing_file_size=backing_file_size, cluster_bits=cluster_bits,
               size=size, crypt_method=crypt_method, l1_size=l1_size,
               l1_table_offset=l1_table_offset,
               refcount_table_offset=refcount_table_offset,
               refcount_table_clusters=refcount_table_clusters,
               nb_snapshots=nb_snapshots, snapshots_offset=snapshots_offset,
               incompatible_features=0, compatible_features=0,
               autoclear_features=0, refcount_order=4, header_length=72)
    if version >= 3:
        (hdr["incompatible_features"], hdr["compatible_features"],
         hdr["autoclear_features"], hdr["refcount_order"],
         hdr["header_length"]) = struct.unpack_from(_V3_FMT, buf, 72)
    hdr["cluster_size"] = 1 << cluster_bits
    return hdr


def read_extensions(path: str | os.PathLike) -> list[tuple[int, bytes]]:
    """Header extensions (type, data) up to, not including, the end marker."""
    hdr = read_header(path)
    cs = hdr["cluster_size"]
    with open(path, "rb") as f:
        cluster0 = f.read(cs)
    off = hdr["header_length"]
    exts: list[tuple[int, bytes]] = []
    while off + 8 <= cs:
        etype, elen = struct.unpack_from(">II", cluster0, off)
        if etype == 0:
            break
        exts.append((etype, cluster0[off + 8: off + 8 + elen]))
        off += 8 + ((elen + 7) & ~7)
    return exts


def write_extensions(path: str | os.PathLike,
                     exts: list[tuple[int, bytes]]) -> None:
    """Rewrite the header extension area of cluster 0 with ``exts``.

    The backing file name (if any) is moved to just after the end marker and
    backing_file_offset is updated.  Only for version 3 images.
    """
    hdr = read_header(path)
    if hdr["version"] < 3:
        raise ValueError("header extensions need a version 3 image here")
    cs = hdr["cluster_size"]
    with open(path, "r+b") as f:
        backing = b""
        if hdr["backing_file_offset"]:
            f.seek(hdr["backing_file_offset"])
            backing = f.read(hdr["backing_file_size"])
        area = bytearray()
        for etype, data in exts:
            area += struct.pack(">II", etype, len(data)) + data
            area += b"\0" * (-len(data) % 8)
        area += b"\0" * 8                      # end-of-extensions marker
        start = hdr["header_length"]
        backing_off = start + len(area) if backing else 0
        area += backing
        if start + len(area) > cs:
            raise ValueError("extensions do not fit in cluster 0")
        f.seek(start)
        f.write(bytes(area) + b"\0" * (cs - start - len(area)))
        f.seek(8)
        f.write(struct.pack(">Q", backing_off))


def _set_header_u64(path: str | os.PathLike, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def _refcount_location(path: str | os.PathLike, cluster_index: int
                       ) -> tuple[int, int, int]:
    """(file offset of the refcount block, entry index, refcount width)."""
    hdr = read_header(path)
    cs = hdr["cluster_size"]
    bits = 1 << hdr["refcount_order"]
    per_block = cs * 8 // bits
    rt_index, rb_index = divmod(cluster_index, per_block)
    with open(path, "rb") as f:
        f.seek(hdr["refcount_table_offset"] + 8 * rt_index)
        (rb_off,) = struct.unpack(">Q", f.read(8))
    rb_off &= ~0x1FF & (2**64 - 1)
    if rb_off == 0:
        raise ValueError(f"no refcount block covers cluster {cluster_index}")
    return rb_off, rb_index, bits


def _refcount_field(idx: int, bits: int) -> tuple[int, int, int]:
    """(byte offset in the block, number of bytes, bit shift) of entry idx.

    Widths >= 8 are big-endian integers of ``bits`` bits; sub-byte widths
    are packed into bytes starting at the least significant bit.
    """
    if bits >= 8:
        return idx * bits // 8, bits // 8, 0
    return idx * bits // 8, 1, idx * bits % 8


def get_refcount(path: str | os.PathLike, cluster_index: int) -> int:
    rb_off, idx, bits = _refcount_location(path, cluster_index)
    boff, nbytes, shift = _refcount_field(idx, bits)
    with open(path, "rb") as f:
        f.seek(rb_off + boff)
        raw = int.from_bytes(f.read(nbytes), "big")
    return (raw >> shift) & ((1 << bits) - 1)


def set_refcount(path: str | os.PathLike, cluster_index: int, value: int
                 ) -> None:
    """Poke the on-disk refcount of one host cluster (any refcount width)."""
    rb_off, idx, bits = _refcount_location(path, cluster_index)
    mask = (1 << bits) - 1
    if not 0 <= value <= mask:
        raise ValueError("refcount out of range for width")
    boff, nbytes, shift = _refcount_field(idx, bits)
    with open(path, "r+b") as f:
        f.seek(rb_off + boff)
        raw = int.from_bytes(f.read(nbytes), "big")
        raw = (raw & ~(mask << shift)) | (value << shift)
        f.seek(rb_off + boff)
        f.write(raw.to_bytes(nbytes, "big"))


def l2_entry_file_offset(path: str | os.PathLike, guest_offset: int) -> int:
    """File offset of the (first 8 bytes of the) L2 entry for guest_offset."""
    hdr = read_header(path)
    cs = hdr["cluster_size"]
    extended = bool(hdr["incompatible_features"] & (1 << 4))
    entry_size = 16 if extended else 8
    l2_entries = cs // entry_size
    cluster = guest_offset // cs
    l1_index, l2_index = divmod(cluster, l2_entries)
    with open(path, "rb") as f:
        f.seek(hdr["l1_table_offset"] + 8 * l1_index)
        (l1e,) = struct.unpack(">Q", f.read(8))
    l2_off = l1e & 0x00FFFFFFFFFFFE00
    if l2_off == 0:
        raise ValueError(f"no L2 table for guest offset {guest_offset}")
    return l2_off + entry_size * l2_index


# --------------------------------------------------------------------------
# Variant description
# --------------------------------------------------------------------------

@dataclass
class Variant:
    """One test image recipe.

    ``build(dir)`` creates the image (plus backing/data files) inside ``dir``
    and returns the path of the top image.  The flags below were filled in
    from what qemu-img 7.2 actually reports for the built image (and are
    re-verified by tests/interop/test_images_factory.py).
    """
    name: str
    build: Callable[[Path], Path]
    fmt: str = "qcow2"
    # qemu-img check exit code: 0 clean, 2 corruptions, 3 leaks only,
    # 63 = "This image format does not support checks" (raw).
    expect_check_rc: int = 0
    has_backing: bool = False
    backing_depth: int = 0            # number of images below the top one
    has_data_file: bool = False
    has_snapshots: bool = False
    has_vmstate: bool = False
    has_bitmaps: bool = False
    compressed: bool = False
    dirty: bool = False               # "dirty-flag": true in qemu-img info
    slow: bool = False                # boots qemu-system-x86_64
    # Relative data_file names are resolved against the CWD by qemu 7.2:
    # run qemu tools on this image with cwd=image.parent.
    run_in_image_dir: bool = False
    # dotted-path -> expected value in `qemu-img info --output=json`
    expect_info: dict[str, Any] = field(default_factory=dict)
    # expected non-zero counters of `qemu-img check --output=json`
    expect_check: dict[str, int] = field(default_factory=dict)

    def __repr__(self) -> str:          # short ids in pytest output
        return f"Variant({self.name})"

    @property
    def marks(self) -> tuple:
        """pytest marks of a test on this variant: ``live`` if building it boots
        qemu-system-x86_64."""
        return (pytest.mark.live,) if self.slow else ()


def variant_params(names: list[str] | None = None) -> list:
    """pytest.param(name, id=name, marks=...) for each variant (all of them by default)."""
    return [pytest.param(n, id=n, marks=VARIANTS_BY_NAME[n].marks)
            for n in (names if names is not None else [v.name for v in VARIANTS])]


# --------------------------------------------------------------------------
# Guest data recipes
# --------------------------------------------------------------------------

def _std_writes(size: int) -> list[str]:
    """A mix of aligned / unaligned writes, zero writes and discards that
    fits any virtual size >= 4 MiB."""
    return [
        "write -P 0x11 0 64k",                 # aligned, cluster 0
        "write -P 0x22 100000 50000",          # unaligned both ends
        "write -P 0x33 1M 192k",
        "write -z 1088k 64k",                  # zero inside written data
        "write -P 0x34 1280k 4k",
        "discard 1216k 64k",                   # discard inside written data
        "write -z 2M 70000",                   # unaligned zero write, unallocated
        "write -P 0x35 3000000 123457",        # odd length
        f"write -P 0x44 {size - 12345} 12345",  # unaligned tail of the disk
    ]


def _simple_qcow2(size: int, opts: str | None, extra: list[str] | None = None,
                  name: str = "img.qcow2") -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        _mkdir(d)
        img = create_image(d, name, size, opts=opts)
        qemu_io(name, *_std_writes(size), *(extra or []), cwd=d)
        return img
    return build


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------

def build_cluster_2m(d: Path) -> Path:
    """2 MiB clusters, 64 MiB disk; data confined to 2 guest clusters so the
    file stays ~12 MiB (header, reftable, refblock, L1 and L2 take a 2 MiB
    cluster each)."""
    _mkdir(d)
    size = 64 * MiB
    img = create_image(d, "img.qcow2", size, opts="cluster_size=2M")
    qemu_io("img.qcow2",
            "write -P 0x11 0 64k",
            "write -P 0x22 100000 50000",
            "write -z 300000 70000",              # zeroes inside a cluster
            "write -P 0x33 1M 192k",
            "discard 1088k 64k",                  # sub-cluster discard
            "write -z 8M 4M",                     # whole-cluster zero flags
            f"write -P 0x44 {size - 12345} 12345",
            cwd=d)
    return img


def build_compressed_zlib_convert(d: Path) -> Path:
    """Raw file with data -> qemu-img convert -c -O qcow2, then overwrite a
    few ranges uncompressed (COW out of compressed clusters)."""
    _mkdir(d)
    create_image(d, "src.raw", 8 * MiB, fmt="raw")
    qemu_io("src.raw", "write -P 0x5a 0 1M", "write -P 0x6b 1500000 700000",
            "write -P 0x7c 5M 64k", "write -P 0x01 8323072 65536",
            fmt="raw", cwd=d)
    run(QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2",
        "src.raw", "img.qcow2", cwd=d)
    (d / "src.raw").unlink()
    qemu_io("img.qcow2", "write -P 0x99 4k 4k", "write -z 256k 64k",
            "discard 512k 64k", "write -P 0x98 6M 10000", cwd=d)
    return d / "img.qcow2"


def build_compressed_qemuio(opts: str | None) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        _mkdir(d)
        img = create_image(d, "img.qcow2", 16 * MiB, opts=opts)
        qemu_io("img.qcow2",
                "write -c -P 0x21 0 64k",
                "write -c -P 0x22 64k 64k",
                "write -c -P 0x23 4M 256k",
                "write -P 0x24 100000 5000",      # COW inside compressed
                "write -z 4160k 64k",             # zero a compressed cluster
                "write -P 0x25 8M 100k",
                cwd=d)
        return img
    return build


def build_extended_l2(d: Path) -> Path:
    _mkdir(d)
    img = create_image(d, "img.qcow2", 16 * MiB, opts="extended_l2=on")
    qemu_io("img.qcow2",
            "write -P 0x31 4k 4k",               # one 2k-subcluster pair
            "write -P 0x32 10k 1k",              # sub-subcluster write (COW)
            "write -z 8k 2k",                    # zero one subcluster
            "write -P 0x33 1M 64k",              # whole cluster
            f"write -z {MiB + 8 * KiB} 6k",
            f"discard {MiB + 32 * KiB} 32k",     # discard half a cluster
            "write -P 0x34 3M 300k",
            "write -P 0x35 5000000 1234",
            "write -z 8M 64k",                   # whole-cluster zero
            f"write -P 0x36 {16 * MiB - 2048} 2048",
            cwd=d)
    return img


def build_extended_l2_backing(d: Path) -> Path:
    """extended_l2 overlay over a fully written qcow2 base: unallocated
    subclusters of allocated clusters must read from the backing file."""
    _mkdir(d)
    create_image(d, "base.qcow2", 8 * MiB)
    qemu_io("base.qcow2", "write -P 0xb0 0 4M", "write -P 0xb1 4M 4M", cwd=d)
    img = create_image(d, "top.qcow2", 8 * MiB, opts="extended_l2=on",
                  backing="base.qcow2", backing_fmt="qcow2")
    qemu_io("top.qcow2",
            "write -P 0x41 4k 4k",
            "write -P 0x42 66k 2k",
            "write -z 8k 2k",                    # zero subcluster over data
            "write -P 0x43 1M 128k",
            f"discard {MiB + 64 * KiB} 32k",     # -> zero subclusters
            "write -z 2M 64k",
            "write -P 0x44 3333333 4444",
            "write -P 0x45 5M 6k",
            cwd=d)
    return img


def build_data_file(raw: bool) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        _mkdir(d)
        opts = "data_file=data.bin" + (",data_file_raw=on" if raw else "")
        img = create_image(d, "img.qcow2", 8 * MiB, opts=opts)
        qemu_io("img.qcow2", *_std_writes(8 * MiB), cwd=d)
        return img
    return build


def build_internal_snapshots(d: Path) -> Path:
    _mkdir(d)
    img = create_image(d, "img.qcow2", 16 * MiB)
    q = lambda *c: qemu_io("img.qcow2", *c, cwd=d)  # noqa: E731
    snap = lambda *a: run(QEMU_IMG, "snapshot", *a, "img.qcow2", cwd=d)  # noqa
    q("write -P 0x51 0 256k", "write -P 0x52 2M 100000")
    snap("-c", "snap1")
    q("write -P 0x53 64k 64k", "write -P 0x54 2100000 7000",
      "write -z 128k 64k", "discard 192k 64k")
    snap("-c", "snap2")
    q("write -P 0x55 5M 1M", "write -P 0x56 0 4k")
    snap("-c", "snap3")
    q("write -P 0x57 5M 64k")
    snap("-d", "snap2")
    q("write -P 0x58 12M 12345")
    return img


def build_bitmaps(d: Path) -> Path:
    _mkdir(d)
    img = create_image(d, "img.qcow2", 16 * MiB)
    bm = lambda *a: run(QEMU_IMG, "bitmap", *a, cwd=d)  # noqa: E731
    qemu_io("img.qcow2", "write -P 0x61 0 128k", cwd=d)
    bm("--add", "img.qcow2", "bm0")
    bm("--add", "--granularity", "128k", "img.qcow2", "bm1")
    qemu_io("img.qcow2", "write -P 0x62 1M 64k", "write -P 0x63 3000000 5000",
            "write -z 8M 64k", cwd=d)
    bm("--disable", "img.qcow2", "bm1")
    qemu_io("img.qcow2", "write -P 0x64 10M 256k", cwd=d)
    bm("--add", "--disable", "img.qcow2", "bm2")
    return img


def build_backing_chain_relative(d: Path) -> Path:
    """raw base <- l1 <- l2 <- top (3 qcow2 levels), each in its own
    subfolder, backing names relative to the referring image's directory."""
    _mkdir(d)
    for sub in ("base", "l1", "l2", "top"):
        _mkdir(d / sub)
    create_image(d, "base/base.raw", 8 * MiB, fmt="raw")
    qemu_io("base/base.raw", "write -P 0xa0 0 3M", "write -P 0xa1 7M 1M",
            fmt="raw", cwd=d)
    create_image(d, "l1/l1.qcow2", 8 * MiB, backing="../base/base.raw",
            backing_fmt="raw")
    qemu_io("l1/l1.qcow2", "write -P 0xa2 1M 64k", "write -P 0xa3 100000 3000",
            "write -z 2M 128k", cwd=d)
    create_image(d, "l2/l2.qcow2", 8 * MiB, backing="../l1/l1.qcow2",
            backing_fmt="qcow2")
    qemu_io("l2/l2.qcow2", f"write -P 0xa4 {MiB + 32 * KiB} 64k",
            "discard 0 64k", "write -P 0xa5 5M 10", cwd=d)
    img = create_image(d, "top/top.qcow2", 8 * MiB, backing="../l2/l2.qcow2",
                  backing_fmt="qcow2")
    qemu_io("top/top.qcow2", "write -P 0xa6 4k 4k", "write -z 2M 64k",
            f"write -P 0xa7 {8 * MiB - 4096} 4k",
            cwd=d)
    return img


def build_backing_shorter(d: Path) -> Path:
    """base 4 MiB, overlay 8 MiB: reads past 4 MiB in the base are zeros."""
    _mkdir(d)
    create_image(d, "base.qcow2", 4 * MiB)
    qemu_io("base.qcow2", "write -P 0xc0 0 4M", cwd=d)
    img = create_image(d, "top.qcow2", 8 * MiB, backing="base.qcow2",
                  backing_fmt="qcow2")
    qemu_io("top.qcow2", "write -P 0xc1 64k 4k",
            f"write -P 0xc2 {4 * MiB - 3000} 6000",   # straddles base EOF
            "write -P 0xc3 6M 64k", cwd=d)
    return img


def build_lazy_dirty(d: Path) -> Path:
    """lazy_refcounts=on, then a crash (qemu-io abort) after more writes:
    dirty bit set, on-disk refcounts of the new clusters are 0."""
    _mkdir(d)
    img = create_image(d, "img.qcow2", 16 * MiB, opts="lazy_refcounts=on")
    qemu_io("img.qcow2", "write -P 0x71 0 128k", "write -P 0x72 200000 3000",
            cwd=d)
    proc = qemu_io("img.qcow2", "write -P 0x73 1M 128k",
                   "write -P 0x74 3M 5k", "abort", cwd=d, check=False)
    if proc.returncode == 0:
        raise RuntimeError("qemu-io abort did not abort")
    return img


def build_leaked_clusters(d: Path) -> Path:
    """Two clusters appended to the file with refcount 1 and no reference."""
    _mkdir(d)
    img = create_image(d, "img.qcow2", 16 * MiB)
    qemu_io("img.qcow2", *_std_writes(16 * MiB), cwd=d)
    hdr = read_header(img)
    cs = hdr["cluster_size"]
    end = img.stat().st_size
    end = (end + cs - 1) // cs * cs
    with open(img, "r+b") as f:
        f.truncate(end + 2 * cs)
    for k in range(2):
        set_refcount(img, end // cs + k, 1)
    return img


def build_wild_l2(d: Path) -> Path:
    """An L2 entry pointing 64 MiB past EOF (file is < 1 MiB)."""
    _mkdir(d)
    img = create_image(d, "img.qcow2", 16 * MiB)
    qemu_io("img.qcow2", "write -P 0x81 0 192k", "write -P 0x82 1M 64k", cwd=d)
    cs = read_header(img)["cluster_size"]
    off = l2_entry_file_offset(img, cs)            # guest cluster 1
    wild = 64 * MiB
    _set_header_u64(img, off, (1 << 63) | wild)    # COPIED | offset
    return img


UNKNOWN_EXT_TYPE = 0x7E57E47E
UNKNOWN_EXT_DATA = b"qcow2engine unknown extension\x00\x01\x02"
UNKNOWN_AUTOCLEAR_BIT = 1 << 7


def build_unknown_ext_autoclear(d: Path) -> Path:
    """Unknown autoclear bit 7 + an unknown header extension inserted before
    the end marker; the image has a backing file so its name gets moved."""
    _mkdir(d)
    create_image(d, "base.qcow2", 8 * MiB)
    qemu_io("base.qcow2", "write -P 0xd0 0 1M", cwd=d)
    img = create_image(d, "img.qcow2", 8 * MiB, backing="base.qcow2",
                  backing_fmt="qcow2")
    qemu_io("img.qcow2", *_std_writes(8 * MiB), cwd=d)
    exts = read_extensions(img)
    exts.append((UNKNOWN_EXT_TYPE, UNKNOWN_EXT_DATA))
    write_extensions(img, exts)
    hdr = read_header(img)
    _set_header_u64(img, 88, hdr["autoclear_features"] | UNKNOWN_AUTOCLEAR_BIT)
    return img


def build_raw_sparse(d: Path) -> Path:
    _mkdir(d)
    img = create_image(d, "img.raw", 8 * MiB, fmt="raw")
    qemu_io("img.raw", "write -P 0xe1 0 64k", "write -P 0xe2 1000000 70000",
            "write -P 0xe3 4M 1M", f"write -z {4 * MiB + 64 * KiB} 64k",
            f"write -P 0xe4 {8 * MiB - 512} 512", fmt="raw", cwd=d)
    return img


def build_savevm_image(d: Path, timeout: float = 30) -> Path:
    """Boot a (diskless-firmware) TCG guest on a qcow2 drive and take an
    internal snapshot with VM state via HMP ``savevm`` on stdio."""
    _mkdir(d)
    img = create_image(d, "img.qcow2", 16 * MiB)
    qemu_io("img.qcow2", "write -P 0xf1 0 128k", "write -P 0xf2 3M 5000",
            cwd=d)
    argv = [QEMU_SYSTEM, "-machine", "pc", "-accel", "tcg", "-nodefaults",
            "-display", "none", "-m", "64", "-S",
            "-drive", "file=img.qcow2,format=qcow2,if=virtio",
            "-monitor", "stdio"]
    proc = subprocess.Popen(argv, cwd=str(d), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdin is not None
        # Let the firmware run a little so vm-clock and RAM are non-trivial.
        proc.stdin.write("cont\n")
        proc.stdin.flush()
        time.sleep(0.3)
        proc.stdin.write("stop\nsavevm snap1\nquit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-system-x86_64 failed rc={proc.returncode}: "
                           f"{err.strip()}")
    if "Error" in out:
        raise RuntimeError(f"savevm reported an error: {out.strip()}")
    info = qemu_img_info(img)
    snaps = info.get("snapshots", [])
    if not snaps or snaps[0].get("vm-state-size", 0) <= 0:
        raise RuntimeError(f"savevm produced no vm state: {snaps}")
    # More guest data after the snapshot, so active L1 != snapshot L1.
    qemu_io("img.qcow2", "write -P 0xf3 64k 64k", "write -z 3M 64k", cwd=d)
    return img


# --------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------

_FS = "format-specific.data."

VARIANTS: list[Variant] = [
    Variant("compat_0.10", _simple_qcow2(16 * MiB, "compat=0.10"),
            expect_info={_FS + "compat": "0.10", "cluster-size": 65536}),
    Variant("compat_1.1_default", _simple_qcow2(16 * MiB, None),
            expect_info={_FS + "compat": "1.1", "cluster-size": 65536,
                         _FS + "refcount-bits": 16,
                         _FS + "compression-type": "zlib",
                         _FS + "extended-l2": False}),
    Variant("cluster_512", _simple_qcow2(8 * MiB, "cluster_size=512"),
            expect_info={"cluster-size": 512}),
    Variant("cluster_4k", _simple_qcow2(16 * MiB, "cluster_size=4k"),
            expect_info={"cluster-size": 4096}),
    Variant("cluster_64k", _simple_qcow2(16 * MiB, "cluster_size=64k"),
            expect_info={"cluster-size": 65536}),
    Variant("cluster_2M", build_cluster_2m,
            expect_info={"cluster-size": 2 * MiB, "virtual-size": 64 * MiB}),
    *[Variant(f"refcount_bits_{b}",
              _simple_qcow2(16 * MiB, f"refcount_bits={b}"),
              expect_info={_FS + "refcount-bits": b})
      for b in (1, 2, 4, 8, 16, 32, 64)],
    Variant("compressed_zlib_convert", build_compressed_zlib_convert,
            compressed=True,
            expect_info={_FS + "compression-type": "zlib"},
            expect_check={"compressed-clusters": 1}),
    Variant("compressed_zlib_qemuio", build_compressed_qemuio(None),
            compressed=True,
            expect_info={_FS + "compression-type": "zlib"},
            expect_check={"compressed-clusters": 1}),
    Variant("compressed_zstd", build_compressed_qemuio("compression_type=zstd"),
            compressed=True,
            expect_info={_FS + "compression-type": "zstd"},
            expect_check={"compressed-clusters": 1}),
    Variant("extended_l2", build_extended_l2,
            expect_info={_FS + "extended-l2": True}),
    Variant("extended_l2_backing", build_extended_l2_backing,
            has_backing=True, backing_depth=1,
            expect_info={_FS + "extended-l2": True,
                         "backing-filename": "base.qcow2",
                         "backing-filename-format": "qcow2"}),
    Variant("data_file", build_data_file(raw=False), has_data_file=True,
            run_in_image_dir=True,
            expect_info={_FS + "data-file": "data.bin"}),
    Variant("data_file_raw", build_data_file(raw=True), has_data_file=True,
            run_in_image_dir=True,
            expect_info={_FS + "data-file": "data.bin",
                         _FS + "data-file-raw": True}),
    Variant("internal_snapshots", build_internal_snapshots, has_snapshots=True),
    Variant("bitmaps", build_bitmaps, has_bitmaps=True),
    Variant("backing_chain_relative", build_backing_chain_relative,
            has_backing=True, backing_depth=3,
            expect_info={"backing-filename": "../l2/l2.qcow2",
                         "backing-filename-format": "qcow2"}),
    Variant("backing_shorter", build_backing_shorter, has_backing=True,
            backing_depth=1,
            expect_info={"virtual-size": 8 * MiB,
                         "backing-filename": "base.qcow2"}),
    Variant("prealloc_metadata",
            _simple_qcow2(8 * MiB, "preallocation=metadata")),
    Variant("prealloc_falloc", _simple_qcow2(8 * MiB, "preallocation=falloc")),
    Variant("lazy_refcounts_dirty", build_lazy_dirty, expect_check_rc=2,
            dirty=True,
            expect_info={_FS + "lazy-refcounts": True, "dirty-flag": True},
            expect_check={"corruptions": 6}),
    Variant("leaked_clusters", build_leaked_clusters, expect_check_rc=3,
            expect_check={"leaks": 2}),
    # qemu-img check: "counting reference for region exceeding the end of
    # the file" + "OFLAG_COPIED data cluster ... refcount=0" (2 corruptions)
    # and the orphaned old data cluster is leaked (1 leak); rc is still 2.
    Variant("wild_l2_entry", build_wild_l2, expect_check_rc=2,
            expect_check={"corruptions": 2, "leaks": 1}),
    Variant("unknown_ext_autoclear", build_unknown_ext_autoclear,
            has_backing=True, backing_depth=1,
            expect_info={"backing-filename": "base.qcow2"}),
    Variant("raw_sparse", build_raw_sparse, fmt="raw", expect_check_rc=63,
            expect_info={"format": "raw", "virtual-size": 8 * MiB}),
    Variant("savevm", build_savevm_image, has_snapshots=True, has_vmstate=True,
            slow=True),
]

VARIANTS_BY_NAME: dict[str, Variant] = {v.name: v for v in VARIANTS}
assert len(VARIANTS_BY_NAME) == len(VARIANTS), "duplicate variant names"
