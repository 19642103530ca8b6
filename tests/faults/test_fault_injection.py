"""Fault injection on every mutating operation of the write path.

For each scenario (an image built with QEMU's tools plus one engine
operation) we first run the operation on a copy and count its fileio calls
(N), then, for each injection point i (all of them for small N; the first
40, a deterministic sample and the last one otherwise), on a fresh copy:

* run the operation with call i failing, in "error" mode (``OSError(EIO)``,
  the engine's error handling runs) and in "crash" mode (``SimulatedCrash``;
  no fileio call reaches the disk from then on, image fds are dropped);
* then, outside the injection, with QEMU's tools: ``qemu-img check
  --output=json`` reports no corruption (leaks allowed: rc 0 or 3; a dirty
  lazy_refcounts image may show refcount corruptions, as QEMU's own crashed
  images do), the guest content (``qemu-img convert -O raw``) is, cluster by
  cluster, the old content or the new one (the content after a successful
  run on another copy), and it is entirely the new one if the operation
  reported success; internal snapshots are untouched;
* ``qemu-img check -r all`` leaves the image clean (rc 0) with the guest
  content unchanged by the repair.

A few scenarios are also run with a real process death (``os._exit(137)``
at call i) in a forked child and in a fresh interpreter running the CLI.

The injection framework itself (tests/helpers/faultinject.py) is proven against a
stand-in fileio module in tests/unit/test_faultinject.py.
"""
from __future__ import annotations

import gc
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from tests.helpers.faultinject import (KILL_EXIT_CODE, inject, injection_points,
                                       power_loss_failures, run_injected,
                                       run_killed, run_killed_script)
from tests.helpers.images import create_image, read_header, set_refcount
from tests.helpers.qemu import guest_bytes_or_error, qemu_img, qemu_img_check, qemu_io, run

KiB = 1024
MiB = 1024 * KiB

# Caps on injection points per scenario and mode (see injection_points).
FIRST = int(os.environ.get("QCOW2ENGINE_FI_FIRST", "40"))
SAMPLE = int(os.environ.get("QCOW2ENGINE_FI_SAMPLE", "12"))
# power-loss modes: the flushes (where the most writes are pending), a few other calls, and
# the point after the last call (see power_loss_points)
LOSE_FLUSHES = int(os.environ.get("QCOW2ENGINE_FI_LOSE_FLUSHES", "12"))
LOSE_OTHERS = int(os.environ.get("QCOW2ENGINE_FI_LOSE_OTHERS", "4"))


# ==========================================================================
# The engine
# ==========================================================================

def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclass
class Scenario:
    name: str
    build: Callable[[Path], Path]          # template dir -> image path (maybe not yet existing)
    op: Callable[[Path], Any]              # the engine operation on an image path
    model: Callable[[bytes], bytes] | None = None   # expected new content from the old
    kind: str = "guest"                    # "guest" | "create" | "resize"
    snapshots: tuple[str, ...] = ()
    # op's return value -> True if it reports a failure (e.g. check_errors)
    reported_failure: Callable[[Any], bool] = lambda r: False

    def __repr__(self) -> str:
        return self.name


# -- engine operations ------------------------------------------------------

def _engine():
    import qcow2engine
    return qcow2engine


def op_write(offset: int, data: bytes) -> Callable[[Path], None]:
    def op(img: Path) -> None:
        with _engine().open_chain(str(img), writable=True) as c:
            c.write(offset, data)
    return op


def op_write_zeroes(offset: int, length: int, unmap: bool) -> Callable[[Path], None]:
    def op(img: Path) -> None:
        with _engine().open_chain(str(img), writable=True) as c:
            c.write_zeroes(offset, length, unmap=unmap)
    return op


def op_discard(offset: int, length: int) -> Callable[[Path], None]:
    def op(img: Path) -> None:
        with _engine().open_chain(str(img), writable=True) as c:
            c.discard(offset, length)
    return op


def op_sequence(steps) -> Callable[[Path], None]:
    """Several requests on one open image: ("write", off, data), ("zero", off, len),
    ("discard", off, len).  The last metadata of a request is covered by the next request's
    barriers, so a crash may cut anywhere in the sequence."""
    def op(img: Path) -> None:
        with _engine().open_chain(str(img), writable=True) as c:
            for kind, off, arg in steps:
                if kind == "write":
                    c.write(off, arg)
                elif kind == "zero":
                    c.write_zeroes(off, arg)
                else:
                    c.discard(off, arg)
    return op


