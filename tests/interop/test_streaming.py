"""Streaming data paths: large writes that move through small buffers.

- ``Chain.read_ranges_into`` (block status resolved once, holes zeroed, bytes outside the
  ranges untouched) against ``Chain.read`` on a chain with compressed, zero, extended-L2
  and raw layers;
- sources (``sources.PatternSource`` / ``ViewSource``): ``io write -P`` of sizes that span
  many buffer chunks, unaligned, over a backing file, qcow2 and raw, against qemu-io;
- commit and rebase with in-kernel copies (copy_file_range) and with them refused
  (EXDEV: the same bytes are written through the buffer), against qemu-img;
- after commit the emptied top gives its space back (file not larger than qemu-img's);
- a write that only overwrites clusters in place makes no flush of its own, and the data
  is on disk when the image is closed.
"""
from __future__ import annotations

import errno
import os
import random
import shutil

import numpy as np
import pytest

from qcow2engine import open_chain
from qcow2engine.blockdev.sources import ViewSource
from qcow2engine.chain.ops import commit, rebase
from qcow2engine.host import fileio
from tests.helpers.engine import engine
from tests.helpers.qemu import assert_clean, assert_same_guest, qemu_io, run

MiB = 1 << 20


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    """raw base <- compressed qcow2 <- extended-L2 qcow2 with zeros/discards <- top."""
    d = tmp_path_factory.mktemp("streamchain")
    run("qemu-img", "create", "-q", "-f", "raw", d / "base.raw", "24M")
    qemu_io(d / "base.raw", "write -P 0x11 0 24M", fmt="raw")
    run("qemu-img", "create", "-q", "-f", "qcow2", d / "src.qcow2", "24M")
    rng = random.Random(5)
    cmds = ["write -P %d %d %d" % (rng.randrange(1, 255), rng.randrange(0, 23 * MiB),
                                   rng.randrange(1, 600000)) for _ in range(30)]
    qemu_io(d / "src.qcow2", *cmds)
    run("qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", "-B", "base.raw",
        "-F", "raw", "src.qcow2", "mid.qcow2", cwd=d)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k",
        "-b", "mid.qcow2", "-F", "qcow2", "l2.qcow2", cwd=d)
    qemu_io(d / "l2.qcow2", "write -P 0x22 100000 3M", "write -z 5M 2M", "discard 9M 1M",
        "write -P 0x23 12345 40000")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "l2.qcow2", "-F", "qcow2",
        "top.qcow2", "30M", cwd=d)
    qemu_io(d / "top.qcow2", "write -P 0x33 20M 5M", "write -z 1M 64k", "write -P 0x34 7M 70000")
    return d


def test_read_ranges_into_matches_read(chain_dir):
    rng = random.Random(1)
    with open_chain(str(chain_dir / "top.qcow2")) as ch:
        whole = np.frombuffer(ch.read(0, ch.size), np.uint8)
        ex = ch.extents(0, ch.size)
        for trial in range(40):
            cuts = sorted(rng.sample(range(0, ch.size + 2 * MiB, 4096), 2 * rng.randrange(1, 6)))
            starts, ends = cuts[0::2], cuts[1::2]
            for zeroed, extents in ((False, None), (False, ex), (True, None)):
                out = np.full(ch.size + 2 * MiB, 0xEE, np.uint8)
                if zeroed:
                    for s, e in zip(starts, ends):
                        out[s:e] = 0
                ch.read_ranges_into(out, 0, starts, ends, zeroed=zeroed,
                                    extents=extents if (extents is None or ends[-1] <= ch.size)
                                    else None)
                want = np.full(len(out), 0xEE, np.uint8)
                for s, e in zip(starts, ends):
                    want[s:e] = 0
                    hi = min(e, ch.size)
                    if hi > s:
                        want[s:hi] = whole[s:hi]
                assert np.array_equal(out, want), (trial, starts, ends, zeroed)


def test_view_source_slices_and_copies(chain_dir, tmp_path):
    """Every slice of a ViewSource is the guest view; copy_to writes the same bytes or
    declines (compressed extents)."""
    with open_chain(str(chain_dir / "top.qcow2")) as ch:
        whole = ch.read(0, ch.size)
        src = ViewSource(ch, 3 * MiB + 4096, 20 * MiB, chunk=MiB)
        fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
        try:
            copied = 0
            for a in range(0, len(src), MiB):
                b = min(a + MiB, len(src))
                assert bytes(src[a:b]) == whole[3 * MiB + 4096 + a:3 * MiB + 4096 + b]
                if src.copy_to(fd, a, a, b):
                    copied += 1
                else:
                    fileio.pwrite(fd, src[a:b], a)
            with pytest.raises(ValueError):
                src[0:2 * MiB]
            assert os.pread(fd, 20 * MiB, 0) == whole[3 * MiB + 4096:23 * MiB + 4096]
            assert copied > 0
        finally:
            os.close(fd)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_pattern_write_spans_chunks(tmp_path, fmt):
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
    qemu_io(base, "write -P 7 0 64M")
    cmds = ["write -P 0xab 1000 21M", "write -P 3 30M 100", "write 40M 17M",
            "write -P 9 %d 9M" % (63 * MiB - 4097)]
    for name in ("q", "e"):
        p = tmp_path / name
        if fmt == "qcow2":
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", p)
        else:
            run("qemu-img", "create", "-q", "-f", "raw", p, "64M")
    qemu_io(tmp_path / "q", *cmds[:3], fmt=fmt)
    rc, out, err = engine("io", "-f", fmt, *sum((["-c", c] for c in cmds[:3]), []),
                          tmp_path / "e")
    assert rc == 0, err
    assert out.count("wrote") == 3
    assert_same_guest(tmp_path / "q", tmp_path / "e")
    if fmt == "qcow2":
        assert_clean(tmp_path / "e")
    # a write past the end fails like qemu-io's, without writing
    before = (tmp_path / "e").read_bytes()
    rc, out, err = engine("io", "-f", fmt, "-c", cmds[3], tmp_path / "e")
    assert (tmp_path / "e").read_bytes() == before


