"""Generator of damaged qcow2 images for bad-input tests.

``build_corpus(dir)`` writes one file per case into *dir* and returns a list
of :class:`Case`.  Every image starts from a small, valid image produced by
QEMU's own tools (``qemu-img create`` + ``qemu-io -c 'write ...'``) and is then
damaged with plain ``struct`` edits on the big-endian on-disk structures
(layout per QEMU's docs/interop/qcow2.rst).

For every case QEMU's reaction is recorded by actually running

* ``qemu-img info --output=json PATH``   -> ``Case.qemu_info_rc``
* ``qemu-img check --output=json PATH``  -> ``Case.qemu_check_rc``

(format probing, exactly as a user would type it; ``None`` = timed out after
10 s).  ``Case.runs`` holds every observation (rc, stdout, stderr), including
extra ones: the same info/check with the qcow2 driver forced (``-f qcow2``,
only when probing did not pick qcow2 -- a non-qcow2 file is silently treated
as ``raw``), ``info --backing-chain`` for images naming a backing file, and a
``qemu-io -r`` read of the first 128 KiB (the data path).

``format_reference()`` renders the results as the table kept in
tests/interop/corpus_qemu_reference.txt.  ``python -m tests.helpers.corpus [DIR]`` builds the
corpus by hand and prints that table.

This module deliberately does not import qcow2engine.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import qemu

QEMU_TIMEOUT = 10.0

QCOW2_MAGIC = 0x514649FB
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
VSIZE = 1 << 20  # virtual size of the base images (1 MiB)

# Header field offsets/format (big endian).
F = {
    "magic": (0, "I"),
    "version": (4, "I"),
    "backing_file_offset": (8, "Q"),
    "backing_file_size": (16, "I"),
    "cluster_bits": (20, "I"),
    "size": (24, "Q"),
    "crypt_method": (32, "I"),
    "l1_size": (36, "I"),
    "l1_table_offset": (40, "Q"),
    "refcount_table_offset": (48, "Q"),
    "refcount_table_clusters": (56, "I"),
    "nb_snapshots": (60, "I"),
    "snapshots_offset": (64, "Q"),
    "incompatible_features": (72, "Q"),
    "compatible_features": (80, "Q"),
    "autoclear_features": (88, "Q"),
    "refcount_order": (96, "I"),
    "header_length": (100, "I"),
}
HEADER_FIELD_BOUNDARIES = [0, 4, 8, 16, 20, 24, 32, 36, 40, 48, 56, 60, 64,
                           72, 80, 88, 96, 100, 104]

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_UNKNOWN_BIT5 = 1 << 5
AUTOCLEAR_BITMAPS = 1 << 0

L2_COMPRESSED = 1 << 62
L2_COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00

BACKING_BASE_NAME = "backing_base.qcow2"


@dataclass
class QemuRun:
    """One observed QEMU tool invocation."""
    argv: list[str]
    rc: int | None          # None = killed after QEMU_TIMEOUT; <0 = signal
    stdout: str
    stderr: str


@dataclass
class Case:
    name: str
    path: Path
    description: str
    qemu_info_rc: int | None
    qemu_check_rc: int | None
    # All observations keyed by COMMANDS key ("info", "check", "finfo",
    # "fcheck", "chain", "read"); qemu_info_rc / qemu_check_rc are
    # runs["info"].rc / runs["check"].rc.
    runs: dict[str, QemuRun] = field(default_factory=dict)
    companions: list[Path] = field(default_factory=list)

    def stderr_first_line(self, key: str) -> str:
        r = self.runs.get(key)
        return _first_line(r.stderr) if r else ""


# --------------------------------------------------------------------------
# byte helpers
# --------------------------------------------------------------------------

def get(img: bytes | bytearray, off: int, fmt: str) -> int:
    return struct.unpack_from(">" + fmt, img, off)[0]


def put(img: bytearray, off: int, fmt: str, value: int) -> None:
    struct.pack_into(">" + fmt, img, off, value)


def hget(img, name: str) -> int:
    off, fmt = F[name]
    return get(img, off, fmt)


def hset(img: bytearray, name: str, value: int) -> None:
    off, fmt = F[name]
    put(img, off, fmt, value)


def parse_exts(img, start: int, limit: int = CLUSTER) -> list[tuple[int, bytes]]:
    """Header extensions of a (valid) base image, without the end marker."""
    exts = []
    off = start
    while off + 8 <= limit:
        typ, ln = struct.unpack_from(">II", img, off)
        if typ == EXT_END:
            break
        exts.append((typ, bytes(img[off + 8: off + 8 + ln])))
        off += 8 + ((ln + 7) & ~7)
    return exts


def pack_exts(exts: list[tuple[int, bytes]], terminate: bool = True) -> bytes:
    out = bytearray()
    for typ, data in exts:
        out += struct.pack(">II", typ, len(data)) + data
        out += b"\0" * (-len(data) % 8)
    if terminate:
        out += b"\0" * 8
    return bytes(out)


def write_exts(img: bytearray, exts, terminate: bool = True) -> None:
    """Rewrite the extension area (v3 images) in place."""
    start = hget(img, "header_length")
    blob = pack_exts(exts, terminate)
    bfo = hget(img, "backing_file_offset")
    if bfo and start + len(blob) > bfo:
        # move the backing file name out of the way
        bfs = hget(img, "backing_file_size")
        set_backing(img, bytes(img[bfo:bfo + bfs]), 0x1000)
    assert start + len(blob) <= 0x1000, "extensions do not fit"
    img[start:start + len(blob)] = blob


def feature_entry(ftype: int, bit: int, name: str) -> bytes:
    return struct.pack(">BB46s", ftype, bit, name.encode())


def set_backing(img: bytearray, name: bytes | str, offset: int = 0x1000) -> None:
    if isinstance(name, str):
        name = name.encode()
    img[offset:offset + len(name)] = name
    hset(img, "backing_file_offset", offset)
    hset(img, "backing_file_size", len(name))


@dataclass
class Layout:
    """Where things are in a base image (derived from the image itself)."""
    size: int
    l1: int
    l1_size: int
    rt: int
    rb: int
    l2: int
    data: int
    snap: int
    nb_snap: int

    @classmethod
    def of(cls, img: bytes) -> "Layout":
        l1 = hget(img, "l1_table_offset")
        rt = hget(img, "refcount_table_offset")
        l2 = get(img, l1, "Q") & OFFSET_MASK
        return cls(
            size=len(img), l1=l1, l1_size=hget(img, "l1_size"), rt=rt,
            rb=get(img, rt, "Q") & ~0x1FF, l2=l2,
            data=get(img, l2, "Q") & OFFSET_MASK,
            snap=hget(img, "snapshots_offset"),
            nb_snap=hget(img, "nb_snapshots"))


@dataclass
class Ctx:
    dir: Path
    name: str
    lay: Layout
    bases: dict[str, bytes]
    companions: list[Path] = field(default_factory=list)

    def companion(self, fname: str, data: bytes) -> Path:
        p = self.dir / fname
        p.write_bytes(data)
        if p not in self.companions:
            self.companions.append(p)
        return p


Mutator = Callable[[bytearray, Ctx], "bytes | bytearray | None"]


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    base: str | None          # "v3", "v2", "snap", "overlay", or None
    mutate: Mutator


SPECS: list[Spec] = []


def case(name: str, description: str, base: str | None = "v3"):
    def deco(fn: Mutator) -> Mutator:
        SPECS.append(Spec(name, description, base, fn))
        return fn
    return deco


def add(name: str, description: str, base: str | None, fn: Mutator) -> None:
    SPECS.append(Spec(name, description, base, fn))


def fields(**kv) -> Mutator:
    def m(img: bytearray, ctx: Ctx):
        for k, v in kv.items():
            hset(img, k, v)
    return m


# --------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------

# ---- controls ------------------------------------------------------------
add("valid_v3", "control: valid v3 image, 64k clusters, 128k of 0xaa",
    "v3", lambda img, ctx: None)
add("valid_v2", "control: valid v2 (compat=0.10) image", "v2",
    lambda img, ctx: None)
add("valid_snapshot", "control: valid v3 image with internal snapshot s1",
    "snap", lambda img, ctx: None)


@case("valid_backing", "control: valid overlay with backing file "
      f"{BACKING_BASE_NAME} (qcow2, backing format extension)", "overlay")
def _(img, ctx):
    ctx.companion(BACKING_BASE_NAME, ctx.bases["v3"])


# ---- truncation ----------------------------------------------------------
for _n in HEADER_FIELD_BOUNDARIES:
    add(f"trunc_hdr_{_n:03d}", f"v3 image truncated to {_n} bytes "
        "(header field boundary)", "v3",
        lambda img, ctx, n=_n: img[:n])
add("trunc_hdr_112", "v3 image truncated to 112 bytes (header incl. "
    "compression type, no extensions)", "v3", lambda img, ctx: img[:112])
add("trunc_cluster0", "v3 image truncated just after the header cluster "
    "(65536 bytes)", "v3", lambda img, ctx: img[:CLUSTER])
add("trunc_reftable_entry", "truncated in the middle of the first refcount "
    "table entry", "v3", lambda img, ctx: img[:ctx.lay.rt + 4])
add("trunc_reftable_mid", "truncated in the middle of the refcount table "
    "cluster", "v3", lambda img, ctx: img[:ctx.lay.rt + CLUSTER // 2])
add("trunc_refblock_mid", "truncated in the middle of the refcount block",
    "v3", lambda img, ctx: img[:ctx.lay.rb + CLUSTER // 2])
add("trunc_l1_entry", "truncated in the middle of the (only) L1 entry",
    "v3", lambda img, ctx: img[:ctx.lay.l1 + 4])
add("trunc_l1_mid", "truncated in the middle of the L1 table cluster",
    "v3", lambda img, ctx: img[:ctx.lay.l1 + CLUSTER // 2])
add("trunc_l2_entry", "truncated in the middle of the first L2 entry",
    "v3", lambda img, ctx: img[:ctx.lay.l2 + 4])
add("trunc_l2_mid", "truncated in the middle of the L2 table", "v3",
    lambda img, ctx: img[:ctx.lay.l2 + CLUSTER // 2])
add("trunc_data_mid", "truncated in the middle of the first data cluster",
    "v3", lambda img, ctx: img[:ctx.lay.data + CLUSTER // 2])
add("trunc_last_byte", "last byte of the file missing", "v3",
    lambda img, ctx: img[:-1])
add("trunc_snapshot_table", "snapshot image truncated in the middle of the "
    "snapshot table", "snap", lambda img, ctx: img[:ctx.lay.snap + 20])
add("trunc_v2_hdr_072", "v2 image truncated to 72 bytes (complete v2 header)",
    "v2", lambda img, ctx: img[:72])

# ---- not qcow2 at all ----------------------------------------------------
add("empty", "empty file", None, lambda img, ctx: b"")
add("zeros_64k", "64 KiB of zeros", None, lambda img, ctx: bytes(CLUSTER))
add("random_64k", "64 KiB of random garbage (seeded)", None,
    lambda img, ctx: random.Random(0x9C0C2).randbytes(CLUSTER))
add("magic_only", "a file containing only the 4-byte magic", None,
    lambda img, ctx: struct.pack(">I", QCOW2_MAGIC))
add("random_64k_with_magic", "magic followed by 64 KiB of random garbage",
    None, lambda img, ctx: struct.pack(">I", QCOW2_MAGIC)
    + random.Random(0xBAD).randbytes(CLUSTER - 4))

# ---- magic / version -----------------------------------------------------
add("bad_magic", "magic 'QFI\\xfa' instead of 'QFI\\xfb'", "v3",
    fields(magic=QCOW2_MAGIC - 1))
for _v in (0, 1, 4, 0xFFFFFFFF):
    add(f"version_{_v:x}", f"version {_v:#x}", "v3", fields(version=_v))
add("version_2_on_v3_image", "v3 image with version set to 2 (v3 fields are "
    "then read as extension area)", "v3", fields(version=2))
add("version_3_on_v2_image", "v2 image with version set to 3 (zeros where "
    "the v3 fields are: header_length 0, refcount_order 0)", "v2",
    fields(version=3))

# ---- cluster_bits --------------------------------------------------------
for _cb in (0, 8, 9, 21, 22, 63, 0xFFFFFFFF):
    add(f"cluster_bits_{_cb}", f"cluster_bits {_cb:#x} (layout still 64k)",
        "v3", fields(cluster_bits=_cb))

# ---- size ----------------------------------------------------------------
add("size_0", "virtual size 0 (allocated data beyond it)", "v3",
    fields(size=0))
add("size_2p63m1", "virtual size 2**63-1", "v3", fields(size=2**63 - 1))
add("size_2p64m1", "virtual size 2**64-1", "v3", fields(size=2**64 - 1))
add("size_unaligned", "virtual size 1 MiB + 1 (not sector aligned)", "v3",
    fields(size=VSIZE + 1))
add("size_needs_more_l1", "virtual size 2 GiB but l1_size 1 (needs 4)", "v3",
    fields(size=2 << 30))

# ---- L1 table header fields ---------------------------------------------
add("l1_size_7fffffff", "l1_size 0x7fffffff", "v3",
    fields(l1_size=0x7FFFFFFF))
add("l1_size_ffffffff", "l1_size 0xffffffff", "v3",
    fields(l1_size=0xFFFFFFFF))
add("l1_size_0", "l1_size 0 (too small for 1 MiB, data is mapped)", "v3",
    fields(l1_size=0))
add("l1_size_too_big_for_file", "l1_size 0x100000 (8 MiB table, past EOF)",
    "v3", fields(l1_size=0x100000))
add("l1_offset_past_eof", "l1_table_offset far past EOF", "v3",
    fields(l1_table_offset=1 << 40))
add("l1_offset_just_past_eof", "l1_table_offset = file size (one cluster "
    "past the last)", "v3", lambda img, ctx: hset(img, "l1_table_offset",
                                                  ctx.lay.size))
add("l1_offset_misaligned", "l1_table_offset + 1", "v3",
    lambda img, ctx: hset(img, "l1_table_offset", ctx.lay.l1 + 1))
add("l1_offset_misaligned_8", "l1_table_offset + 8 (8-aligned, not "
    "cluster aligned)", "v3",
    lambda img, ctx: hset(img, "l1_table_offset", ctx.lay.l1 + 8))
add("l1_offset_0", "l1_table_offset 0 (L1 = header)", "v3",
    fields(l1_table_offset=0))
add("l1_overlaps_header", "l1_table_offset 0 with l1_size 16 (header bytes "
    "read as L1 entries), size grown to match", "v3",
    fields(l1_table_offset=0, l1_size=16, size=16 << 29))
add("l1_offset_0_size_0", "l1_table_offset 0 and l1_size 0, virtual size 0",
    "v3", fields(l1_table_offset=0, l1_size=0, size=0))
add("l1_overlaps_refcount_table", "l1_table_offset = refcount table offset",
    "v3", lambda img, ctx: hset(img, "l1_table_offset", ctx.lay.rt))

# ---- refcount table header fields ---------------------------------------
add("rt_offset_past_eof", "refcount_table_offset far past EOF", "v3",
    fields(refcount_table_offset=1 << 40))
add("rt_offset_misaligned", "refcount_table_offset + 1", "v3",
    lambda img, ctx: hset(img, "refcount_table_offset", ctx.lay.rt + 1))
add("rt_offset_0", "refcount_table_offset 0 (table = header)", "v3",
    fields(refcount_table_offset=0))
add("rt_clusters_0", "refcount_table_clusters 0", "v3",
    fields(refcount_table_clusters=0))
add("rt_clusters_2", "refcount_table_clusters 2 (second cluster is the "
    "refcount block)", "v3", fields(refcount_table_clusters=2))
add("rt_clusters_ffffffff", "refcount_table_clusters 0xffffffff", "v3",
    fields(refcount_table_clusters=0xFFFFFFFF))
add("rt_clusters_100000", "refcount_table_clusters 0x100000 (64 GiB table, "
    "past EOF)", "v3", fields(refcount_table_clusters=0x100000))

# ---- snapshot table header fields ----------------------------------------
add("nb_snapshots_65537", "nb_snapshots 65537, snapshots_offset valid",
    "snap", fields(nb_snapshots=65537))
add("nb_snapshots_65537_past_eof", "nb_snapshots 65537, snapshots_offset "
    "past EOF", "snap",
    fields(nb_snapshots=65537, snapshots_offset=1 << 40))
add("nb_snapshots_ffffffff", "nb_snapshots 0xffffffff, snapshots_offset "
    "valid", "snap", fields(nb_snapshots=0xFFFFFFFF))
add("nb_snapshots_ffffffff_past_eof", "nb_snapshots 0xffffffff, "
    "snapshots_offset past EOF", "snap",
    fields(nb_snapshots=0xFFFFFFFF, snapshots_offset=1 << 40))
add("nb_snapshots_2", "nb_snapshots 2 but only one entry in the table "
    "(second is zeros)", "snap", fields(nb_snapshots=2))
add("nb_snapshots_1_offset_0", "v3 image without snapshots, nb_snapshots 1 "
    "with snapshots_offset 0 (header read as snapshot table)", "v3",
    fields(nb_snapshots=1, snapshots_offset=0))
add("snapshots_offset_past_eof", "nb_snapshots 1, snapshots_offset past EOF",
    "snap", fields(snapshots_offset=1 << 40))
add("snapshots_offset_misaligned", "snapshots_offset + 1", "snap",
    lambda img, ctx: hset(img, "snapshots_offset", ctx.lay.snap + 1))
add("snapshots_offset_0", "snapshots_offset 0 with nb_snapshots 1", "snap",
    fields(snapshots_offset=0))

# snapshot table entry: u64 l1_table_offset, u32 l1_size, u16 id_str_size,
# u16 name_size, u32 date_sec, u32 date_nsec, u64 vm_clock_nsec,
# u32 vm_state_size, u32 extra_data_size, extra, id, name, pad to 8.
SN_L1_OFFSET, SN_L1_SIZE, SN_ID_SIZE, SN_NAME_SIZE = 0, 8, 12, 14
SN_EXTRA_SIZE = 36


def snap_field(off: int, fmt: str, value) -> Mutator:
    def m(img: bytearray, ctx: Ctx):
        v = value(ctx) if callable(value) else value
        put(img, ctx.lay.snap + off, fmt, v)
    return m


add("snap_id_str_size_huge", "snapshot entry with id_str_size 0xffff",
    "snap", snap_field(SN_ID_SIZE, "H", 0xFFFF))
add("snap_name_size_huge", "snapshot entry with name_size 0xffff", "snap",
    snap_field(SN_NAME_SIZE, "H", 0xFFFF))
add("snap_name_size_2000", "snapshot entry with name_size 2000 (> 1024, "
    "still inside the file)", "snap", snap_field(SN_NAME_SIZE, "H", 2000))
add("snap_extra_data_size_huge", "snapshot entry with extra_data_size "
    "0xffffffff", "snap", snap_field(SN_EXTRA_SIZE, "I", 0xFFFFFFFF))
add("snap_extra_data_size_2000", "snapshot entry with extra_data_size 2000 "
    "(> 1024)", "snap", snap_field(SN_EXTRA_SIZE, "I", 2000))
add("snap_extra_data_size_0", "v3 snapshot entry with extra_data_size 0 "
    "(v3 requires >= 16)", "snap", snap_field(SN_EXTRA_SIZE, "I", 0))
add("snap_l1_offset_past_eof", "snapshot L1 table offset past EOF", "snap",
    snap_field(SN_L1_OFFSET, "Q", 1 << 40))
add("snap_l1_offset_misaligned", "snapshot L1 table offset + 1", "snap",
    snap_field(SN_L1_OFFSET, "Q",
               lambda ctx: get(ctx.bases["snap"], ctx.lay.snap, "Q") + 1))
add("snap_l1_offset_0", "snapshot L1 table offset 0 (header)", "snap",
    snap_field(SN_L1_OFFSET, "Q", 0))
add("snap_l1_size_huge", "snapshot l1_size 0xffffffff", "snap",
    snap_field(SN_L1_SIZE, "I", 0xFFFFFFFF))
add("snap_l1_size_2000000", "snapshot l1_size 0x2000000 (past the "
    "QCOW_MAX_L1_SIZE-style limit)", "snap",
    snap_field(SN_L1_SIZE, "I", 0x2000000))

# ---- backing file --------------------------------------------------------
# backing-file-name damage on the qemu-img-made overlay


@case("backing_offset_past_cluster", "overlay whose backing_file_offset is "
      "past the first cluster (name copied there, still inside the file)",
      "overlay")
def _(img, ctx):
    ctx.companion(BACKING_BASE_NAME, ctx.bases["v3"])
    name = BACKING_BASE_NAME.encode()
    off = CLUSTER + 0x100          # inside the refcount table cluster
    img[off:off + len(name)] = name
    hset(img, "backing_file_offset", off)


@case("backing_offset_past_eof", "backing_file_offset past EOF", "overlay")
def _(img, ctx):
    ctx.companion(BACKING_BASE_NAME, ctx.bases["v3"])
    hset(img, "backing_file_offset", 1 << 40)


@case("backing_size_1024", "backing_file_size 1024 (> 1023)", "overlay")
def _(img, ctx):
    ctx.companion(BACKING_BASE_NAME, ctx.bases["v3"])
    hset(img, "backing_file_size", 1024)


@case("backing_size_ffffffff", "backing_file_size 0xffffffff", "overlay")
def _(img, ctx):
    ctx.companion(BACKING_BASE_NAME, ctx.bases["v3"])
    hset(img, "backing_file_size", 0xFFFFFFFF)


@case("backing_size_0", "backing_file_offset set, backing_file_size 0",
      "overlay")
def _(img, ctx):
    ctx.companion(BACKING_BASE_NAME, ctx.bases["v3"])
    hset(img, "backing_file_size", 0)


@case("backing_format_bogus", "backing format extension says 'nosuchfmt'",
      "overlay")
def _(img, ctx):
    ctx.companion(BACKING_BASE_NAME, ctx.bases["v3"])
    exts = [(t, b"nosuchfmt" if t == EXT_BACKING_FORMAT else d)
            for t, d in parse_exts(img, hget(img, "header_length"))]
    write_exts(img, exts)


@case("backing_format_raw", "backing format extension says 'raw' while the "
      "backing file is qcow2", "overlay")
def _(img, ctx):
    ctx.companion(BACKING_BASE_NAME, ctx.bases["v3"])
    exts = [(t, b"raw" if t == EXT_BACKING_FORMAT else d)
            for t, d in parse_exts(img, hget(img, "header_length"))]
    write_exts(img, exts)


@case("backing_missing", "backing file name points to a file that does not "
      "exist")
def _(img, ctx):
    set_backing(img, "no_such_backing_file.qcow2")


@case("backing_self", "backing file name is the image itself")
def _(img, ctx):
    set_backing(img, ctx.name + ".qcow2")


@case("backing_loop_ab", "backing loop: backing_loop_ab -> "
      "backing_loop_ab.b.qcow2 -> backing_loop_ab")
def _(img, ctx):
    other = bytearray(ctx.bases["v3"])
    set_backing(other, ctx.name + ".qcow2")
    ctx.companion(ctx.name + ".b.qcow2", other)
    set_backing(img, ctx.name + ".b.qcow2")


@case("backing_nbd", "backing file name 'nbd://localhost:1/x' (protocol "
      "prefix, nothing listening)")
def _(img, ctx):
    set_backing(img, "nbd://localhost:1/x")


@case("backing_json_self", "backing file name json:{...} pointing at the "
      "image itself")
def _(img, ctx):
    spec = {"driver": "qcow2",
            "file": {"driver": "file",
                     "filename": str(ctx.dir / (ctx.name + ".qcow2"))}}
    set_backing(img, "json:" + json.dumps(spec))


@case("backing_json_base", "backing file name json:{...} pointing at a "
      "valid base image")
def _(img, ctx):
    p = ctx.companion(BACKING_BASE_NAME, ctx.bases["v3"])
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(p)}}
    set_backing(img, "json:" + json.dumps(spec))


@case("backing_json_malformed", "backing file name 'json:{' (bad JSON)")
def _(img, ctx):
    set_backing(img, "json:{")


@case("backing_name_nul", "backing file name containing NUL bytes")
def _(img, ctx):
    set_backing(img, b"a\0b.qcow2")


@case("backing_on_v2_in_header", "v2 image whose backing name overlaps the "
      "header (offset 8)", "v2")
def _(img, ctx):
    hset(img, "backing_file_offset", 8)
    hset(img, "backing_file_size", 16)


# ---- crypt / feature bits ------------------------------------------------
for _cm in (1, 2, 5):
    add(f"crypt_method_{_cm}", f"crypt_method {_cm}", "v3",
        fields(crypt_method=_cm))
add("incompat_bit5_unnamed", "unknown incompatible feature bit 5 set, "
    "feature name table does not name it", "v3",
    fields(incompatible_features=INCOMPAT_UNKNOWN_BIT5))


@case("incompat_bit5_named", "unknown incompatible feature bit 5 set, "
      "feature name table entry names it 'corpus test feature'")
def _(img, ctx):
    hset(img, "incompatible_features", INCOMPAT_UNKNOWN_BIT5)
    exts = parse_exts(img, hget(img, "header_length"))
    exts = [(t, d + feature_entry(0, 5, "corpus test feature")
             if t == EXT_FEATURE_NAMES else d) for t, d in exts]
    write_exts(img, exts)


@case("incompat_bit5_named_only_table", "unknown incompatible bit 5 set, "
      "feature table replaced by a single entry naming it")
def _(img, ctx):
    hset(img, "incompatible_features", INCOMPAT_UNKNOWN_BIT5)
    write_exts(img, [(EXT_FEATURE_NAMES, feature_entry(0, 5, "corpus bit5"))])


add("incompat_bit63", "unknown incompatible feature bit 63 set", "v3",
    fields(incompatible_features=1 << 63))
add("incompat_corrupt", "corrupt bit (incompatible bit 1) set", "v3",
    fields(incompatible_features=INCOMPAT_CORRUPT))
add("incompat_dirty", "dirty bit set on a non-lazy-refcounts image", "v3",
    fields(incompatible_features=INCOMPAT_DIRTY))
add("incompat_dirty_lazy", "dirty bit set with lazy_refcounts compatible "
    "bit", "v3", fields(incompatible_features=INCOMPAT_DIRTY,
                        compatible_features=1))
add("incompat_data_file_no_ext", "external data file bit set, no data file "
    "extension", "v3", fields(incompatible_features=INCOMPAT_DATA_FILE))
add("incompat_compression_bit_zlib", "compression-type bit set while the "
    "compression type byte is 0 (zlib)", "v3",
    fields(incompatible_features=INCOMPAT_COMPRESSION))


@case("compression_type_invalid", "compression-type bit set and compression "
      "type byte 7 (unknown)")
def _(img, ctx):
    hset(img, "incompatible_features", INCOMPAT_COMPRESSION)
    img[104] = 7


@case("compression_type_without_bit", "compression type byte 1 (zstd) but "
      "compression-type bit clear")
def _(img, ctx):
    img[104] = 1


add("incompat_extended_l2", "extended L2 bit set on a normal-L2 image", "v3",
    fields(incompatible_features=INCOMPAT_EXTL2))
add("compat_unknown_bits", "all unknown compatible feature bits set", "v3",
    fields(compatible_features=0xFFFFFFFFFFFFFFFE))
add("autoclear_unknown_bits", "all unknown autoclear bits set", "v3",
    fields(autoclear_features=0xFFFFFFFFFFFFFFFC))

# ---- refcount_order / header_length --------------------------------------
for _ro in (0, 6, 7, 0xFFFFFFFF):
    add(f"refcount_order_{_ro:x}", f"refcount_order {_ro:#x}", "v3",
        fields(refcount_order=_ro))
for _hl in (0, 72, 103, 104, 105, 0x10000, 0x10008, 0xFFFFFFFF):
    add(f"header_length_{_hl}", f"header_length {_hl:#x}", "v3",
        fields(header_length=_hl))

# ---- header extensions ---------------------------------------------------


@case("ext_len_past_cluster", "feature-name-table extension length 0x10000 "
      "(runs past the header cluster)")
def _(img, ctx):
    off = hget(img, "header_length")
    assert get(img, off, "I") == EXT_FEATURE_NAMES
    put(img, off + 4, "I", 0x10000)


@case("ext_len_ffffffff", "header extension length 0xffffffff")
def _(img, ctx):
    put(img, hget(img, "header_length") + 4, "I", 0xFFFFFFFF)


@case("ext_no_terminator_garbage", "extension area without terminator: "
      "garbage (random bytes) to the end of the header cluster")
def _(img, ctx):
    start = hget(img, "header_length")
    img[start:CLUSTER] = random.Random(7).randbytes(CLUSTER - start)


@case("ext_no_terminator_chain", "extension area without terminator: "
      "well-formed unknown extensions (type 0x12345678, len 0) up to the end "
      "of the header cluster")
def _(img, ctx):
    start = hget(img, "header_length")
    n = (CLUSTER - start) // 8
    img[start:start + 8 * n] = struct.pack(">II", 0x12345678, 0) * n


@case("ext_unknown_type", "an unknown header extension (type 0x12345678) "
      "before the feature table (must be ignored)")
def _(img, ctx):
    exts = parse_exts(img, hget(img, "header_length"))
    write_exts(img, [(0x12345678, b"hello")] + exts)


@case("ext_feature_table_truncated_entry", "feature name table with length "
      "not a multiple of 48")
def _(img, ctx):
    write_exts(img, [(EXT_FEATURE_NAMES, feature_entry(0, 0, "dirty")[:40])])


@case("ext_backing_format_without_backing", "backing-format extension on an "
      "image without backing file")
def _(img, ctx):
    exts = parse_exts(img, hget(img, "header_length"))
    write_exts(img, [(EXT_BACKING_FORMAT, b"qcow2")] + exts)


def bitmaps_ext(nb: int, dir_size: int, dir_off: int) -> tuple[int, bytes]:
    return EXT_BITMAPS, struct.pack(">IIQQ", nb, 0, dir_size, dir_off)


def bitmaps_case(name, desc, nb, dir_size, dir_off, autoclear=True):
    def m(img: bytearray, ctx: Ctx):
        exts = parse_exts(img, hget(img, "header_length"))
        d_off = dir_off(ctx) if callable(dir_off) else dir_off
        write_exts(img, [bitmaps_ext(nb, dir_size, d_off)] + exts)
        if autoclear:
            hset(img, "autoclear_features", AUTOCLEAR_BITMAPS)
    add(name, desc, "v3", m)


bitmaps_case("bitmaps_nb_huge", "bitmaps extension with nb_bitmaps "
             "0xffffffff, directory at the (otherwise unused) tail of the "
             "refcount table cluster", 0xFFFFFFFF, 64,
             lambda ctx: ctx.lay.rt + CLUSTER // 2)
bitmaps_case("bitmaps_nb_65536", "bitmaps extension with nb_bitmaps 65536 "
             "(> 65535 limit)", 65536, 64,
             lambda ctx: ctx.lay.rt + CLUSTER // 2)
bitmaps_case("bitmaps_dir_past_eof", "bitmaps extension with directory "
             "offset past EOF", 1, 64, 1 << 40)
bitmaps_case("bitmaps_dir_misaligned", "bitmaps extension with directory "
             "offset not cluster aligned", 1, 64,
             lambda ctx: ctx.lay.rt + CLUSTER // 2 + 8)
bitmaps_case("bitmaps_dir_size_huge", "bitmaps extension with directory size "
             "2**40", 1, 1 << 40, lambda ctx: ctx.lay.rt + CLUSTER // 2)
bitmaps_case("bitmaps_dir_past_eof_no_autoclear", "bitmaps extension with "
             "directory past EOF but autoclear bit clear (ext must be "
             "ignored)", 1, 64, 1 << 40, autoclear=False)


@case("bitmaps_ext_short", "bitmaps extension with length 8 (needs 24)")
def _(img, ctx):
    exts = parse_exts(img, hget(img, "header_length"))
    write_exts(img, [(EXT_BITMAPS, bitmaps_ext(1, 64, 1 << 40)[1][:8])] + exts)
    hset(img, "autoclear_features", AUTOCLEAR_BITMAPS)


# ---- L1 / L2 entries -----------------------------------------------------


def l1_entry(idx: int, value) -> Mutator:
    def m(img: bytearray, ctx: Ctx):
        v = value(ctx) if callable(value) else value
        put(img, ctx.lay.l1 + 8 * idx, "Q", v)
    return m


def l2_entry(idx: int, value) -> Mutator:
    def m(img: bytearray, ctx: Ctx):
        v = value(ctx) if callable(value) else value
        put(img, ctx.lay.l2 + 8 * idx, "Q", v)
    return m


add("l1_entry_past_eof", "L1[0] points to an L2 table far past EOF", "v3",
    l1_entry(0, L2_COPIED | (1 << 40)))
add("l1_entry_just_past_eof", "L1[0] points to the cluster just past EOF",
    "v3", l1_entry(0, lambda ctx: L2_COPIED | ctx.lay.size))
add("l1_entry_misaligned", "L1[0] = L2 offset + 512 (not cluster aligned)",
    "v3", l1_entry(0, lambda ctx: L2_COPIED | (ctx.lay.l2 + 512)))
add("l1_entry_reserved_bits", "L1[0] with reserved bits 1-8 set", "v3",
    l1_entry(0, lambda ctx: L2_COPIED | ctx.lay.l2 | 0x1FE))
add("l1_entry_header_cluster", "L1[0] points at the header cluster (L2 "
    "table = cluster 0)", "v3", l1_entry(0, L2_COPIED | 0))
add("l1_entry_zero", "L1[0] = 0 (L2 table unallocated; the old L2 and "
    "data clusters are leaked)", "v3", l1_entry(0, 0))
add("l1_entry_points_to_l1", "L1[0] points at the L1 table itself", "v3",
    l1_entry(0, lambda ctx: L2_COPIED | ctx.lay.l1))
add("l1_entry_points_to_refblock", "L1[0] points at the refcount block",
    "v3", l1_entry(0, lambda ctx: L2_COPIED | ctx.lay.rb))
add("l1_entry_copied_clear", "L1[0] without the COPIED flag (refcount is 1)",
    "v3", l1_entry(0, lambda ctx: ctx.lay.l2))


@case("l1_two_entries_same_l2", "virtual size 1 GiB, l1_size 2, L1[0] and "
      "L1[1] both point at the same L2 table")
def _(img, ctx):
    hset(img, "size", 1 << 30)
    hset(img, "l1_size", 2)
    put(img, ctx.lay.l1 + 8, "Q", get(img, ctx.lay.l1, "Q"))


add("l2_entry_past_eof", "L2[0] points to a data cluster far past EOF "
    "(wild offset)", "v3", l2_entry(0, L2_COPIED | (1 << 40)))
add("l2_entry_past_eof_max", "L2[0] with every offset bit set", "v3",
    l2_entry(0, L2_COPIED | OFFSET_MASK))
add("l2_entry_misaligned", "L2[0] = data offset + 512", "v3",
    l2_entry(0, lambda ctx: L2_COPIED | (ctx.lay.data + 512)))
add("l2_entry_reserved_bits", "L2[0] with reserved bits 1-8 set", "v3",
    l2_entry(0, lambda ctx: L2_COPIED | ctx.lay.data | 0x1FE))
add("l2_entry_reserved_bits_56_61", "L2[0] with reserved bits 56-61 set",
    "v3", l2_entry(0, lambda ctx: L2_COPIED | ctx.lay.data | (0x3F << 56)))
add("l2_entry_zero_flag_with_offset", "L2[0] has zero flag and offset "
    "(v3: reads zeros, allocation kept)", "v3",
    l2_entry(0, lambda ctx: L2_COPIED | ctx.lay.data | 1))
add("l2_entry_zero_flag_v2", "v2 image with the zero flag set in L2[0] "
    "(v2 has no zero clusters)", "v2",
    l2_entry(0, lambda ctx: L2_COPIED | ctx.lay.data | 1))
add("l2_entry_points_to_header", "L2[0] = COPIED | offset 0 (data = "
    "header cluster?  offset 0 means unallocated for a standard cluster)",
    "v3", l2_entry(0, L2_COPIED | 0 | 0))
add("l2_entry_points_to_l2", "L2[0] points at the L2 table itself", "v3",
    l2_entry(0, lambda ctx: L2_COPIED | ctx.lay.l2))
add("l2_two_entries_same_cluster", "L2[0] and L2[1] map the same data "
    "cluster", "v3", l2_entry(1, lambda ctx: L2_COPIED | ctx.lay.data))
# Compressed descriptor (64k clusters): x = 62 - (16 - 8) = 54;
# bits 0..53 host offset, bits 54..61 number of additional 512-byte sectors.
add("l2_compressed_past_eof", "compressed L2[0] descriptor starting 16 bytes "
    "before EOF with 255 additional sectors (runs past EOF)", "v3",
    l2_entry(0, lambda ctx: L2_COMPRESSED | (0xFF << 54) | (ctx.lay.size - 16)))
add("l2_compressed_far_past_eof", "compressed L2[0] descriptor at 2**40",
    "v3", l2_entry(0, L2_COMPRESSED | (1 << 40)))
add("l2_compressed_garbage", "compressed L2[0] pointing at the 0xaa data "
    "cluster (not a deflate stream)", "v3",
    l2_entry(0, lambda ctx: L2_COMPRESSED | (3 << 54) | ctx.lay.data))
add("l2_compressed_with_copied", "compressed L2[0] with the COPIED flag set "
    "(invalid combination)", "v3",
    l2_entry(0, lambda ctx: L2_COPIED | L2_COMPRESSED | ctx.lay.data))

# ---- refcount structures -------------------------------------------------


def rt_entry(idx: int, value) -> Mutator:
    def m(img: bytearray, ctx: Ctx):
        v = value(ctx) if callable(value) else value
        put(img, ctx.lay.rt + 8 * idx, "Q", v)
    return m


add("rt_entry_past_eof", "refcount table entry 0 points past EOF", "v3",
    rt_entry(0, 1 << 40))
add("rt_entry_misaligned", "refcount table entry 0 = block + 512", "v3",
    rt_entry(0, lambda ctx: ctx.lay.rb + 512))
add("rt_entry_zero", "refcount table entry 0 cleared (every cluster has "
    "refcount 0)", "v3", rt_entry(0, 0))
add("rt_entry_points_to_header", "refcount table entry 0 = 0x200 (reserved "
    "bits / inside header cluster)", "v3", rt_entry(0, 0x200))
add("refblock_overlaps_l1", "refcount table entry 0 points at the L1 table "
    "(refcount block overlapping the L1 table)", "v3",
    rt_entry(0, lambda ctx: ctx.lay.l1))
add("rt_second_entry_past_eof", "refcount table entry 1 (unused range) "
    "points past EOF", "v3", rt_entry(1, 1 << 40))


@case("refcount_zeroed", "refcount block zeroed (all clusters refcount 0, "
      "i.e. metadata looks free)")
def _(img, ctx):
    img[ctx.lay.rb:ctx.lay.rb + CLUSTER] = bytes(CLUSTER)


@case("refcount_too_high", "refcount of every used cluster set to 2 "
      "(leaks)")
def _(img, ctx):
    for i in range(ctx.lay.size // CLUSTER):
        put(img, ctx.lay.rb + 2 * i, "H", 2)


@case("refcount_data_zero", "refcount of the first data cluster set to 0 "
      "(corruption)")
def _(img, ctx):
    put(img, ctx.lay.rb + 2 * (ctx.lay.data // CLUSTER), "H", 0)


@case("refcount_max", "refcount of the L2 table set to 0xffff")
def _(img, ctx):
    put(img, ctx.lay.rb + 2 * (ctx.lay.l2 // CLUSTER), "H", 0xFFFF)


# --------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------

_ENV = dict(os.environ, LC_ALL="C", LANG="C")

# QEMU opens a backing chain recursively without loop detection (only
# `info --backing-chain` detects loops): a self-referencing image keeps
# opening itself until it runs out of file descriptors.  With a large
# RLIMIT_NOFILE (20000 on the dev box) that takes far longer than the 10 s
# timeout while memory grows without bound; with the common soft limit of
# 1024 it fails after ~1 s (140 MB).  Every QEMU tool therefore runs with a
# soft limit of 256 descriptors (plenty for any non-looping image here), so
# loops fail in ~0.1 s with rc 1 and "... Too many open files".
NOFILE_LIMIT = 256
_LIMIT_PREFIX = ["sh", "-c",
                 f'ulimit -Sn {NOFILE_LIMIT} 2>/dev/null; exec "$0" "$@"']


def _run(args: list[str], cwd: Path | None = None,
         timeout: float = QEMU_TIMEOUT) -> tuple[int | None, str, str]:
    """(rc, stdout, stderr) of a QEMU tool under the descriptor limit; rc None after a
    timeout."""
    try:
        rc, out, err = qemu.run(*_LIMIT_PREFIX, *args, check=False, cwd=cwd,
                                timeout=timeout, env=_ENV)
    except subprocess.TimeoutExpired:
        return None, "", "<timeout>"
    return rc, out, err


def _must(args: list[str], cwd: Path) -> None:
    rc, out, err = _run(args, cwd=cwd, timeout=60)
    if rc != 0:
        raise RuntimeError(f"{args!r} failed ({rc}): {out}{err}")


def make_bases(work: Path) -> dict[str, bytes]:
    """Create the valid base images with QEMU's tools; return their bytes."""
    work.mkdir(parents=True, exist_ok=True)
    sz = str(VSIZE)
    write = ["qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 128k"]
    _must(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
           "compat=1.1,cluster_size=65536", "v3.qcow2", sz], work)
    _must(write + ["v3.qcow2"], work)
    _must(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
           "compat=0.10,cluster_size=65536", "v2.qcow2", sz], work)
    _must(write + ["v2.qcow2"], work)
    _must(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
           "compat=1.1,cluster_size=65536", "snap.qcow2", sz], work)
    _must(write + ["snap.qcow2"], work)
    _must(["qemu-img", "snapshot", "-c", "s1", "snap.qcow2"], work)
    _must(["qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 0 64k",
           "snap.qcow2"], work)
    shutil.copyfile(work / "v3.qcow2", work / BACKING_BASE_NAME)
    _must(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
           "compat=1.1,cluster_size=65536", "-b", BACKING_BASE_NAME,
           "-F", "qcow2", "overlay.qcow2", sz], work)
    _must(["qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 128k",
           "overlay.qcow2"], work)
    bases = {k: (work / f"{k}.qcow2").read_bytes()
             for k in ("v3", "v2", "snap", "overlay")}
    # Sanity: the layout we rely on.
    for k, img in bases.items():
        assert hget(img, "magic") == QCOW2_MAGIC
        assert hget(img, "cluster_bits") == CLUSTER_BITS
        assert len(img) % CLUSTER == 0
    assert hget(bases["snap"], "nb_snapshots") == 1
    assert hget(bases["overlay"], "backing_file_offset") != 0
    return bases


