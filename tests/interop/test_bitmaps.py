"""Persistent dirty bitmaps (issue 15's `bitmap` verb, and the bits every write owes an
enabled bitmap): QEMU is the oracle for what a bitmap holds — qemu-nbd exports it and
qemu-img map reads its dirty ranges through NBD (they show as "data": false)."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.helpers.engine import engine
from tests.helpers.qemu import assert_clean, qemu_img, qemu_io

MiB = 1 << 20


def dirty(img, name, tmp_path):
    """The dirty ranges of bitmap name as QEMU reads them: [(start, end), ...]."""
    sock = tmp_path / ("nbd-%s.sock" % name)
    p = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", str(sock), "-t",
                          str(img)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        out = qemu_img("map", "--output=json", "--image-opts",
                       "driver=nbd,server.type=unix,server.path=%s,"
                       "x-dirty-bitmap=qemu:dirty-bitmap:%s" % (sock, name), check=True).out
    finally:
        p.terminate()
        p.wait()
    return [(e["start"], e["start"] + e["length"]) for e in json.loads(out) if not e["data"]]


def info_bitmaps(img):
    d = json.loads(qemu_img("info", "--output=json", img, check=True).out)
    return [(b["name"], b["granularity"], sorted(b["flags"]))
            for b in d.get("format-specific", {}).get("data", {}).get("bitmaps", [])]


def _ok(*args):
    rc, out, err = engine(*args, catch_exit=True)
    assert rc == 0, (args, err)
    return out


@pytest.fixture
def twins(tmp_path):
    for n in ("e", "q"):
        qemu_img("create", "-q", "-f", "qcow2", tmp_path / (n + ".qcow2"), "64M", check=True)
    return tmp_path / "e.qcow2", tmp_path / "q.qcow2"


def test_actions_like_qemu_img(twins, tmp_path):
    e, q = twins
    steps = [["--add", "b1"], ["--add", "-g", "128k", "--disable", "b2"], ["--add", "b3"],
             ["--disable", "b3"], ["--enable", "b2"], ["--remove", "b1"]]
    for st in steps:
        _ok("bitmap", *st[:-1], e, st[-1])
        qemu_img("bitmap", *st[:-1], q, st[-1], check=True)
        assert info_bitmaps(e) == info_bitmaps(q)
        assert_clean(e)
    for bad in (["--add", "b2"], ["--remove", "nope"], [], ["--add", "-g", "100", "b9"]):
        rc, _, err = engine("bitmap", *bad[:-1], e, bad[-1] if bad else "b2", catch_exit=True)
        r = qemu_img("bitmap", *bad[:-1], q, bad[-1] if bad else "b2")
        assert rc == r.rc == 1
        assert err.split(": ", 1)[1] == r.err.split(": ", 1)[1]


def test_writes_set_the_bits_of_enabled_bitmaps(twins, tmp_path):
    e, q = twins
    for img in (e, q):
        qemu_img("bitmap", "--add", img, "on", check=True)
        qemu_img("bitmap", "--add", "-g", "1M", img, "coarse", check=True)
        qemu_img("bitmap", "--add", "--disable", img, "off", check=True)
        qemu_io(img, "write -P 0x11 0 100k")          # bits QEMU set itself
    cmds = ["write -P 0x22 20M 64k", "write -z 30M 200k", "discard 40M 1M",
            "write -P 0x33 63M 1k"]
    rc, _, err = engine("io", *sum([["-c", c] for c in cmds], []), e, catch_exit=True)
    assert rc == 0, err
    qemu_io(q, *cmds)
    for name in ("on", "coarse", "off"):
        assert dirty(e, name, tmp_path) == dirty(q, name, tmp_path), name
    assert dirty(e, "on", tmp_path)[0] == (0, 128 * 1024)
    assert dirty(e, "off", tmp_path) == []
    assert_clean(e)
    assert info_bitmaps(e) == info_bitmaps(q)          # "in use" is off again


def test_clear_and_merge(twins, tmp_path):
    e, q = twins
    other = tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", other, "64M", check=True)
    qemu_img("bitmap", "--add", other, "src", check=True)
    qemu_io(other, "write 5M 3M")
    for img in (e, q):
        qemu_img("bitmap", "--add", img, "a", check=True)
        qemu_img("bitmap", "--add", "-g", "256k", img, "b", check=True)
        qemu_io(img, "write 1M 64k", "write 50M 10k")
    steps = [["--merge", "a", "b"], ["--clear", "a"], ["--merge", "src", "-b", str(other),
                                                       "-F", "qcow2", "a"],
             ["--merge", "b", "a"]]
    for st in steps:
        _ok("bitmap", *st[:-1], e, st[-1])
        qemu_img("bitmap", *st[:-1], q, st[-1], check=True)
        for name in ("a", "b"):
            assert dirty(e, name, tmp_path) == dirty(q, name, tmp_path), (st, name)
        assert_clean(e)


def test_a_crash_mid_session_leaves_the_bitmap_in_use(twins, tmp_path):
    """Killed after its first write: the enabled bitmap is "in use" on disk (QEMU calls it
    inconsistent), never silently missing the write."""
    e, _ = twins
    qemu_img("bitmap", "--add", e, "on", check=True)
    code = ("import os, qcow2engine\n"
            "c = qcow2engine.open_chain(%r, writable=True)\n"
            "c.write(8 << 20, b'x' * 4096)\n"
            "os._exit(9)\n" % str(e))
    p = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    assert info_bitmaps(e) == [("on", 65536, ["auto", "in-use"])]
    # QEMU refuses to use it
    r = subprocess.run(["qemu-nbd", "-r", "-f", "qcow2", "-B", "on", "-k",
                        str(tmp_path / "x.sock"), str(e)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "inconsistent" in r.stderr, r.stderr
    assert_clean(e)


def test_resize_resizes_the_bitmaps_like_qemu(twins, tmp_path):
    """QEMU resizes persistent bitmaps with the image: granules past a shrink are gone (and
    stay clean when the image grows again), a grow adds clean granules, and a table that
    needs more entries moves to new clusters."""
    e, q = twins
    for img in (e, q):
        qemu_img("bitmap", "--add", img, "on", check=True)
        qemu_img("bitmap", "--add", "-g", "512", img, "fine", check=True)
        qemu_img("bitmap", "--add", "-g", "4M", "--disable", img, "off", check=True)
        qemu_io(img, "write 0 64k", "write 31M 2M", "write 63M 1M")
        qemu_img("bitmap", "--merge", "on", img, "off", check=True)
    steps = [["--shrink", "32M"], ["128M"], ["1G"], ["1G"], ["--shrink", "40000k"], ["70M"]]
    for st in steps:
        _ok("resize", *st[:-1], e, st[-1])
        qemu_img("resize", *st[:-1], q, st[-1], check=True)
        for name in ("on", "fine", "off"):
            assert dirty(e, name, tmp_path) == dirty(q, name, tmp_path), (st, name)
        assert info_bitmaps(e) == info_bitmaps(q)
        assert_clean(e)
    assert dirty(e, "fine", tmp_path) == [(0, 65536), (31 * MiB, 32 * MiB)]
    # bits still go on being set after the resize
    _ok("io", "-c", "write 69M 4k", e)
    qemu_io(q, "write 69M 4k")
    assert dirty(e, "fine", tmp_path) == dirty(q, "fine", tmp_path)
    assert_clean(e)


def test_resize_over_a_longer_backing_leaves_the_new_zeros_clean(tmp_path):
    for n in ("e", "q"):
        d = tmp_path / n
        d.mkdir()
        qemu_img("create", "-q", "-f", "qcow2", d / "b.qcow2", "8M", check=True)
        qemu_io(d / "b.qcow2", "write -P 7 0 8M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2",
                 d / "top.qcow2", "4M", check=True, cwd=d)
        qemu_img("bitmap", "--add", d / "top.qcow2", "on", check=True)
    _ok("resize", tmp_path / "e" / "top.qcow2", "8M")
    qemu_img("resize", tmp_path / "q" / "top.qcow2", "8M", check=True)
    for n in ("e", "q"):
        assert dirty(tmp_path / n / "top.qcow2", "on", tmp_path) == []
        qemu_io(tmp_path / n / "top.qcow2", "read -P 0 4M 4M", "read -P 7 0 4M")
    assert_clean(tmp_path / "e" / "top.qcow2")


def test_resize_refuses_an_inconsistent_bitmap(twins, tmp_path):
    e, _ = twins
    qemu_img("bitmap", "--add", e, "on", check=True)
    code = ("import os, qcow2engine\n"
            "c = qcow2engine.open_chain(%r, writable=True)\n"
            "c.write(8 << 20, b'x' * 4096)\n"
            "os._exit(9)\n" % str(e))
    assert subprocess.run([os.sys.executable, "-c", code]).returncode == 9
    before = open(e, "rb").read()
    rc, _, err = engine("resize", e, "128M", catch_exit=True)
    r = qemu_img("resize", e, "128M")
    assert rc == r.rc == 1
    assert err.strip().split(": ", 1)[1] == r.err.splitlines()[0].split(": ", 1)[1]
    assert open(e, "rb").read() == before


def test_convert_copies_bitmaps(tmp_path):
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "64M", check=True)
    qemu_img("bitmap", "--add", src, "on", check=True)
    qemu_img("bitmap", "--add", "-g", "1M", "--disable", src, "off", check=True)
    qemu_io(src, "write 3M 100k", "write 33M 1M")
    _ok("convert", "--bitmaps", "-O", "qcow2", src, tmp_path / "e.qcow2")
    qemu_img("convert", "--bitmaps", "-O", "qcow2", src, tmp_path / "q.qcow2", check=True)
    assert info_bitmaps(tmp_path / "e.qcow2") == info_bitmaps(tmp_path / "q.qcow2")
    for name in ("on", "off"):
        assert dirty(tmp_path / "e.qcow2", name, tmp_path) == \
            dirty(tmp_path / "q.qcow2", name, tmp_path)
    assert_clean(tmp_path / "e.qcow2")
    rc, _, err = engine("convert", "--bitmaps", "-O", "raw", src, tmp_path / "x.raw",
                        catch_exit=True)
    r = qemu_img("convert", "--bitmaps", "-O", "raw", src, tmp_path / "y.raw")
    assert rc == r.rc == 1 and err.split(": ", 1)[1] == r.err.split(": ", 1)[1]
