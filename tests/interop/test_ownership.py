"""One owner for each image's state (issue 10): one allocator per open image, one opener
(a Session opens each file once per inode), and every long operation cancelled at each of
its window boundaries.  qemu-img is the oracle for every image afterwards."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import qcow2engine as q
from qcow2engine import api
from qcow2engine.chain import convert as convertmod, copy as copymod
from qcow2engine.chain.session import Session
from qcow2engine.errors import ImageInUseError, InvalidImageError, InvalidRequestError
from qcow2engine.image import snapshots as S
from qcow2engine.jobs import CANCELLED, COMPLETED
from tests.helpers.qemu import assert_clean, guest_bytes, qemu_img, qemu_io

MiB = 1 << 20
K64 = 65536


def test_snapshot_between_writes_on_one_open_chain(tmp_path):
    """The issue's reproduction: write, snapshot through the chain's own image, write."""
    p = str(tmp_path / "d.qcow2")
    q.create(p, 64 * MiB)
    with q.open_chain(p, writable=True) as c:
        c.write(0, b"\xaa" * K64)
        S.create_snapshot(c.top.image, "s1")
        c.write(0, b"\xbb" * K64)
        c.write(K64, b"\xcc" * K64)       # allocates after the new snapshot table
    assert_clean(p)
    g = guest_bytes(p)
    assert g[:K64] == b"\xbb" * K64 and g[K64:2 * K64] == b"\xcc" * K64
    s1 = guest_bytes(p, snapshot="s1")
    assert s1[:K64] == b"\xaa" * K64 and s1[K64:2 * K64] == bytes(K64)


def test_one_allocator_per_open_image(tmp_path):
    p = str(tmp_path / "d.qcow2")
    q.create(p, 16 * MiB)
    with q.open_chain(p, writable=True) as c:
        img = c.top.image
        assert c.writer().meta is img.allocator is img.allocator


def test_snapshot_apply_delete_in_the_middle_of_writes(tmp_path):
    """A model of the guest and of each snapshot, against qemu-img after every step."""
    p = str(tmp_path / "d.qcow2")
    size = 8 * MiB
    q.create(p, size, "cluster_size=4096")
    rng = np.random.default_rng(7)
    model = np.zeros(size, np.uint8)
    snaps: dict[str, np.ndarray] = {}
    with q.open_chain(p, writable=True) as c:
        img = c.top.image
        for step in range(24):
            off = int(rng.integers(0, size - 3 * K64)) // 512 * 512
            n = int(rng.integers(1, 3 * K64 // 512)) * 512
            data = rng.integers(0, 256, n, dtype=np.uint8)
            c.write(off, data.tobytes())
            model[off:off + n] = data
            if step % 6 == 2:
                name = "s%d" % step
                S.create_snapshot(img, name)
                snaps[name] = model.copy()
            elif step % 6 == 4 and snaps:
                name = sorted(snaps)[0]
                S.apply_snapshot(img, name)
                model = snaps[name].copy()
            elif step % 6 == 5 and len(snaps) > 1:
                name = sorted(snaps)[-1]
                S.delete_snapshot(img, name)
                del snaps[name]
            assert c.read(0, size) == model.tobytes()
    assert_clean(p)
    assert guest_bytes(p) == model.tobytes()
    for name, m in snaps.items():
        assert guest_bytes(p, snapshot=name) == m.tobytes()


def test_two_chains_on_one_file_in_one_process(tmp_path):
    """Never two allocators: a second open of an image open for writing is refused (its
    locks), force-share cannot write, and a read-only force-share view allocates nothing."""
    p = str(tmp_path / "d.qcow2")
    q.create(p, 16 * MiB)
    with q.open_chain(p, writable=True) as c:
        c.write(0, b"\x11" * K64)
        with pytest.raises(ImageInUseError):
            q.open_chain(p, writable=True)
        with pytest.raises(ImageInUseError):
            q.open_chain(p)
        with pytest.raises(InvalidImageError):
            q.open_chain(p, writable=True, force_share=True)
        with q.open_chain(p, force_share=True) as ro:
            assert ro.top.image._allocator is None
        c.write(K64, b"\x22" * K64)
    assert_clean(p)
    assert guest_bytes(p)[:2 * K64] == b"\x11" * K64 + b"\x22" * K64


def test_session_opens_each_inode_once(tmp_path):
    """A base seen through a chain, by another name (a hard link) and writable later is one
    object: one cache, one allocator, its locks taken once."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M", check=True)
    qemu_io(base, "write -P 0x5a 0 1M", check=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, check=True)
    os.link(base, tmp_path / "alias.qcow2")
    with Session() as s:
        chain = s.open_chain(str(top))
        b1 = chain.layers[1].image
        assert s.open_file(str(tmp_path / "alias.qcow2")) is b1
        b2 = s.open_file(str(base), writable=True)          # reopened read-write in place
        assert b2 is b1 and b1.writable
        with s.open_chain(str(base), writable=True) as bc:
            bc.write(MiB, b"\x77" * K64)
        # the top's view sees the base's new data through the same cached tables
        assert chain.read(MiB, K64) == b"\x77" * K64
        chain.close()
    assert_clean(base, top)
    assert guest_bytes(top)[MiB:MiB + K64] == b"\x77" * K64