def _first_line(s: str) -> str:
    for line in s.splitlines():
        if line.strip():
            return line.strip()
    return ""


def check_summary(out: str) -> str:
    """Non-zero counters from `qemu-img check --output=json` stdout."""
    try:
        j = json.loads(out)
    except ValueError:
        return ""
    keys = ("check-errors", "corruptions", "leaks", "corruptions-fixed",
            "leaks-fixed")
    return " ".join(f"{k}={j[k]}" for k in keys if j.get(k))


# key -> argv (PATH is appended).  "info"/"check" are what a user types
# (format probed); the others force the qcow2 driver.
COMMANDS: dict[str, list[str]] = {
    "info": ["qemu-img", "info", "--output=json"],
    "check": ["qemu-img", "check", "--output=json"],
    "finfo": ["qemu-img", "info", "-f", "qcow2", "--output=json"],
    "fcheck": ["qemu-img", "check", "-f", "qcow2", "--output=json"],
    "chain": ["qemu-img", "info", "-f", "qcow2", "--backing-chain",
              "--output=json"],
    "read": ["qemu-io", "-r", "-f", "qcow2", "-c", "read 0 128k"],
}


def _has_backing_name(path: Path) -> bool:
    with open(path, "rb") as f:
        hdr = f.read(20)
    return (len(hdr) == 20 and get(hdr, 0, "I") == QCOW2_MAGIC
            and get(hdr, 8, "Q") != 0 and get(hdr, 16, "I") != 0)