def m_sequence(steps) -> Callable[[bytes], bytes]:
    def model(old: bytes) -> bytes:
        for kind, off, arg in steps:
            data = arg if kind == "write" else bytes(arg)
            old = old[:off] + data + old[off + len(data):]
        return old
    return model


def op_create(size: int, options=None, **kw) -> Callable[[Path], None]:
    def op(img: Path) -> None:
        _engine().create(str(img), size, options, **kw)
    return op


def op_repair(img: Path):
    return _engine().check(str(img), repair="all")


def _repair_failed(result) -> bool:
    return bool(getattr(result, "check_errors", 0)) or getattr(result, "exit_code", 0) not in (0,)


def op_resize(size: int, shrink: bool = False) -> Callable[[Path], None]:
    def op(img: Path) -> None:
        _engine().resize(str(img), size, shrink=shrink)
    return op


def op_amend(options: str) -> Callable[[Path], None]:
    def op(img: Path) -> None:
        _engine().amend(str(img), options)
    return op


def m_same(old: bytes) -> bytes:
    return old


def m_write(offset: int, data: bytes) -> Callable[[bytes], bytes]:
    return lambda old: old[:offset] + data + old[offset + len(data):]


def m_zero(offset: int, length: int) -> Callable[[bytes], bytes]:
    return lambda old: old[:offset] + bytes(length) + old[offset + length:]


def m_resize(size: int) -> Callable[[bytes], bytes]:
    return lambda old: old[:size] + bytes(max(0, size - len(old)))


# -- template images (built with QEMU's tools) -------------------------------

def b_alloc_4k_rc64(d: Path) -> Path:
    # 4k clusters, 64-bit refcounts: a refcount block covers 2 MiB of file,
    # an L2 table 2 MiB of guest.  The file is ~1.9 MiB: the write below
    # needs a new L2 table and a new refcount block.
    img = create_image(d, "img.qcow2", 4 * MiB, opts="cluster_size=4k,refcount_bits=64")
    qemu_io(img.name, "write -P 0x11 0 1900k", cwd=d)
    return img


def b_64k(d: Path) -> Path:
    img = create_image(d, "img.qcow2", 8 * MiB, opts="cluster_size=64k")
    qemu_io(img.name, "write -P 0x21 0 256k", "write -P 0x22 1M 64k",
            "write -P 0x23 5M 100k", cwd=d)
    return img


def b_4k(d: Path) -> Path:
    img = create_image(d, "img.qcow2", 4 * MiB, opts="cluster_size=4k")
    qemu_io(img.name, "write -P 0x71 0 1M", "write -P 0x72 3M 4k", cwd=d)
    return img


def b_backing(d: Path) -> Path:
    create_image(d, "base.qcow2", 8 * MiB)
    qemu_io("base.qcow2", "write -P 0xb0 0 8M", cwd=d)
    img = create_image(d, "top.qcow2", 8 * MiB, opts="cluster_size=64k", backing="base.qcow2")
    qemu_io(img.name, "write -P 0x41 64k 64k", cwd=d)
    return img


def b_snapshot(d: Path) -> Path:
    img = create_image(d, "img.qcow2", 4 * MiB, opts="cluster_size=64k")
    qemu_io(img.name, "write -P 0x51 0 1M", cwd=d)
    run("qemu-img", "snapshot", "-c", "s1", img.name, cwd=d)
    qemu_io(img.name, "write -P 0x52 2M 64k", cwd=d)
    return img


def b_extl2_backing(d: Path) -> Path:
    create_image(d, "base.qcow2", 8 * MiB)
    qemu_io("base.qcow2", "write -P 0xc0 0 8M", cwd=d)
    img = create_image(d, "top.qcow2", 8 * MiB, opts="cluster_size=64k,extended_l2=on",
                       backing="base.qcow2")
    qemu_io(img.name, "write -P 0x61 4k 4k", "write -z 40k 2k", cwd=d)
    return img


def b_empty(d: Path) -> Path:
    return d / "new.qcow2"


def b_empty_with_base(d: Path) -> Path:
    create_image(d, "base.qcow2", 8 * MiB)
    qemu_io("base.qcow2", "write -P 0xd0 0 3M", "write -P 0xd1 7M 1M", cwd=d)
    return d / "new.qcow2"


