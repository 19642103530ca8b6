"""Issue 15's data and safety bugs, each against qemu-img 7.2 on the same files: the engine
does a step on one copy, qemu-img on the other, and QEMU's tools compare the results (guest
data, maps, `qemu-img check`).  Every test here failed on the code before its fix."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.helpers.engine import engine
from tests.helpers.files import file_sha256
from tests.helpers.qemu import assert_clean, assert_same_guest, qemu_img, qemu_io


def _create(path, size, *opts, backing=None):
    args = ["create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    for o in opts:
        args += ["-o", o]
    qemu_img(*args, path, *([size] if size else []), check=True, cwd=Path(path).parent)


def _twins(tmp_path, build):
    """Build the same files in e/ (for the engine) and q/ (for qemu-img)."""
    out = []
    for side in ("e", "q"):
        d = tmp_path / side
        d.mkdir()
        build(d)
        out.append(d)
    return out


def _ok(*args, cwd):
    rc, out, err = engine(*args, cwd=cwd, catch_exit=True)
    assert rc == 0, (args, out, err)
    return out


def _map(img):
    return json.loads(qemu_img("map", "--output=json", img, check=True).out)


def _longer_backing(d, base_size="1M", base_opts=()):
    """bb (4 MiB of 0x77) <- base (base_size, 64 KiB of 0xaa) <- top (4 MiB, two writes)."""
    _create(d / "bb.qcow2", "4M")
    qemu_io(d / "bb.qcow2", "write -P 0x77 0 4M")
    _create(d / "base.qcow2", base_size, *base_opts, backing="bb.qcow2")
    qemu_io(d / "base.qcow2", "write -P 0xaa 0 64k")
    _create(d / "top.qcow2", "4M", backing="base.qcow2")
    qemu_io(d / "top.qcow2", "write -P 0x11 0 64k", "write -P 0x22 2M 64k")


def test_rebase_from_no_backing_keeps_the_guest_view(tmp_path):
    def build(d):
        _create(d / "new.qcow2", "1M")
        qemu_io(d / "new.qcow2", "write -P 0xaa 0 1M")
        _create(d / "top.qcow2", "1M")
        qemu_io(d / "top.qcow2", "write -P 0x11 0 64k")
    e, q = _twins(tmp_path, build)
    before = qemu_img("convert", "-O", "raw", e / "top.qcow2", tmp_path / "before.raw",
                      check=True)
    assert before.rc == 0
    _ok("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2", cwd=e)
    qemu_img("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2", cwd=q, check=True)
    assert_same_guest(e / "top.qcow2", tmp_path / "before.raw", "-F", "raw")
    assert_same_guest(e / "top.qcow2", q / "top.qcow2")
    # the area the top never wrote reads zeros, not the new backing file's 0xaa
    qemu_io(e / "top.qcow2", "read -P 0 64k 960k", read_only=True)
    assert_clean(e / "top.qcow2")


def test_commit_into_a_shorter_base_over_a_longer_backing(tmp_path):
    e, q = _twins(tmp_path, _longer_backing)
    _ok("commit", "top.qcow2", cwd=e)
    qemu_img("commit", "top.qcow2", cwd=q, check=True)
    assert_same_guest(e / "base.qcow2", q / "base.qcow2")
    assert_same_guest(e / "top.qcow2", q / "top.qcow2")
    # past the base's old end: zeros (and the top's data), never bb's 0x77
    qemu_io(e / "base.qcow2", "read -P 0 1M 1M", "read -P 0x22 2M 64k",
            "read -P 0 2112k 1984k", read_only=True)
    assert_clean(e / "base.qcow2", e / "top.qcow2")


@pytest.mark.parametrize("steps,base_size", [
    ((("--shrink", "512k"), ("2M",)), "1M"),       # shrink, then grow over bb
    ((("2M",),), "1000k"),                         # grow from an unaligned size
])
def test_grow_over_a_longer_backing_reads_zeros(tmp_path, steps, base_size):
    e, q = _twins(tmp_path, lambda d: _longer_backing(d, base_size))
    for step in steps:
        _ok("resize", *step[:-1], "base.qcow2", step[-1], cwd=e)
        qemu_img("resize", *step[:-1], "base.qcow2", step[-1], cwd=q, check=True)
    assert_same_guest(e / "base.qcow2", q / "base.qcow2")
    assert _map(e / "base.qcow2")[-1]["zero"] is True
    assert_clean(e / "base.qcow2")


def test_grow_of_v2_over_a_longer_backing_is_refused_like_qemu(tmp_path):
    e, q = _twins(tmp_path, lambda d: _longer_backing(d, "1M", ("compat=0.10",)))
    before = file_sha256(e / "base.qcow2")
    rc, _, err = engine("resize", "base.qcow2", "2M", cwd=e, catch_exit=True)
    r = qemu_img("resize", "base.qcow2", "2M", cwd=q)
    assert rc == r.rc == 1
    assert "Failed to zero out new clusters: Operation not supported" in err
    assert err.strip().splitlines()[-1].split(": ", 1)[1] == r.err.strip().split(": ", 1)[1]
    assert file_sha256(e / "base.qcow2") == before


def _iotest163_check(path):
    """QEMU's iotest 163 table check: no L1 entries past the size, no empty refcount
    blocks in the refcount table."""
    with open(path, "rb") as f:
        h = f.read(72)
        _, _, _, _, cbits, size, _, l1n, l1off, rtoff, rtcl = struct.unpack(">IIQIIQIIQQI", h[:60])
        mask = 0x00fffffffffffe00
        f.seek(l1off)
        l1 = struct.unpack(">%dQ" % l1n, f.read(8 * l1n))
        used = -(-size // (1 << (2 * cbits - 3)))
        assert not any(x & mask for x in l1[used:]), "L1 entries past the end"
        f.seek(rtoff)
        rt = f.read(rtcl << cbits)
        for (ent,) in struct.iter_unpack(">Q", rt):
            if ent & mask:
                f.seek(ent & mask)
                assert any(f.read(1 << cbits)), "an empty refcount block at %#x" % ent


@pytest.mark.parametrize("cs,bits,size,new,chunk", [
    ("512", "64", "3M", "1M", "256k"),
    ("512", "16", "24M", "5M", "4M"),
    ("65536", "16", "128M", "10M", "16M"),
])
def test_shrink_leaves_the_tables_qemu_checks(tmp_path, cs, bits, size, new, chunk):
    from qcow2engine.units import parse_size
    n, step = parse_size(size), parse_size(chunk)

    def build(d):
        _create(d / "t.qcow2", size, "cluster_size=%s,refcount_bits=%s" % (cs, bits))
        qemu_io(d / "t.qcow2", *("write -P 0xff %d %d" % (o, step) for o in range(0, n, step)))
    e, q = _twins(tmp_path, build)
    _ok("resize", "--shrink", "t.qcow2", new, cwd=e)
    qemu_img("resize", "--shrink", "t.qcow2", new, cwd=q, check=True)
    _iotest163_check(e / "t.qcow2")
    assert_same_guest(e / "t.qcow2", q / "t.qcow2")
    assert_clean(e / "t.qcow2")
    # the file is cut after its last cluster in use, as QEMU cuts it
    assert (e / "t.qcow2").stat().st_size == (q / "t.qcow2").stat().st_size


def _strip_snapshot_extra(path):
    """Rewrite the snapshot table in place with no extra data per entry (as QEMU before 1.6
    wrote v2 tables)."""
    with open(path, "r+b") as f:
        h = f.read(72)
        nsn, off = struct.unpack(">IQ", h[60:72])
        f.seek(off)
        buf = f.read(1 << 16)
        out, pos = b"", 0
        for _ in range(nsn):
            fields = struct.unpack(">QIHHIIQII", buf[pos:pos + 40])
            idl, nml, exl = fields[2], fields[3], fields[8]
            ident = buf[pos + 40 + exl:pos + 40 + exl + idl]
            name = buf[pos + 40 + exl + idl:pos + 40 + exl + idl + nml]
            pos = (pos + 40 + exl + idl + nml + 7) & ~7
            ent = struct.pack(">QIHHIIQII", *fields[:8], 0) + ident + name
            out += ent + b"\0" * (-len(ent) % 8)
        f.seek(off)
        f.write(out + b"\0" * (pos - len(out)))


def test_amend_to_v3_completes_old_snapshot_entries(tmp_path):
    def build(d):
        _create(d / "v2.qcow2", "4M", "compat=0.10")
        qemu_io(d / "v2.qcow2", "write -P 0x11 0 1M")
        qemu_img("snapshot", "-c", "s1", d / "v2.qcow2", check=True)
        qemu_io(d / "v2.qcow2", "write -P 0x22 0 64k")
        qemu_img("snapshot", "-c", "s2", d / "v2.qcow2", check=True)
        _strip_snapshot_extra(d / "v2.qcow2")
        assert_clean(d / "v2.qcow2")
    e, q = _twins(tmp_path, build)
    _ok("amend", "-o", "compat=1.1", "v2.qcow2", cwd=e)
    qemu_img("amend", "-o", "compat=1.1", "v2.qcow2", cwd=q, check=True)
    assert_clean(e / "v2.qcow2")
    assert_same_guest(e / "v2.qcow2", q / "v2.qcow2")
    for s in ("s1", "s2"):
        a = qemu_img("convert", "-l", s, "-O", "raw", e / "v2.qcow2", tmp_path / ("e" + s),
                     check=True)
        b = qemu_img("convert", "-l", s, "-O", "raw", q / "v2.qcow2", tmp_path / ("q" + s),
                     check=True)
        assert a.rc == b.rc == 0
        assert file_sha256(tmp_path / ("e" + s)) == file_sha256(tmp_path / ("q" + s))


def _convert_src(d):
    _create(d / "src.qcow2", "4M")
    qemu_io(d / "src.qcow2", "write -P 0x11 0 1M", "write -z 2M 64k")
    _create(d / "big.qcow2", "8M")
    qemu_io(d / "big.qcow2", "write -P 0x99 0 8M")
    _create(d / "small.qcow2", "1M")
    qemu_img("create", "-q", "-f", "raw", d / "big.raw", "6M", check=True)
    qemu_io(d / "big.raw", "write -P 0x99 0 6M", fmt="raw")


def test_convert_n_writes_into_an_existing_image(tmp_path):
    e, q = _twins(tmp_path, _convert_src)
    for out, fmt in (("big.qcow2", "qcow2"), ("big.raw", "raw")):
        _ok("convert", "-n", "-O", fmt, "src.qcow2", out, cwd=e)
        qemu_img("convert", "-n", "-O", fmt, "src.qcow2", out, cwd=q, check=True)
        assert_same_guest(e / out, q / out, "-f", fmt, "-F", fmt)
    # the target keeps its own size and, past the source's end, its own data
    assert _map(e / "big.qcow2") == _map(q / "big.qcow2")
    assert_clean(e / "big.qcow2")


@pytest.mark.parametrize("args,message", [
    (["-n", "-O", "qcow2", "src.qcow2", "missing.qcow2"], "No such file or directory"),
    (["-n", "-O", "raw", "src.qcow2", "missing.raw"], "No such file or directory"),
    (["-n", "-O", "qcow2", "src.qcow2", "small.qcow2"], "output file is smaller than input file"),
    (["-n", "-O", "qcow2", "src.qcow2", "big.raw"], "Image is not in qcow2 format"),
    (["-B", "big.qcow2", "-O", "qcow2", "src.qcow2", "out.qcow2"],
     "Use of backing file requires explicit backing format"),
])
def test_convert_refusals_match_qemu(tmp_path, args, message):
    e, q = _twins(tmp_path, _convert_src)
    before = {p.name: file_sha256(p) for p in e.iterdir()}
    rc, _, err = engine("convert", *args, cwd=e, catch_exit=True)
    r = qemu_img("convert", *args, cwd=q)
    assert rc == r.rc == 1, (err, r.err)
    assert message in err and message in r.err
    assert {p.name: file_sha256(p) for p in e.iterdir()} == before


def test_create_formats_like_qemu_img(tmp_path):
    rc, out, _ = engine("create", "-f", "file", "x.img", "1M", cwd=tmp_path, catch_exit=True)
    assert rc == 0 and out == "Formatting 'x.img', fmt=file size=1048576\n"
    assert (tmp_path / "x.img").read_bytes() == bytes(1 << 20)
    for fmt in ("vmdk", "vdi", "nosuch"):
        rc, out, err = engine("create", "-f", fmt, "y.img", "1M", cwd=tmp_path, catch_exit=True)
        r = qemu_img("create", "-f", "nosuch", "z.img", "1M", cwd=tmp_path)
        assert rc == 1 and not out and not (tmp_path / "y.img").exists()
        assert err.strip().split(": ", 1)[1] == "y.img: Unknown file format '%s'" % fmt
        assert r.err.strip() == "qemu-img: z.img: Unknown file format 'nosuch'"


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_rounds_sizes_up_to_512(tmp_path, fmt):
    for size in ("1000", "1000.3k", "1"):
        rc, out, _ = engine("create", "-f", fmt, "e.img", size, cwd=tmp_path, catch_exit=True)
        r = qemu_img("create", "-f", fmt, "q.img", size, cwd=tmp_path, check=True)
        assert rc == 0 and out.replace("e.img", "q.img") == r.out
        ie = json.loads(qemu_img("info", "--output=json", tmp_path / "e.img", check=True).out)
        iq = json.loads(qemu_img("info", "--output=json", tmp_path / "q.img", check=True).out)
        assert ie["virtual-size"] == iq["virtual-size"] and ie["virtual-size"] % 512 == 0
        if fmt == "qcow2":
            assert_clean(tmp_path / "e.img")


def _flags(m):
    """A map without host offsets and "zero" (QEMU's answer there follows the file
    system's allocation at 4 KiB, where the tools lay 512-byte clusters out differently),
    neighbours with the same flags merged."""
    out = []
    for x in m:
        key = (x["depth"], x["present"], x["data"])
        if out and out[-1][0] == key and out[-1][2] == x["start"]:
            out[-1][2] += x["length"]
        else:
            out.append([key, x["start"], x["start"] + x["length"]])
    return out


@pytest.mark.parametrize("opts", [
    "cluster_size=512", "cluster_size=512,refcount_bits=1", "cluster_size=2M,refcount_bits=64",
    "cluster_size=32768,extended_l2=on", "compat=0.10", "cluster_size=4096,refcount_bits=8",
])
def test_preallocation_metadata_matches_qemu(tmp_path, opts):
    o = "preallocation=metadata," + opts
    _ok("create", "-q", "-f", "qcow2", "-o", o, "e.qcow2", "37M", cwd=tmp_path)
    _create(tmp_path / "q.qcow2", "37M", o)
    assert_clean(tmp_path / "e.qcow2")
    me, mq = _map(tmp_path / "e.qcow2"), _map(tmp_path / "q.qcow2")
    assert _flags(me) == _flags(mq) and all("offset" in x for x in me)
    for img in ("e.qcow2", "q.qcow2"):
        qemu_io(tmp_path / img, "write -P 0x5a 1000k 3M", "write -P 0x6b 36M 4k")
    assert_same_guest(tmp_path / "e.qcow2", tmp_path / "q.qcow2")
    assert_clean(tmp_path / "e.qcow2")


def test_preallocated_extended_l2_over_a_backing_file_reads_the_backing(tmp_path):
    _create(tmp_path / "b.qcow2", "4M")
    qemu_io(tmp_path / "b.qcow2", "write -P 0x11 0 4M")
    o = "preallocation=metadata,extended_l2=on"
    _ok("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "-o", o, "e.qcow2",
        cwd=tmp_path)
    _create(tmp_path / "q.qcow2", None, o, backing="b.qcow2")
    assert_same_guest(tmp_path / "e.qcow2", tmp_path / "b.qcow2")
    assert file_sha256(tmp_path / "e.qcow2") == file_sha256(tmp_path / "q.qcow2")
    assert_clean(tmp_path / "e.qcow2")


# ---------------------------------------------------------------- convert of several sources
def _sources(d):
    """A raw disk, a qcow2 disk with a backing file (data and a zero cluster), a compressed
    one: three sizes, none a multiple of a cluster."""
    qemu_img("create", "-q", "-f", "raw", d / "r.raw", "1000k", check=True)
    qemu_io(d / "r.raw", "write -P 0x01 0 4k", "write -P 0x02 990k 10k", fmt="raw")
    _create(d / "b.qcow2", "1536k")
    qemu_io(d / "b.qcow2", "write -P 0x03 0 1536k")
    _create(d / "q.qcow2", "1536k", backing="b.qcow2")
    qemu_io(d / "q.qcow2", "write -P 0x04 64k 64k", "write -z 512k 64k")
    _create(d / "c0.qcow2", "700k")
    qemu_io(d / "c0.qcow2", "write -P 0x05 100k 300k")
    qemu_img("convert", "-q", "-c", "-O", "qcow2", "c0.qcow2", "c.qcow2", cwd=d, check=True)


def _data_ranges(img):
    """The guest ranges that hold data, merged (host placement aside)."""
    out = []
    for m in _map(img):
        if m["data"]:
            if out and out[-1][1] == m["start"]:
                out[-1][1] += m["length"]
            else:
                out.append([m["start"], m["start"] + m["length"]])
    return out


@pytest.mark.parametrize("args", [
    ["-O", "qcow2"], ["-O", "raw"], ["-O", "qcow2", "-c"],
    ["-O", "qcow2", "-o", "cluster_size=16384,extended_l2=on"],
])
def test_convert_concatenates_several_sources_like_qemu(tmp_path, args):
    e, q = _twins(tmp_path, _sources)
    srcs = ["r.raw", "q.qcow2", "c.qcow2", "r.raw"]
    out = "out." + args[1]
    _ok("convert", *args, *srcs, out, cwd=e)
    qemu_img("convert", *args, *srcs, out, cwd=q, check=True)
    fmt = args[1]
    assert qemu_img("info", "--output=json", e / out, check=True).out.count('"virtual-size"')
    sizes = [json.loads(qemu_img("info", "--output=json", p, check=True).out)["virtual-size"]
             for p in (e / out, q / out)]
    assert sizes[0] == sizes[1] == 1000 * 1024 * 2 + 1536 * 1024 + 700 * 1024
    assert_same_guest(e / out, q / out, "-f", fmt, "-F", fmt)
    if fmt == "qcow2":
        assert_clean(e / out)
        if "-c" not in args:
            # allocation follows the data as qemu-img's does
            assert _data_ranges(e / out) == _data_ranges(q / out)


def test_convert_concatenates_into_an_existing_image(tmp_path):
    def build(d):
        _sources(d)
        _create(d / "t.qcow2", "8M")
        qemu_io(d / "t.qcow2", "write -P 0x99 0 8M")
    e, q = _twins(tmp_path, build)
    for side, run in ((e, lambda *a: _ok(*a, cwd=e)),
                      (q, lambda *a: qemu_img(*a, cwd=q, check=True))):
        run("convert", "-n", "-O", "qcow2", "q.qcow2", "r.raw", "t.qcow2")
    assert_same_guest(e / "t.qcow2", q / "t.qcow2")
    assert_clean(e / "t.qcow2")


@pytest.mark.parametrize("args,message", [
    (["r.raw"], "Must specify image file name"),
    (["-l", "s", "r.raw", "q.qcow2", "o.raw"], "No support for concatenating multiple snapshot"),
    (["--bitmaps", "-O", "qcow2", "q.qcow2", "q.qcow2", "o.qcow2"],
     "Copying bitmaps only possible with single source"),
    (["-B", "b.qcow2", "-F", "qcow2", "-O", "qcow2", "q.qcow2", "q.qcow2", "o.qcow2"],
     "Having a backing file for the target makes no sense"),
    (["r.raw", "missing.qcow2", "o.raw"], "missing.qcow2"),
])
def test_convert_of_several_sources_refusals_match_qemu(tmp_path, args, message):
    e, q = _twins(tmp_path, _sources)
    before = {p.name: file_sha256(p) for p in e.iterdir()}
    rc, _, err = engine("convert", *args, cwd=e, catch_exit=True)
    r = qemu_img("convert", *args, cwd=q)
    assert rc == r.rc == 1, (err, r.err)
    assert message in err and message in r.err, (err, r.err)
    assert {p.name: file_sha256(p) for p in e.iterdir()} == before


# ---------------------------------------------------------------- unreadable clusters, --salvage
def _l2_entry_offset(path, guest_cluster):
    with open(path, "rb") as f:
        h = f.read(104)
        cluster_bits = struct.unpack(">I", h[20:24])[0]
        l1 = struct.unpack(">Q", h[40:48])[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    assert guest_cluster < (1 << cluster_bits) // 8
    return l2 + 8 * guest_cluster


def _damage(d):
    """bad.qcow2: cluster 1's L2 entry unaligned (QEMU: "Cluster allocation offset ...
    unaligned", EIO); comp.qcow2: a compressed cluster whose deflate stream is garbage."""
    _create(d / "bad.qcow2", "1M")
    qemu_io(d / "bad.qcow2", "write -P 0x11 0 192k", "write -P 0x22 512k 64k")
    at = _l2_entry_offset(d / "bad.qcow2", 1)
    with open(d / "bad.qcow2", "r+b") as f:
        f.seek(at)
        e = struct.unpack(">Q", f.read(8))[0]
        f.seek(at)
        f.write(struct.pack(">Q", e | 0x200))
    _create(d / "c0.qcow2", "1M")
    qemu_io(d / "c0.qcow2", "write -P 0x33 0 256k")
    qemu_img("convert", "-q", "-c", "-O", "qcow2", "c0.qcow2", "comp.qcow2", cwd=d, check=True)
    m = [x for x in _map(d / "comp.qcow2") if x["data"]]
    # the second compressed cluster's bytes: its L2 entry holds the host offset
    with open(d / "comp.qcow2", "rb") as f:
        f.seek(_l2_entry_offset(d / "comp.qcow2", 1))
        desc = struct.unpack(">Q", f.read(8))[0]
    assert m and desc >> 62 == 1
    host = desc & ((1 << (62 - 8)) - 1)
    with open(d / "comp.qcow2", "r+b") as f:
        f.seek(host + 4)
        f.write(b"\xff" * 48)


@pytest.mark.parametrize("img", ["bad.qcow2", "comp.qcow2"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_salvage_reads_what_fails_as_zeros_like_qemu(tmp_path, img, fmt):
    e, q = _twins(tmp_path, _damage)
    # without --salvage both fail and say where
    rc, _, err = engine("convert", "-O", fmt, img, "o", cwd=e, catch_exit=True)
    assert rc == qemu_img("convert", "-O", fmt, img, "o", cwd=q).rc == 1, err
    assert err.count("\n") == 1
    _ok("convert", "--salvage", "-O", fmt, img, "s", cwd=e)
    r = qemu_img("convert", "--salvage", "-O", fmt, img, "s", cwd=q, check=True)
    assert "warning: error while reading offset 65536" in r.err
    assert_same_guest(e / "s", q / "s", "-f", fmt, "-F", fmt)
    # the unreadable cluster reads as zeros, the rest is there
    g = qemu_io(e / "s", "read -P 0 64k 64k", "read -P 0x%s 0 64k"
                % ("11" if img == "bad.qcow2" else "33"), fmt=fmt)
    assert "Pattern verification failed" not in g.out, g.out
    rc, _, err = engine("convert", "--salvage", "-O", fmt, img, "s2", cwd=e, catch_exit=True)
    assert rc == 0 and "warning: error while reading offset 65536" in err, err


def test_unaligned_data_cluster_fails_like_qemu(tmp_path):
    """QEMU treats an unaligned data cluster offset as corruption on every read path; the
    engine did read the bytes at the unaligned offset."""
    e, q = _twins(tmp_path, _damage)
    for verb, code in ((["map", "bad.qcow2"], 1), (["compare", "bad.qcow2", "bad.qcow2"], 3),
                       (["convert", "bad.qcow2", "o.raw"], 1)):
        rc, _, err = engine(*verb, cwd=e, catch_exit=True)
        assert (rc, qemu_img(*verb, cwd=q).rc) == (code, code), (verb, err)
        assert err.count("\n") == 1
    r = engine("io", "-c", "read 64k 64k", "bad.qcow2", cwd=e, catch_exit=True)
    assert "Invalid L2 entry" in r[1] + r[2], r
    assert "0x10000" in r[1] + r[2]


def _compressed(img):
    return json.loads(qemu_img("check", "--output=json", img).out)["compressed-clusters"]


def test_convert_n_c_compresses_into_an_existing_image(tmp_path):
    """qemu-img 7.2 takes -c with -n (the engine refused it): the target's clusters that
    the source's data touches are written compressed, the rest as with -n alone.  qemu-img
    fails over allocated target clusters (EIO) and where the source ends inside a target
    cluster (EINVAL); the engine does both (the guest view checked against qemu-img's -n
    without -c on a twin target)."""
    def build(d):
        _sources(d)
        for src in ("q.qcow2", "r.raw"):
            _create(d / ("empty-%s.qcow2" % src), "4M")
            _create(d / ("full-%s.qcow2" % src), "4M", "cluster_size=16384")
            qemu_io(d / ("full-%s.qcow2" % src), "write -P 0x99 0 4M")
    e, q = _twins(tmp_path, build)
    t = "empty-q.qcow2.qcow2"               # where qemu-img's own -n -c works
    _ok("convert", "-n", "-c", "-O", "qcow2", "q.qcow2", t, cwd=e)
    qemu_img("convert", "-n", "-c", "-O", "qcow2", "q.qcow2", t, cwd=q, check=True)
    assert_same_guest(e / t, q / t)
    assert _compressed(q / t) > 0
    for src in ("q.qcow2", "r.raw"):
        for t in ("empty-%s.qcow2" % src, "full-%s.qcow2" % src):
            _ok("convert", "-n", "-c", "-O", "qcow2", src, t, cwd=e)
            qemu_img("convert", "-n", "-O", "qcow2", src, t, cwd=q, check=True)
            assert_same_guest(e / t, q / t)
            assert_clean(e / t)
            assert _compressed(e / t) > 0