def _probed_qcow2(r: QemuRun) -> bool:
    if r.rc != 0:
        return False
    try:
        return json.loads(r.stdout).get("format") == "qcow2"
    except ValueError:
        return False


def _exec(c: Case, key: str) -> None:
    argv = COMMANDS[key] + [str(c.path)]
    rc, out, err = _run(argv, cwd=c.path.parent)
    c.runs[key] = QemuRun(argv, rc, out, err)


def _run_job(job: tuple[Case, str]) -> None:
    c, key = job
    _exec(c, key)
    if key == "info" and not _probed_qcow2(c.runs["info"]):
        # Only then can forcing the qcow2 driver make a difference.
        _exec(c, "finfo")
        _exec(c, "fcheck")


def run_qemu(cases: list[Case], jobs: int | None = None) -> None:
    """Run QEMU's tools on every case (in parallel) and record the results.

    info, check and read always run; finfo/fcheck only when the probed
    `info` did not open the file as qcow2 (otherwise they are the very same
    call and are reported as "="); chain only for images with a backing file
    name ("-" otherwise).
    """
    work = []
    for c in cases:
        c.runs = {}
        keys = ["info", "check", "read"]
        if _has_backing_name(c.path):
            keys.append("chain")
        work += [(c, k) for k in keys]
    # Potentially slow ones (backing chains) first so they overlap the rest.
    work.sort(key=lambda j: not j[0].name.startswith("backing_"))
    jobs = jobs or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        list(ex.map(_run_job, work))
    for c in cases:
        c.runs = {k: c.runs[k] for k in COMMANDS if k in c.runs}
        c.qemu_info_rc = c.runs["info"].rc
        c.qemu_check_rc = c.runs["check"].rc