def b_leaks(d: Path) -> Path:
    img = create_image(d, "img.qcow2", 4 * MiB, opts="cluster_size=64k")
    qemu_io(img.name, "write -P 0x31 0 192k", "write -P 0x32 2M 64k", cwd=d)
    cs = 64 * KiB
    # the header cluster with refcount 2 (a leak; a data cluster would be an
    # OFLAG_COPIED corruption) ...
    set_refcount(img, 0, 2)
    # ... and an unreferenced cluster past the end with refcount 1 (leak)
    end = (img.stat().st_size + cs - 1) // cs * cs
    with open(img, "r+b") as f:
        f.truncate(end + cs)
    set_refcount(img, end // cs, 1)
    rc = qemu_img("check", img.name, cwd=d).returncode
    assert rc == 3, "template should have leaks only"
    return img


def b_dirty_lazy(d: Path) -> Path:
    img = create_image(d, "img.qcow2", 4 * MiB, opts="cluster_size=64k,lazy_refcounts=on")
    qemu_io(img.name, "write -P 0x81 0 128k", cwd=d)
    proc = qemu_io(img.name, "write -P 0x82 1M 128k", "write -P 0x83 3M 5k", "abort",
                   cwd=d, check=False)
    assert proc.returncode != 0, "qemu-io abort did not abort"
    assert read_header(img)["incompatible_features"] & 1, "template should be dirty"
    return img


def b_grow(d: Path) -> Path:
    img = create_image(d, "img.qcow2", 4 * MiB, opts="cluster_size=4k")
    qemu_io(img.name, "write -P 0x91 0 64k", f"write -P 0x92 {4 * MiB - 4096} 4k", cwd=d)
    return img


def b_shrink(d: Path) -> Path:
    img = create_image(d, "img.qcow2", 8 * MiB, opts="cluster_size=64k")
    qemu_io(img.name, "write -P 0xa1 0 1M", "write -P 0xa2 3M 2M", "write -P 0xa3 7M 1M",
            cwd=d)
    return img


def b_grow_over_backing(d: Path) -> Path:
    # a 1 MiB image over a 4 MiB backing file full of data: growing it to 3 MiB must make
    # [1M, 3M) read zeros, never the backing file's bytes
    create_image(d, "base.qcow2", 4 * MiB)
    qemu_io("base.qcow2", "write -P 0xe0 0 4M", cwd=d)
    img = create_image(d, "top.qcow2", 1 * MiB, opts="cluster_size=64k", backing="base.qcow2")
    qemu_io(img.name, "write -P 0xe1 64k 64k", cwd=d)
    return img


def b_bitmap(d: Path) -> Path:
    # an enabled persistent bitmap: the write marks it in use, and closing stores its bits
    img = create_image(d, "img.qcow2", 8 * MiB, opts="cluster_size=64k")
    qemu_io(img.name, "write -P 0xb1 0 1M", cwd=d)
    run("qemu-img", "bitmap", "--add", img.name, "b0", cwd=d)
    return img


def b_shrink_bitmaps(d: Path) -> Path:
    # persistent bitmaps (one of 512-byte granularity, whose table shrinks) resized with
    # the image: marked in use, tables replaced, in use cleared
    img = b_shrink(d)
    run("qemu-img", "bitmap", "--add", "-g", "512", img.name, "fine", cwd=d)
    run("qemu-img", "bitmap", "--add", img.name, "b0", cwd=d)
    qemu_io(img.name, "write -P 0xa5 5M 64k", "write -P 0xa6 7M 512k", cwd=d)
    return img


def b_amend_zeros(d: Path) -> Path:
    # 4k clusters with zero clusters, a snapshot: amend to compat=0.10 expands the zero
    # clusters into data and rewrites the header; refcount_bits rewrites every block
    img = create_image(d, "img.qcow2", 4 * MiB, opts="cluster_size=4k")
    qemu_io(img.name, "write -P 0x31 0 1M", "write -z 256k 64k", "write -z 2M 12k", cwd=d)
    run("qemu-img", "snapshot", "-c", "s1", img.name, cwd=d)
    qemu_io(img.name, "write -P 0x32 512k 64k", "write -z 3M 8k", cwd=d)
    return img


def b_amend_v2(d: Path) -> Path:
    # a v2 image with a snapshot: amend to compat=1.1 completes the snapshot entries
    img = create_image(d, "img.qcow2", 4 * MiB, opts="compat=0.10,cluster_size=4k")
    qemu_io(img.name, "write -P 0x41 0 1M", cwd=d)
    run("qemu-img", "snapshot", "-c", "s1", img.name, cwd=d)
    qemu_io(img.name, "write -P 0x42 100k 20k", cwd=d)
    return img


def b_shrink_512(d: Path) -> Path:
    # 512-byte clusters: the shrink unhooks refcount blocks left empty and cuts the file
    img = create_image(d, "img.qcow2", 1 * MiB, opts="cluster_size=512,refcount_bits=64")
    qemu_io(img.name, "write -P 0xa4 0 1M", cwd=d)
    return img


def b_alloc_512_rc64(d: Path) -> Path:
    # 512-byte clusters, 64-bit refcounts: a refcount block covers 32 KiB of
    # file and the one-cluster refcount table 2 MiB.  The file is ~1.95 MiB:
    # the write below must grow the refcount table.
    img = create_image(d, "img.qcow2", 4 * MiB, opts="cluster_size=512,refcount_bits=64")
    qemu_io(img.name, "write -P 0x12 0 1800k", cwd=d)
    return img


D1 = _rand(300 * KiB, 1)
D2 = _rand(200_000, 2)
D3 = _rand(200_000, 3)
D4 = _rand(70_000, 4)
D5 = _rand(100_000, 5)
D6 = _rand(70_000, 6)

# disjoint requests on b_snapshot: L2 table shared with s1 (copied by the first write),
# allocations in the copied table, a data cluster shared with s1 copied, an overwrite in
# place, a discard and a zero write that drop references, a partial write past them
SEQ = [("write", 3 * MiB, bytes([0x61]) * (64 * KiB)),
       ("write", 3 * MiB + 128 * KiB, bytes([0x62]) * (64 * KiB)),
       ("write", 100 * KiB, bytes([0x63]) * 5000),
       ("write", 2 * MiB, bytes([0x64]) * 4096),
       ("discard", 512 * KiB, 64 * KiB),
       ("zero", 256 * KiB, 64 * KiB),
       ("write", 3 * MiB + 256 * KiB + 100, bytes([0x65]) * 10000)]

SCENARIOS = [
    # allocating write: new data clusters, a new L2 table, a new refcount block
    Scenario("write_alloc_4k_rc64", b_alloc_4k_rc64,
             op_write(2 * MiB - 5000, D1), m_write(2 * MiB - 5000, D1)),
    # 512-byte clusters: the refcount table itself must grow
    Scenario("write_reftable_grow_512", b_alloc_512_rc64,
             op_write(3 * MiB + 300, D1), m_write(3 * MiB + 300, D1)),
    # partly in place, partly allocating with zero-filled tail
    Scenario("write_alloc_64k", b_64k, op_write(200_000, D2), m_write(200_000, D2)),
    # in place only (all clusters allocated, refcount 1)
    Scenario("write_inplace_64k", b_64k, op_write(100, D3), m_write(100, D3)),
    # COW from a backing file: unaligned head and tail over 2 clusters
    Scenario("write_cow_backing", b_backing, op_write(3 * MiB + 1000, D4),
             m_write(3 * MiB + 1000, D4)),
    # COW of clusters (and their L2 table) shared with an internal snapshot
    Scenario("write_cow_snapshot", b_snapshot, op_write(300_000, D5), m_write(300_000, D5),
             snapshots=("s1",)),
    # extended L2 over a backing file: partial subclusters, 2 clusters
    Scenario("write_extl2_backing", b_extl2_backing, op_write(10_000, D6),
             m_write(10_000, D6)),
    Scenario("write_sequence_snapshot", b_snapshot, op_sequence(SEQ), m_sequence(SEQ),
             snapshots=("s1",)),
    Scenario("write_zeroes_64k", b_64k, op_write_zeroes(100_000, 300_000, False),
             m_zero(100_000, 300_000)),
    Scenario("write_zeroes_unmap_4k", b_4k, op_write_zeroes(40 * KiB + 100, 80 * KiB, True),
             m_zero(40 * KiB + 100, 80 * KiB)),
    Scenario("discard_64k", b_64k, op_discard(0, 256 * KiB), m_zero(0, 256 * KiB)),
    Scenario("discard_snapshot", b_snapshot, op_discard(128 * KiB, 256 * KiB),
             m_zero(128 * KiB, 256 * KiB), snapshots=("s1",)),
    Scenario("create_64k", b_empty, op_create(4 * MiB, "cluster_size=64k"),
             lambda old: bytes(4 * MiB), kind="create"),
    Scenario("create_extl2_backing", b_empty_with_base,
             op_create(8 * MiB, {"cluster_size": "64k", "extended_l2": "on"},
                       backing_file="base.qcow2", backing_fmt="qcow2"),
             None, kind="create"),
    Scenario("create_prealloc_metadata_4k", b_empty,
             op_create(2 * MiB, "cluster_size=4k,preallocation=metadata"),
             lambda old: bytes(2 * MiB), kind="create"),
    Scenario("repair_leaks", b_leaks, op_repair, lambda old: old,
             reported_failure=_repair_failed),
    Scenario("repair_dirty_lazy", b_dirty_lazy, op_repair, lambda old: old,
             reported_failure=_repair_failed),
    Scenario("resize_grow_4k", b_grow, op_resize(12 * MiB), m_resize(12 * MiB), kind="resize"),
    Scenario("resize_shrink_64k", b_shrink, op_resize(4 * MiB, shrink=True),
             m_resize(4 * MiB), kind="resize"),
    Scenario("write_bitmap", b_bitmap, op_write(3 * MiB + 100, D1), m_write(3 * MiB + 100, D1)),
    Scenario("resize_grow_over_backing", b_grow_over_backing, op_resize(3 * MiB),
             m_resize(3 * MiB), kind="resize"),
    Scenario("resize_shrink_bitmaps", b_shrink_bitmaps, op_resize(6 * MiB + 4 * KiB,
                                                                  shrink=True),
             m_resize(6 * MiB + 4 * KiB), kind="resize"),
    Scenario("resize_shrink_512", b_shrink_512, op_resize(256 * KiB, shrink=True),
             m_resize(256 * KiB), kind="resize"),
    Scenario("amend_refcount_bits_64", b_amend_zeros, op_amend("refcount_bits=64"), m_same,
             snapshots=("s1",)),
    Scenario("amend_refcount_bits_4", b_amend_zeros, op_amend("refcount_bits=4"), m_same,
             snapshots=("s1",)),
    Scenario("amend_downgrade", b_amend_zeros, op_amend("compat=0.10"), m_same,
             snapshots=("s1",)),
    Scenario("amend_upgrade", b_amend_v2, op_amend("compat=1.1,lazy_refcounts=on"), m_same,
             snapshots=("s1",)),
    Scenario("create_prealloc_metadata_512", b_empty,
             op_create(1 * MiB, "cluster_size=512,preallocation=metadata"),
             lambda old: bytes(1 * MiB), kind="create"),
]
BY_NAME = {s.name: s for s in SCENARIOS}


# -- inspecting an image with QEMU's tools ------------------------------------

def _header_flags(img: Path) -> tuple[bool, bool]:
    """(dirty bit, lazy_refcounts)"""
    h = read_header(img)
    return bool(h["incompatible_features"] & 1), bool(h["compatible_features"] & 1)


def _check(img: Path) -> tuple[int, dict, str]:
    return qemu_img_check(img.name, cwd=img.parent)


def _guest(img: Path, snapshot: str | None = None) -> bytes | str:
    """Guest content via qemu-img convert -O raw, or an error string."""
    return guest_bytes_or_error(img, fmt="qcow2",
                                snapshot=f"snapshot.name={snapshot}" if snapshot else None)


def _is_qcow2_file(img: Path) -> bool:
    try:
        with open(img, "rb") as f:
            return f.read(4) == b"QFI\xfb"
    except FileNotFoundError:
        return False


def _cluster_size(img: Path) -> int:
    return read_header(img)["cluster_size"]


def _diff_blocks(a: bytes, b: bytes, g: int) -> np.ndarray:
    """Boolean array: block k of size g differs between a and b."""
    n = len(a)
    pad = -n % g
    x = np.frombuffer(a + bytes(pad), dtype=np.uint8).reshape(-1, g)
    y = np.frombuffer(b + bytes(pad), dtype=np.uint8).reshape(-1, g)
    return (x != y).any(axis=1)


def _old_or_new(content: bytes, old: bytes, new: bytes, g: int, *,
                tail_may_be_zero_from: int | None = None) -> str | None:
    """None if every g-sized block of content is the old or the new one."""
    if len(content) != len(old) or len(old) != len(new):
        return f"size {len(content)} (old {len(old)}, new {len(new)})"
    bad = _diff_blocks(content, old, g) & _diff_blocks(content, new, g)
    if tail_may_be_zero_from is not None:
        zero = bytes(len(content))
        k = tail_may_be_zero_from // g
        bad[k:] &= _diff_blocks(content, zero, g)[k:]
    if bad.any():
        idx = np.nonzero(bad)[0]
        return (f"{len(idx)} cluster(s) of {g} bytes are neither old nor new, first at guest "
                f"offset {int(idx[0]) * g:#x}")
    return None


# -- per-scenario preparation (template, counts, old and new contents) --------

@dataclass
class Prepared:
    template: Path
    img_rel: str
    old: bytes | None                 # None for create
    new: bytes
    snaps: dict[str, bytes]
    calls: list
    points: list[int]
    granularity: int


_PREPARED: dict[str, Prepared] = {}
_PREP_ERRORS: dict[str, str] = {}


@pytest.fixture(scope="module")
def fi_root(tmp_path_factory):
    return tmp_path_factory.mktemp("faultinject")


def _prepare(sc: Scenario, root: Path) -> Prepared:
    """Template image, fileio calls of a successful run, old and new content
    (once per scenario; a failure is remembered for the scenario's other tests)."""
    if sc.name in _PREPARED:
        return _PREPARED[sc.name]
    if sc.name in _PREP_ERRORS:
        pytest.fail(f"{sc.name}: preparation failed: {_PREP_ERRORS[sc.name]}")
    tdir = root / "templates" / sc.name
    w = root / "baseline" / sc.name
    try:
        tdir.mkdir(parents=True)
        img = sc.build(tdir)
        rel = str(img.relative_to(tdir))
        old = None if sc.kind == "create" else _guest(img)
        assert not isinstance(old, str), old
        snaps = {s: _guest(img, s) for s in sc.snapshots}
        # a successful run on a copy: count calls, take the new content
        shutil.copytree(tdir, w)
        wimg = w / rel
        with inject(None, paths=[w]) as inj:
            sc.op(wimg)
        calls = inj.calls
        assert calls, f"{sc.name}: the operation made no fileio call"
        assert not inj.bypasses, f"{sc.name}: writes bypassing fileio: {inj.bypasses[:3]}"
        gc.collect()
        assert not inj.leaked_fds(), f"{sc.name}: fds left open: {inj.leaked_fds()}"
        rc, data, err = _check(wimg)
        assert rc == 0, f"{sc.name}: after a successful run qemu-img check rc={rc} {data} {err}"
        new = _guest(wimg)
        assert not isinstance(new, str), new
        for s, content in snaps.items():
            assert _guest(wimg, s) == content, f"{sc.name}: snapshot {s} changed"
        g = _cluster_size(wimg)
    except BaseException as e:
        _PREP_ERRORS[sc.name] = f"{type(e).__name__}: {e}"
        shutil.rmtree(tdir, ignore_errors=True)
        shutil.rmtree(w, ignore_errors=True)
        raise
    p = Prepared(tdir, rel, old, new, snaps, calls,
                 injection_points(len(calls), FIRST, SAMPLE), g)
    _PREPARED[sc.name] = p
    shutil.rmtree(w)
    return p


def _verify(sc: Scenario, prep: Prepared, img: Path, succeeded: bool) -> list[str]:
    """QEMU's view of the image after the (failed or not) operation."""
    problems: list[str] = []
    if sc.kind == "create" and (not _is_qcow2_file(img)):
        # nothing (or not yet a qcow2 file) was created: the "old" state
        if succeeded:
            problems.append("create reported success but no qcow2 image exists")
        return problems
    rc, data, err = _check(img)
    dirty, lazy = _header_flags(img)
    corr, cerr = data.get("corruptions", 0), data.get("check-errors", 0)
    if rc not in (0, 3) or corr or cerr:
        if not (dirty and lazy and rc == 2 and not cerr):
            problems.append(f"qemu-img check rc={rc} corruptions={corr} check-errors={cerr} "
                            f"leaks={data.get('leaks', 0)} dirty={dirty}: "
                            + " | ".join(err.splitlines()[:4]))
            return problems
    content = _guest(img)
    if isinstance(content, str):
        return problems + [content]
    problems += _content_problems(sc, prep, content, succeeded)
    for s, snap in prep.snaps.items():
        if _guest(img, s) != snap:
            problems.append(f"internal snapshot {s} content changed")
    if rc != 0 or dirty:
        r = qemu_img("check", "-r", "all", img.name, cwd=img.parent)
        if r.returncode != 0:
            problems.append(f"qemu-img check -r all rc={r.returncode}: "
                            + " | ".join((r.stdout + r.stderr).strip().splitlines()[-4:]))
            return problems
        rc2, data2, err2 = _check(img)
        if rc2 != 0:
            problems.append(f"after qemu-img check -r all, check rc={rc2} {data2} {err2}")
        if _guest(img) != content:
            problems.append("qemu-img check -r all changed the guest content")
    return problems


def _content_problems(sc: Scenario, prep: Prepared, content: bytes, succeeded: bool
                      ) -> list[str]:
    g = prep.granularity
    new = prep.new
    if succeeded:
        return [] if content == new else ["operation reported success but the content is "
                                          "not the new one: "
                                          + str(_old_or_new(content, new, new, g))]
    if sc.kind == "create":
        if content == new:
            return []
        return [f"half-created image passes qemu-img check but its guest content is not the "
                f"new one (virtual size {len(content)}, expected {len(new)})"]
    old = prep.old
    if sc.kind == "resize":
        if len(content) == len(new):
            why = _old_or_new(content, new, new, g)
            return [] if why is None else [f"resized image (new size): {why}"]
        if len(content) == len(old):
            ref = new + old[len(new):] if len(new) < len(old) else old
            # shrink interrupted: the part beyond the new size may already be discarded
            why = _old_or_new(content, old, ref, g,
                              tail_may_be_zero_from=len(new) if len(new) < len(old) else None)
            return [] if why is None else [f"image at the old size: {why}"]
        return [f"virtual size {len(content)} is neither old {len(old)} nor new {len(new)}"]
    why = _old_or_new(content, old, new, g)
    return [] if why is None else [why]


def _run_point(sc: Scenario, prep: Prepared, root: Path, i: int, mode: str) -> list[str]:
    w = root / f"{sc.name}-{mode}-{i}"
    shutil.copytree(prep.template, w)
    img = w / prep.img_rel
    out = run_injected(lambda: sc.op(img), i, mode, paths=[w], baseline=len(prep.calls),
                       reported_failure=sc.reported_failure)
    inj, succeeded, problems = out.injector, out.succeeded, out.problems
    problems += _verify(sc, prep, img, succeeded)
    shutil.rmtree(w)
    return [f"{mode} at {inj.triggered or f'#{i}'}: {p}" for p in problems]


# -- the tests ---------------------------------------------------------------

@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_baseline(fi_root, name):
    """A successful run gives a clean image with the expected content."""
    sc = BY_NAME[name]
    prep = _prepare(sc, fi_root)
    expect = sc.model(prep.old) if sc.model else None
    if sc.name == "create_extl2_backing":
        expect = _guest(prep.template / "base.qcow2")
    assert expect is not None
    why = _old_or_new(prep.new, expect, expect, prep.granularity) \
        if len(prep.new) == len(expect) else f"size {len(prep.new)} != {len(expect)}"
    assert prep.new == expect, f"{name}: content after the operation differs: {why}"


@pytest.mark.parametrize("mode", ["error", "crash"])
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_fault_injection(fi_root, name, mode):
    sc = BY_NAME[name]
    prep = _prepare(sc, fi_root)
    failures: list[str] = []
    for i in prep.points:
        failures += _run_point(sc, prep, fi_root, i, mode)
    assert not failures, (f"{name}: {len(failures)} failure(s) over {len(prep.points)} "
                          f"injection points of {len(prep.calls)} calls:\n"
                          + "\n".join(failures[:25]))


@pytest.mark.parametrize("mode", ["lose-all", "lose-some"])
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_power_loss(fi_root, name, mode):
    """A power cut with a volatile device cache (tests/helpers/faultinject.py, lose-*):
    every write since a file's last completed flush is lost (lose-all) or a seeded subset
    of them (lose-some).  Old or new, never corrupt; and once the operation has returned,
    the power going loses nothing of it (one point past the last call)."""
    sc = BY_NAME[name]
    prep = _prepare(sc, fi_root)
    points, failures = power_loss_failures(
        prep.calls, lambda i: _run_point(sc, prep, fi_root, i, mode), LOSE_FLUSHES, LOSE_OTHERS)
    assert not failures, (f"{name}: {len(failures)} failure(s) over {len(points)} power-loss "
                          f"points of {len(prep.calls)} calls:\n" + "\n".join(failures[:25]))


def _kill_points(n: int, k: int = 6) -> list[int]:
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)}) if n > 1 else [0]


