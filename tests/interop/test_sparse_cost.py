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