def build_corpus(dir: Path, run: bool = True, jobs: int | None = None
                 ) -> list[Case]:
    """Write every corpus image into *dir*; run QEMU's tools on each.

    Returns one :class:`Case` per image, in a stable order.  The valid base
    images are kept in ``dir/_base``; companion files (backing files) are
    written next to the image that needs them.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    bases = make_bases(dir / "_base")
    layouts = {k: Layout.of(v) for k, v in bases.items()}
    cases: list[Case] = []
    seen: set[str] = set()
    for spec in SPECS:
        assert spec.name not in seen, spec.name
        seen.add(spec.name)
        ctx = Ctx(dir=dir, name=spec.name, lay=layouts[spec.base or "v3"],
                  bases=bases)
        img = bytearray(bases[spec.base]) if spec.base else bytearray()
        res = spec.mutate(img, ctx)
        path = dir / f"{spec.name}.qcow2"
        path.write_bytes(bytes(img if res is None else res))
        cases.append(Case(spec.name, path, spec.description, None, None,
                          companions=list(ctx.companions)))
    if run:
        run_qemu(cases, jobs)
    return cases


def case_names() -> list[str]:
    return [s.name for s in SPECS]


_REPEAT = re.compile(r"(Could not open backing file: )\1+")


def short_message(text: str, dir: Path | None = None, width: int = 200
                  ) -> str:
    """First non-empty line; tmp dir shown as <dir>, repetitions collapsed."""
    s = _first_line(text)
    if dir is not None:
        s = s.replace(str(dir) + "/", "<dir>/").replace(str(dir), "<dir>")
    s = _REPEAT.sub(lambda m: f"{m.group(1)}[x{len(m.group(0)) // len(m.group(1))}] ",
                    s)
    return s if len(s) <= width else s[:width - 3] + "..."


def _rc(v: int | None) -> str:
    return "T/O" if v is None else str(v)


def _cell(c: Case, key: str) -> str:
    if key in c.runs:
        return _rc(c.runs[key].rc)
    return "=" if key in ("finfo", "fcheck") else "-"


def _run_text(key: str, r: QemuRun) -> str:
    if key == "read":
        return r.stderr + r.stdout if r.rc else r.stderr
    return r.stderr


def format_reference(cases: list[Case], dir: Path | None = None) -> str:
    """Human-readable summary (paths under *dir* shown as <dir>/)."""
    cols = list(COMMANDS)
    ver = _first_line(_run(["qemu-img", "--version"])[1])
    lines = [
        "# How QEMU reacts to the damaged images of tests/helpers/corpus.py.",
        "# Regenerate: WRITE_CORPUS_REF=1 python -m pytest -q "
        "tests/interop/test_corpus_qemu.py",
        f"# {ver}; tools run with LC_ALL=C, ulimit -Sn {NOFILE_LIMIT}, "
        f"{QEMU_TIMEOUT:g} s timeout.",
        "#",
        "# columns (image path appended to each command):",
    ]
    lines += [f"#   {k:6} = {' '.join(COMMANDS[k])}" for k in cols]
    lines += [
        "# finfo/fcheck run only when the probed info did not open the file "
        "as qcow2 ('=': same",
        "#   as info/check); chain runs only for images whose header names "
        "a backing file ('-').",
        "# rc: T/O = killed after the timeout; negative = killed by that "
        "signal (-11 = SIGSEGV).",
        "# qemu-img check rc: 0 clean, 1 check not completed (open error / "
        "internal error),",
        "#   2 corruptions found, 3 only leaks found, 63 format has no check "
        "(probed as raw).",
        "# message: first stderr line of check, else info, fcheck, finfo, "
        "chain, read (if it failed).",
        "",
        f"{'name':38}" + "".join(f"{k:>7}" for k in cols) + "  message",
    ]
    for c in cases:
        msg = ""
        for k in ("check", "info", "fcheck", "finfo", "chain", "read"):
            r = c.runs.get(k)
            if r is not None and (k != "read" or r.rc):
                msg = short_message(_run_text(k, r), dir)
                if msg:
                    break
        lines.append(f"{c.name:38}" + "".join(
            f"{_cell(c, k):>7}" for k in cols) + f"  {msg}")
    lines += ["", "# ---- details per case: rc, first stderr line (read: "
              "first output line if it failed), check JSON counters ----", ""]
    for c in cases:
        lines.append(f"[{c.name}] {c.description}")
        for k, r in c.runs.items():
            text = _run_text(k, r)
            nl = len([x for x in text.splitlines() if x.strip()])
            more = f" (+{nl - 1} more lines)" if nl > 1 else ""
            lines.append(f"  {k:6} rc={_rc(r.rc):>3}  "
                         f"{short_message(text, dir)}{more}".rstrip())
            if k in ("check", "fcheck") and check_summary(r.stdout):
                lines.append(f"{'':20}json: {check_summary(r.stdout)}")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys
    import tempfile
    import time

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    t0 = time.monotonic()
    cs = build_corpus(out)
    dt = time.monotonic() - t0
    print(format_reference(cs, out))
    print(f"# {len(cs)} cases in {dt:.2f}s -> {out}", file=sys.stderr)