@pytest.mark.parametrize("name", ["write_alloc_4k_rc64", "write_cow_snapshot",
                                  "repair_leaks", "resize_shrink_64k", "create_64k"])
def test_real_kill_fork(fi_root, name):
    """A real process death (os._exit(137) at fileio call i) in a forked child."""
    sc = BY_NAME[name]
    prep = _prepare(sc, fi_root)
    failures = []
    for i in _kill_points(len(prep.calls)):
        w = fi_root / f"{name}-kill-{i}"
        shutil.copytree(prep.template, w)
        img = w / prep.img_rel
        rc = run_killed(lambda: sc.op(img), i, paths=[w])
        if rc != KILL_EXIT_CODE:
            failures.append(f"kill at #{i}: child exited {rc}, not killed")
        failures += [f"kill at {prep.calls[i]}: {p}" for p in _verify(sc, prep, img, False)]
        shutil.rmtree(w)
    assert not failures, "\n".join(failures)


def test_real_kill_cli_repair(fi_root):
    """`python -m qcow2engine check -r all` killed at fileio call i."""
    sc = BY_NAME["repair_dirty_lazy"]
    prep = _prepare(sc, fi_root)
    failures = []
    for i in _kill_points(len(prep.calls), 4):
        w = fi_root / f"cli-kill-{i}"
        shutil.copytree(prep.template, w)
        img = w / prep.img_rel
        proc = run_killed_script(
            "from qcow2engine.cli.main import main\n"
            f"raise SystemExit(main(['check', '-r', 'all', {img.name!r}]))\n",
            i, cwd=w)
        if proc.returncode != KILL_EXIT_CODE:
            failures.append(f"kill at #{i}: exit {proc.returncode}: {proc.stderr[-500:]}")
        failures += [f"kill at {prep.calls[i]}: {p}" for p in _verify(sc, prep, img, False)]
        shutil.rmtree(w)
    assert not failures, "\n".join(failures)


