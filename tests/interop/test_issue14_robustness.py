"""Issue 14: never make a damaged image worse.  Each case the issue names: writes and
snapshots on damaged images refuse (QEMU-style overlap checks, the corrupt bit set) instead of
overwriting metadata; `check -r all` ends with an image qemu-img calls clean; wild offsets are
one-line errors, quickly."""
from __future__ import annotations

import shutil
import struct
import time

import pytest

from tests.helpers.engine import engine
from tests.helpers.qemu import qemu_img, qemu_img_check, qemu_io

CS = 65536


def _hdr(path, off, fmt):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _poke(path, off, fmt, val):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, val))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("i14")
    plain = d / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", plain, "1M", check=True)
    qemu_io(plain, "write -P 0x11 0 128k")
    snap = d / "snap.qcow2"
    shutil.copy(plain, snap)
    qemu_img("snapshot", "-c", "snap1", snap, check=True)
    return {"plain": plain, "snap": snap}


def _copy(bases, name, tmp_path, patches=(), truncate=None):
    p = tmp_path / ("%s.qcow2" % name)
    shutil.copy(bases[name], p)
    for off, fmt, val in patches:
        _poke(p, off(p) if callable(off) else off, fmt, val)
    if truncate is not None:
        with open(p, "r+b") as f:
            f.truncate(truncate(p))
    return p


def _one_line(err):
    assert "internal error" not in err and "Traceback" not in err, err
    assert err.count("\n") == 1, err


def _rt(p):
    return _hdr(p, 48, ">Q")


def _l1(p):
    return _hdr(p, 40, ">Q")


@pytest.mark.parametrize("cmd", ["io", "snapshot"])
@pytest.mark.parametrize("case", ["truncated", "l1_at_reftable", "l1_at_l1"])
def test_write_on_damaged_image_refuses(bases, tmp_path, case, cmd):
    p = _copy(bases, "plain", tmp_path)
    rt, l1 = _rt(p), _l1(p)
    if case == "truncated":
        with open(p, "r+b") as f:
            f.truncate(rt + CS)
    else:
        _poke(p, l1, ">Q", (rt if case == "l1_at_reftable" else l1) | (1 << 63))
    before = p.read_bytes()
    if case != "truncated":
        corrupt_before = qemu_img_check(p)[1].get("corruptions", 0)
        assert corrupt_before >= 1
    if cmd == "io":
        rc, out, err = engine("io", "-c", "write -P 0xab 0 64k", p, catch_exit=True)
    else:
        rc, out, err = engine("snapshot", "-c", "s1", p, catch_exit=True)
    if rc == 0 and cmd == "snapshot" and case != "truncated":
        # QEMU's snapshot creates it too (nothing is written over metadata, refcounts +1)
        assert qemu_img_check(p)[1].get("corruptions", 0) <= corrupt_before
        return
    assert rc == 1
    _one_line(err)
    assert "Marking image as corrupt" in err or "corrupt" in err, err
    after = p.read_bytes()
    # only the corrupt bit of the incompatible features changed
    assert after[:4] == b"QFI\xfb"
    diff = [i for i in range(min(len(before), len(after))) if before[i] != after[i]]
    assert all(72 <= i < 80 for i in diff), diff
    assert len(after) == len(before)
    assert _hdr(p, 72, ">Q") & 2


def _patched(bases, tmp_path, name):
    src = "snap"
    p = _copy(bases, src, tmp_path)
    rt = _rt(p)
    ent = _hdr(p, rt, ">Q")
    if name == "reftable_reserved_bit":
        _poke(p, rt, ">Q", ent | 1)
    elif name == "bad_nb_snapshots":
        _poke(p, 60, ">I", 5)
    elif name == "snapshots_offset_past_end":
        _poke(p, 64, ">Q", 1 << 40)
    elif name == "reftable_entry_maximal":
        _poke(p, rt + 8, ">Q", 0x00FFFFFFFFFF0000)
    elif name == "l1_at_reftable":
        _poke(p, _l1(p), ">Q", rt | (1 << 63))
    return p


@pytest.mark.parametrize("name", ["reftable_reserved_bit", "bad_nb_snapshots",
                                  "snapshots_offset_past_end", "reftable_entry_maximal",
                                  "l1_at_reftable"])
def test_repair_ends_clean(bases, tmp_path, name):
    p = _patched(bases, tmp_path, name)
    before = p.read_bytes()
    rc, out, err = engine("check", "-r", "all", p, catch_exit=True)
    assert "internal error" not in err and "Traceback" not in err, err
    if rc == 0:
        qrc, q, qerr = qemu_img_check(p)
        assert qrc == 0 and not q.get("corruptions") and not q.get("leaks"), (q, qerr)
    else:
        _one_line(err)
        assert p.read_bytes() == before


@pytest.mark.parametrize("field,value", [
    (40, 0xFFFFFFFFFFFF0000), (48, 0xFFFFFFFFFFFF0000), (64, 0xFFFFFFFFFFFF0000),
    (40, 1 << 62), (48, 1 << 62), (64, 1 << 62), (72, 4),   # 72: external data file bit
])
def test_wild_header_fields_one_line(bases, tmp_path, field, value):
    p = _copy(bases, "snap", tmp_path)
    _poke(p, field, ">Q", value)
    before = p.read_bytes()
    for argv in (["info"], ["check"], ["map"], ["snapshot", "-l"], ["io", "-r", "-c", "read 0 64k"],
                 ["convert", "-O", "raw", None], ["compare", None]):
        args = [a if a is not None else (tmp_path / "o.raw" if argv[0] == "convert" else p)
                for a in argv]
        args.insert(len(argv) - (1 if None in argv else 0), p)
        t0 = time.monotonic()
        rc, out, err = engine(*args, catch_exit=True)
        assert time.monotonic() - t0 < 10
        assert "internal error" not in err and "Traceback" not in err, (argv, err)
        if rc not in (0, 2, 3):
            assert err.count("\n") == 1, (argv, err)
    assert p.read_bytes() == before


@pytest.mark.parametrize("target", ["refblock", "1TiB"])
def test_snapshot_on_wild_l1_is_quick(bases, tmp_path, target):
    p = _copy(bases, "plain", tmp_path)
    rt = _rt(p)
    off = (_hdr(p, rt, ">Q") & ~0x1FF) if target == "refblock" else 1 << 40
    _poke(p, _l1(p), ">Q", off | (1 << 63))
    before = qemu_img_check(p)[1]
    t0 = time.monotonic()
    rc, out, err = engine("snapshot", "-c", "s1", p, catch_exit=True)
    assert time.monotonic() - t0 < 10
    assert "internal error" not in err and "Traceback" not in err, err
    if rc:
        assert err.count("\n") == 1, err
    after = qemu_img_check(p)[1]
    assert (after.get("corruptions") or 0) <= (before.get("corruptions") or 0), (before, after)


def test_repair_builds_a_refcount_table_past_the_end_inside_the_file(tmp_path):
    """Found by the 2,000-mutant run: a refcount table offset of 1 TiB (past the end) made
    `check -r all` write at that offset (a 1 TiB file) and still end with an error."""
    import struct
    from qcow2engine import api
    from tests.helpers.qemu import qemu_img as _qi
    p = str(tmp_path / "r.qcow2")
    _qi("create", "-q", "-f", "qcow2", p, "1M", check=True)
    with open(p, "r+b") as f:
        f.seek(48)
        f.write(struct.pack(">Q", 1 << 40))
    api.check(p, repair="all")
    import os
    assert os.stat(p).st_size < 1 << 20
    assert _qi("check", p)[0] == 0