def test_out_of_range_request_is_invalid_request(tmp_path):
    p = str(tmp_path / "d.qcow2")
    q.create(p, MiB)
    with q.open_chain(p, writable=True) as c:
        with pytest.raises(InvalidRequestError):
            c.write(MiB - 512, bytes(1024))
        with pytest.raises(ValueError):          # it is a ValueError too
            c.write_zeroes(-512, 512)
    assert_clean(p)


# ---------------------------------------------------------------- cancel at every window
class CancelAfter(threading.Event):
    """A cancel event that reads as set from its (n+1)-th look on: a cancel at the n-th
    window boundary of an operation."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.n


def _chain(d, depth: int = 3):
    """base <- mid <- top with data scattered in every layer (8 windows of 1 MiB)."""
    names = ["base.qcow2", "mid.qcow2", "top.qcow2"][:depth]
    for i, n in enumerate(names):
        args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
        if i:
            args += ["-b", names[i - 1], "-F", "qcow2"]
        qemu_img(*args, d / n, "8M", check=True)
        cmds = ["write -P 0x%02x %dk 192k" % (0x10 * (i + 1) + w, w * 1024 + i * 256)
                for w in range(8)]
        qemu_io(d / n, *cmds, check=True)
    return [d / n for n in names]


OPS = {
    "rebase": lambda d, cancel: api.rebase(str(d / "top.qcow2"), "base.qcow2", "qcow2",
                                           cancel=cancel),
    "stream": lambda d, cancel: api.stream(str(d / "top.qcow2"), cancel=cancel),
    "commit": lambda d, cancel: api.commit(str(d / "top.qcow2"), cancel=cancel),
    "commit_b": lambda d, cancel: api.commit(str(d / "top.qcow2"), "base.qcow2", cancel=cancel),
    "convert_raw": lambda d, cancel: api.convert_to_raw(str(d / "top.qcow2"), str(d / "o.raw"),
                                                        cancel=cancel),
    "convert_qcow2": lambda d, cancel: api.convert_to_qcow2(str(d / "top.qcow2"),
                                                            str(d / "o.qcow2"), cancel=cancel),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_cancel_at_every_window_boundary(tmp_path, monkeypatch, op):
    """For n = 0, 1, 2, ...: cancel at the n-th boundary.  The result says cancelled, every
    image is valid, the guest view is unchanged, and the same operation run again completes
    with the right data -- until n is past the last boundary and the first run completes."""
    monkeypatch.setattr(copymod, "WINDOW", MiB)
    monkeypatch.setattr(copymod, "REBASE_WINDOW", MiB)
    monkeypatch.setattr(copymod, "CHUNK", 256 * 1024)
    monkeypatch.setattr(convertmod, "CHUNK", MiB)
    monkeypatch.setattr(convertmod, "SPAN", MiB)
    ref = tmp_path / "ref"
    ref.mkdir()
    _chain(ref)
    want = guest_bytes(ref / "top.qcow2")
    convert = op.startswith("convert")
    out_fmt = "raw" if op == "convert_raw" else "qcow2"
    cancelled = 0
    for n in range(64):
        d = tmp_path / ("n%d" % n)
        d.mkdir()
        files = _chain(d)
        res = OPS[op](d, CancelAfter(n))
        first_completed = res.outcome == COMPLETED
        if res.outcome == CANCELLED:
            cancelled += 1
            if convert:
                if out_fmt == "qcow2":
                    assert_clean(d / "o.qcow2")
            else:
                assert_clean(*files)
                assert guest_bytes(d / "top.qcow2") == want       # the tip is intact
            res = OPS[op](d, None)                                 # the same command again
        assert res.outcome == COMPLETED, res
        if convert:
            assert guest_bytes(d / ("o." + out_fmt), fmt=out_fmt) == want
        else:
            assert_clean(*files)
            assert guest_bytes(d / "top.qcow2") == want
            if op == "commit_b":
                assert guest_bytes(d / "base.qcow2") == want
        if first_completed:
            break
    else:
        pytest.fail("never completed")
    assert cancelled >= 3, "the operation should have several window boundaries"