# -- io's writethrough requests under power loss ------------------------------

IO_EXTRA: tuple = ()            # e.g. ("-t", "writeback"): then completed requests may be lost
IO_REQUESTS = ["write -P 0x%02x %d 4k" % (0x61 + i, i * 200 * KiB + 512 * i) for i in range(6)]


def _io_run(img: Path, buf, *extra: str) -> None:
    """`io` in this process (so the injector sees its calls); its report lines go to buf
    (what it printed before a simulated power cut stays there)."""
    import contextlib
    from qcow2engine.cli.main import main
    with contextlib.redirect_stdout(buf):
        try:
            main(["io", *extra, *sum((["-c", c] for c in IO_REQUESTS), []), str(img)])
        finally:
            gc.collect()


@pytest.mark.parametrize("mode", ["lose-all", "lose-some"])
def test_io_requests_are_durable_when_they_complete(tmp_path, mode):
    """qemu-io's default cache mode is writethrough: a request is durable once it has
    completed.  The power goes at every call of `io` running six allocating writes: every
    request it reported done reads back (by qemu-io), none is half there, the image is
    clean apart from leaks."""
    tdir = tmp_path / "t"
    tdir.mkdir()
    create_image(tdir, "img.qcow2", 4 * MiB, opts="cluster_size=64k")
    w = tmp_path / "base"
    shutil.copytree(tdir, w)
    import io as _io
    with inject(None, paths=[w]) as inj:
        _io_run(w / "img.qcow2", _io.StringIO(), *IO_EXTRA)
    n = len(inj.calls)
    assert n >= 2 * len(IO_REQUESTS)             # each request: data, a barrier, metadata, a flush
    failures = []
    for i in range(n + 1):
        w = tmp_path / f"p{i}"
        shutil.copytree(tdir, w)
        buf = _io.StringIO()
        with inject(i, mode, paths=[w]) as inj:
            try:
                _io_run(w / "img.qcow2", buf, *IO_EXTRA)
            except BaseException:               # the simulated power cut
                pass
        if i == n:
            inj.power_off()
        done = buf.getvalue().count("wrote ")
        rc, data, err = qemu_img_check(w / "img.qcow2")
        if rc not in (0, 3) or data.get("corruptions"):
            failures.append(f"{mode} at #{i}: qemu-img check rc={rc}: {err.strip()}")
            continue
        for k, req in enumerate(IO_REQUESTS):
            _, pat, off, _ = req.split()[1:]
            r = qemu_io(w / "img.qcow2", "read -P %s %s 4k" % (pat, off), check=False)
            present = "Pattern verification failed" not in r.out and r.rc == 0
            if k < done and not present:
                failures.append(f"{mode} at #{i}: request {k} completed but is lost")
            if not present:
                z = qemu_io(w / "img.qcow2", "read -P 0 %s 4k" % off, check=False)
                if "Pattern verification failed" in z.out:
                    failures.append(f"{mode} at #{i}: request {k} is neither old nor new")
        shutil.rmtree(w)
    assert not failures, "\n".join(failures[:20])