def _commit_chain(d):
    run("qemu-img", "create", "-q", "-f", "qcow2", d / "base.qcow2", "40M")
    qemu_io(d / "base.qcow2", "write -P 0x5a 0 40M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        "top.qcow2", "48M", cwd=d)
    qemu_io(d / "top.qcow2", *["write -P %d %d 1M" % (i + 3, i * 1398101) for i in range(30)],
        "write -z 44M 1M", "write -P 0x77 46M 100000")


@pytest.mark.parametrize("in_kernel", [True, False])
def test_commit_and_flatten_with_and_without_copy_file_range(tmp_path, monkeypatch, in_kernel):
    if not in_kernel:
        def refuse(*a, **k):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    for op in ("commit", "rebase"):
        q, e = tmp_path / (op + "-q"), tmp_path / (op + "-e")
        q.mkdir()
        _commit_chain(q)
        shutil.copytree(q, e)
        if op == "commit":
            run("qemu-img", "commit", "-q", "top.qcow2", cwd=q)
            commit(str(e / "top.qcow2"))
            # the emptied top gives its space back, as qemu-img's does
            assert os.path.getsize(e / "top.qcow2") <= os.path.getsize(q / "top.qcow2")
            assert os.stat(e / "top.qcow2").st_blocks <= os.stat(q / "top.qcow2").st_blocks
            for f in ("base.qcow2", "top.qcow2"):
                assert_same_guest(q / f, e / f)
                assert_clean(e / f)
        else:
            run("qemu-img", "rebase", "-b", "", "top.qcow2", cwd=q)
            rebase(str(e / "top.qcow2"), "")
            assert_same_guest(q / "top.qcow2", e / "top.qcow2")
            assert_clean(e / "top.qcow2")
            # only clusters that differ from zeros were copied: no bigger than qemu-img's
            assert os.path.getsize(e / "top.qcow2") <= os.path.getsize(q / "top.qcow2")


def test_in_place_overwrite_has_no_flush_until_close(tmp_path, monkeypatch):
    img = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 1 0 16M")
    calls = []
    real = fileio.fsync
    monkeypatch.setattr(fileio, "fsync", lambda fd: (calls.append(fd), real(fd)))
    with open_chain(str(img), writable=True) as ch:
        ch.write(MiB, b"\x02" * (4 * MiB))         # clusters already allocated: in place
        assert calls == []
        ch.write(0, b"\x03" * 1000)                # partial, still in place
        assert calls == []
    assert len(calls) == 1                          # the close flushes
    out = qemu_io(img, "read -P 2 1M 4M", "read -P 3 0 1000",
                  "read -P 1 1000 %d" % (MiB - 1000)).out
    assert "verification failed" not in out
    assert_clean(img)


@pytest.mark.parametrize("onto", ["nothing", "new-base", "in-chain"])
def test_rebase_and_commit_over_many_small_windows(tmp_path, monkeypatch, onto):
    """Windows of 1 MiB (compare of the next one running in a helper thread while this one
    is written; commit in several write requests): same result as qemu-img."""
    import qcow2engine.chain.copy as co
    monkeypatch.setattr(co, "REBASE_WINDOW", 1 * MiB)
    monkeypatch.setattr(co, "WINDOW", 1 * MiB)
    monkeypatch.setattr(co, "CHUNK", 256 * 1024)
    q = tmp_path / "q"
    q.mkdir()
    _commit_chain(q)
    run("qemu-img", "create", "-q", "-f", "qcow2", q / "mid.qcow2", "40M")
    qemu_io(q / "mid.qcow2", "write -P 0x5a 0 20M", "write -P 0x61 20M 10M", "write -z 30M 2M")
    run("qemu-img", "rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", "base.qcow2", cwd=q)
    run("qemu-img", "create", "-q", "-f", "qcow2", q / "other.qcow2", "40M")
    qemu_io(q / "other.qcow2", "write -P 0x5a 0 10M", "write -P 0x62 10M 20M")
    e = tmp_path / "e"
    shutil.copytree(q, e)
    if onto == "nothing":
        args = ["-b", ""]
    elif onto == "new-base":
        args = ["-b", "other.qcow2", "-F", "qcow2"]
    else:
        args = ["-b", "mid.qcow2", "-F", "qcow2"]
    run("qemu-img", "rebase", *args, "top.qcow2", cwd=q)
    rc, out, err = engine("rebase", *args, "top.qcow2", cwd=e)
    assert rc == 0, err
    assert_same_guest(q / "top.qcow2", e / "top.qcow2")
    assert_clean(e / "top.qcow2")
    if onto == "nothing":       # nothing left to commit into, as qemu-img says
        rc, out, err = engine("commit", "-q", "top.qcow2", cwd=e)
        assert rc == 1 and "does not have a backing file" in err
        return
    run("qemu-img", "commit", "-q", "top.qcow2", cwd=q)
    rc, out, err = engine("commit", "-q", "top.qcow2", cwd=e)
    assert rc == 0, err
    for f in ("top.qcow2", "base.qcow2", "other.qcow2", "mid.qcow2"):
        assert_same_guest(q / f, e / f)
        assert_clean(e / f)
