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


# ---- found by the 2,000-mutant run of session 21 (tests/helpers/fuzz.py seeds in brackets)

def _corruptions(p):
    return qemu_img_check(p)[1].get("corruptions", 0)


def _refcount_entry(p, cluster):
    """File offset of cluster's 16-bit refcount (first refcount block)."""
    return (_hdr(p, _rt(p), ">Q") & ~0x1FF) + 2 * cluster


def _assert_refused_unchanged(p, before, err, needle):
    _one_line(err)
    assert needle in err, err
    after = p.read_bytes()
    diff = [i for i in range(min(len(before), len(after))) if before[i] != after[i]]
    assert len(after) == len(before) and all(72 <= i < 80 for i in diff), diff


def test_l1_entry_at_the_header_is_unallocated_for_writes(bases, tmp_path):
    """Offset 0 in an L1 entry means "no table" (docs/interop/qcow2.rst), with COPIED set
    or not: a write allocates a new table (qemu-io 7.2 aborts on an assertion here) and a
    snapshot refuses the damaged entry."""
    p = _copy(bases, "plain", tmp_path)
    _poke(p, _l1(p), ">Q", 1 << 63)
    q = tmp_path / "snap_copy.qcow2"
    shutil.copy(p, q)
    before = q.read_bytes()
    rc, out, err = engine("io", "-c", "write -P 0xab 0 64k", p, catch_exit=True)
    assert rc == 0, err
    assert _corruptions(p) == 0
    qemu_io(p, "read -P 0xab 0 64k", "read -P 0 64k 64k", read_only=True)
    rc, out, err = engine("snapshot", "-c", "s1", q, catch_exit=True)
    assert rc == 1
    _assert_refused_unchanged(q, before, err, "L1 entry 0 is damaged")


def test_write_refuses_a_cluster_an_l2_entry_already_claims(bases, tmp_path):
    """[compressed.qcow2 42] An L2 entry points at the first free cluster past the end; the
    next allocation would hand that very cluster out again (qemu-io does, and adds a
    corruption)."""
    p = _copy(bases, "plain", tmp_path)
    l2 = _hdr(p, _l1(p), ">Q") & 0x00FFFFFFFFFFFE00
    end = -(-p.stat().st_size // CS) * CS
    _poke(p, l2 + 8 * 10, ">Q", end | (1 << 63))         # guest cluster 10 -> past the end
    n0 = _corruptions(p)
    before = p.read_bytes()
    rc, out, err = engine("io", "-c", "write -P 0xab 256k 64k", p, catch_exit=True)
    assert rc == 1
    _assert_refused_unchanged(p, before, err, "Preventing invalid allocation")
    assert _corruptions(p) == n0


def test_write_refuses_copy_on_write_of_a_shared_table_counted_once(bases, tmp_path):
    """[snapshots.qcow2 389] The L2 table shared with a snapshot has refcount 1: copying it
    on write would free it under the snapshot (qemu-io does: thousands of errors)."""
    p = _copy(bases, "snap", tmp_path)
    l2 = _hdr(p, _l1(p), ">Q") & 0x00FFFFFFFFFFFE00
    _poke(p, _refcount_entry(p, l2 // CS), ">H", 1)
    n0 = _corruptions(p)
    before = p.read_bytes()
    rc, out, err = engine("io", "-c", "write -P 0xab 0 64k", p, catch_exit=True)
    assert rc == 1
    _assert_refused_unchanged(p, before, err, "Preventing invalid copy-on-write")
    assert _corruptions(p) == n0
    rc, out, err = engine("check", "-r", "all", p, catch_exit=True)
    assert rc == 0, err
    qrc, q, _ = qemu_img_check(p)
    assert qrc == 0, q


@pytest.mark.parametrize("cmd", [["io", "-c", "write -P 0xab 0 64k"], ["snapshot", "-c", "s9"],
                                 ["snapshot", "-d", "snap1"]])
def test_bogus_snapshot_table_refuses_writes(bases, tmp_path, cmd):
    """[v2.qcow2 134, extl2.qcow2 443] nb_snapshots raised on an image without snapshots:
    the "table" at offset 0 is the header; QEMU's snapshot -c then destroys the image."""
    p = _copy(bases, "plain", tmp_path)
    _poke(p, 60, ">I", 3)
    before = p.read_bytes()
    rc, out, err = engine(*cmd, p, catch_exit=True)
    assert rc == 1
    _assert_refused_unchanged(p, before, err, "run check -r all first")
    rc, out, err = engine("check", "-r", "all", p, catch_exit=True)
    assert rc == 0, err
    assert qemu_img_check(p)[0] == 0


def test_snapshot_names_that_are_not_utf8_keep_their_bytes(bases, tmp_path):
    """[snapshots.qcow2 1005] Names and IDs are kept as stored when the table is rewritten
    (a decoded-and-re-encoded name grew past its 16-bit length field)."""
    p = _copy(bases, "snap", tmp_path)
    off = _hdr(p, 64, ">Q")
    ext = _hdr(p, off + 36, ">I")
    id_len = _hdr(p, off + 12, ">H")
    _poke(p, off + 40 + ext + id_len, ">5s", b"\xffn\xfe\x80p")   # "snap1" -> not UTF-8
    listed = qemu_img("snapshot", "-l", p, check=True).out
    rc, out, err = engine("snapshot", "-c", "s2", p, catch_exit=True)
    assert rc == 0, err
    assert qemu_img_check(p)[0] == 0
    after = qemu_img("snapshot", "-l", p, check=True).out.splitlines()
    assert after[2].split()[:2] == listed.splitlines()[2].split()[:2]
    with open(p, "rb") as f:
        f.seek(_hdr(p, 64, ">Q"))
        assert b"\xffn\xfe\x80p" in f.read(4096)


def test_header_size_counts_whole_sectors_like_qemu(bases, tmp_path):
    """[v3.qcow2 1159] A size of 1 byte: QEMU sees 0 bytes (whole 512-byte sectors)."""
    p = _copy(bases, "plain", tmp_path)
    _poke(p, 24, ">Q", 512 * 3 + 7)
    rc, out, err = engine("info", "--output=json", p, catch_exit=True)
    import json
    assert json.loads(out)["virtual-size"] == \
        json.loads(qemu_img("info", "--output=json", p, check=True).out)["virtual-size"] == 1536
    rc, _, err = engine("convert", "-O", "raw", p, tmp_path / "e.raw", catch_exit=True)
    assert rc == 0, err
    qemu_img("convert", "-O", "raw", p, tmp_path / "q.raw", check=True)
    assert (tmp_path / "e.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
