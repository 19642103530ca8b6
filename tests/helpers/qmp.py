"""Fixtures and helpers for the live tests (tests/live/); no tests here.

Every live test runs a real qemu-system-x86_64 (TCG, `-M pc -S` or `-M none`: no firmware
runs; block jobs, and with pc devices, work) through qmp_bridge.launch.QemuProcess -- the one
QEMU launcher.  Data is checked offline after QEMU has quit, with qemu-io (read -P) and with
our engine (open_chain().read()), and every image file must pass `qemu-img check`.  The
fixtures `vm` and `vm_none` are registered for tests/live/ in tests/live/conftest.py.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import pytest

import qcow2engine
from qmp_bridge import nodes as N
from qmp_bridge.launch import QemuProcess

from .qemu import assert_clean, qemu_img, qemu_img_info, qemu_io

__all__ = ["MiB", "Span", "make_image", "expect", "assert_clean", "backing_name", "written_ok",
           "setup_disk", "vm", "vm_none", "Model", "guest_write"]

MiB = 1 << 20
Span = tuple  # (offset, length, pattern byte)


def make_image(path: Path, size: int, *, backing: Path | None = None,
               writes: Iterable[Span] = ()) -> Path:
    """A qcow2 image (with a relative backing name if `backing`), with `writes` done by
    qemu-io."""
    argv: list[object] = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", os.path.relpath(backing, path.parent), "-F", "qcow2"]
    qemu_img(*argv, path, size, check=True)
    cmds = ["write -P 0x%02x %d %d" % (pat, off, length) for off, length, pat in writes]
    if cmds:
        qemu_io(path, *cmds)
    return path


def expect(path: Path, spans: Sequence[Span]) -> None:
    """The guest view of `path` (its whole chain) holds pattern `pat` at each span: checked with
    qemu-io read -P and with our engine."""
    cmds = ["read -P 0x%02x %d %d" % (pat, off, length) for off, length, pat in spans]
    p = qemu_io(path, *cmds, fmt=None, read_only=True)
    assert "verification failed" not in p.stdout, (path, p.stdout)
    with qcow2engine.open_chain(str(path)) as chain:
        for off, length, pat in spans:
            data = chain.read(off, length)
            assert data == bytes([pat]) * length, (path, off, length, pat, data[:16])


def backing_name(path: Path) -> str | None:
    """The backing file name written in `path`'s header (qemu-img info)."""
    return qemu_img_info(path, force_share=True).get("backing-filename")


def written_ok(vm: QemuProcess, count: int) -> None:
    """QEMU's log shows `count` successful qemu-io writes and no failures."""
    text = vm.log()
    assert text.count("wrote ") == count, text
    assert "failed" not in text.lower(), text


def setup_disk(vm: QemuProcess, tmp: Path, name: str, layers: Sequence[Sequence[Span]], *,
               size: int = 32 * MiB, device: bool = True,
               read_only_backing: bool = False) -> tuple[list[Path], str]:
    """Images `<name>0.qcow2` (base) .. `<name>N.qcow2` (top) with the given writes, each added
    as its own node (`<name>0`..), the top attached to a virtio-blk device `name` if device.
    Returns (paths base first, the qemu-io target: device backend path or top node)."""
    paths: list[Path] = []
    for i, writes in enumerate(layers):
        paths.append(make_image(tmp / ("%s%d.qcow2" % (name, i)), size,
                                backing=paths[-1] if paths else None, writes=writes))
    names = ["%s%d" % (name, i) for i in range(len(layers))]
    N.add_chain(vm.qmp, [str(p) for p in paths], names, read_only_backing=read_only_backing)
    target = N.attach_device(vm.qmp, names[-1], name) if device else names[-1]
    return paths, target


@pytest.fixture
def vm(tmp_path: Path):
    """A QEMU (-M pc, TCG, prelaunch) with our QMP session as vm.qmp; logs in tmp_path."""
    with QemuProcess(machine="pc", log_path=str(tmp_path / "qemu.log"), timeout=15.0) as v:
        yield v


@pytest.fixture
def vm_none(tmp_path: Path):
    """A QEMU with -machine none (block layer only)."""
    with QemuProcess(machine="none", log_path=str(tmp_path / "qemu.log"), timeout=15.0) as v:
        yield v


class Model:
    """The expected guest view of a disk: a bytearray we apply the same writes to."""

    def __init__(self, size: int, writes: Iterable[Span] = ()):
        self.size = size
        self.data = bytearray(size)
        self.write_all(writes)

    def write(self, off: int, length: int, pat: int) -> None:
        self.data[off:off + length] = bytes([pat]) * length

    def write_all(self, writes: Iterable[Span]) -> None:
        for w in writes:
            self.write(*w)

    def copy(self) -> "Model":
        m = Model(self.size)
        m.data[:] = self.data
        return m

    def check(self, path: Path, tmp: Path) -> None:
        """`path`'s guest view equals the model: qemu-img compare against the model as a raw
        file, and our engine's read of the whole chain."""
        raw = tmp / ("model-%s.raw" % path.stem)
        raw.write_bytes(bytes(self.data))
        r = qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, path)
        assert r.returncode == 0, (path, r.stdout, r.stderr)
        with qcow2engine.open_chain(str(path)) as chain:
            assert chain.read(0, self.size) == bytes(self.data), path
        raw.unlink()


def guest_write(vm: QemuProcess, target: str, model: Model | None, off: int, length: int,
                pat: int) -> None:
    """A guest write through HMP qemu-io, mirrored into `model`."""
    N.qemu_io(vm.qmp, target, "write -P 0x%02x %d %d" % (pat, off, length))
    if model is not None:
        model.write(off, length, pat)
