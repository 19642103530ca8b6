"""Cost follows what is allocated, not the virtual size (counted, not timed)."""
from __future__ import annotations

import os

from qcow2engine import api
from qcow2engine.chain.view import Chain
from tests.helpers.qemu import qemu_img, qemu_io

MiB = 1 << 20


def test_convert_to_raw_reads_only_the_data(tmp_path, monkeypatch):
    """A 4 TiB disk with 4 MiB written: convert -O raw reads about 4 MiB (not 4 TiB of zeros),
    leaves holes everywhere else, and reads back as qemu-img reads the source."""
    src = str(tmp_path / "big.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, "4T", check=True)
    qemu_io(src, "write -P 1 0 1M", "write -P 2 2T 1M", "write -P 3 4095G 2M")
    read = [0]
    orig = Chain.read_extents_into

    def counting(self, out, base, ex, *a, **kw):
        read[0] += len(out)
        return orig(self, out, base, ex, *a, **kw)
    monkeypatch.setattr(Chain, "read_extents_into", counting)
    dst = str(tmp_path / "big.raw")
    api.convert_to_raw(src, dst)
    assert read[0] <= 4 * 8 * MiB, read[0]            # a chunk per data extent at most
    assert os.stat(dst).st_size == 4 << 40
    assert os.stat(dst).st_blocks * 512 <= 16 * MiB
    assert qemu_img("compare", "-q", src, dst)[0] == 0


def test_convert_to_qcow2_reads_only_the_data(tmp_path, monkeypatch):
    src = str(tmp_path / "big.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, "4T", check=True)
    qemu_io(src, "write -P 1 0 1M", "write -P 2 2T 1M", "write -z 3T 1M")
    read = [0]
    orig = Chain.read_into

    def counting(self, out, offset, *a, **kw):
        read[0] += len(out)
        return orig(self, out, offset, *a, **kw)
    monkeypatch.setattr(Chain, "read_into", counting)
    dst = str(tmp_path / "out.qcow2")
    api.convert_to_qcow2(src, dst)
    assert read[0] <= 2 * 16 * MiB, read[0]           # one span per data extent
    assert qemu_img("compare", "-q", src, dst)[0] == 0
    assert qemu_img("check", dst)[0] == 0


def test_an_unallocated_l1_range_costs_the_same_for_every_size(tmp_path, monkeypatch):
    """Block status of thin disks of 64 GiB .. 256 TiB holding the same 4 MiB: the same
    L2 table reads and the same few block-status windows for every size (a stretch without
    an L2 table is one window however long: 256 TiB used to be 16,384 windows), and the
    same map as qemu-img's."""
    import json
    from qcow2engine.chain.session import open_chain
    from qcow2engine.image.qcow2 import Qcow2Image
    counts = {}
    for size in ("64G", "4T", "256T"):
        img = str(tmp_path / ("thin-%s.qcow2" % size))
        qemu_img("create", "-q", "-f", "qcow2", img, size, check=True)
        virt = json.loads(qemu_img("info", "--output=json", img, check=True).out)["virtual-size"]
        qemu_io(img, "write -P 1 0 1M", "write -P 2 %d 1M" % (virt // 2),
                "write -P 3 %d 2M" % (virt - 64 * MiB))
        windows, l2 = [0], [0]
        orig_w, orig_l2 = Chain._window, Qcow2Image.read_l2

        def w(self, *a, **kw):
            windows[0] += 1
            return orig_w(self, *a, **kw)

        def r(self, *a, **kw):
            l2[0] += 1
            return orig_l2(self, *a, **kw)
        monkeypatch.setattr(Chain, "_window", w)
        monkeypatch.setattr(Qcow2Image, "read_l2", r)
        with open_chain(img) as c:
            ex = c.extents()
        monkeypatch.setattr(Chain, "_window", orig_w)
        monkeypatch.setattr(Qcow2Image, "read_l2", orig_l2)
        counts[size] = (windows[0], l2[0])
        data = [(int(s), int(e)) for s, e, k in zip(ex.starts, ex.ends, ex.kinds) if k == 4]
        q = [(m["start"], m["start"] + m["length"])
             for m in json.loads(qemu_img("map", "--output=json", img, check=True).out)
             if m["data"]]
        assert data == q, size
    # the table reads: exactly the same; the windows: the same few (one per data region,
    # one per gap, give or take one where a gap meets the window grid)
    assert len({l2 for _, l2 in counts.values()}) == 1, counts
    assert all(w <= 6 for w, _ in counts.values()), counts
