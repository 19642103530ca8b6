"""The README's first command: the demo builds a chain with the engine alone and inspects it."""
from __future__ import annotations

import contextlib
import io
import os

import pytest

from tests.helpers.qemu import qemu_img


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the demo once (it builds a chain and a machine): (its folder, its output)."""
    from qcow2engine.demo import main
    d = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    cwd = os.getcwd()
    try:
        with contextlib.redirect_stdout(out):
            rc = main([str(d)])
    finally:
        os.chdir(cwd)
    assert rc == 0, out.getvalue()
    return d, out.getvalue()


def test_demo_chain(demo):
    tmp_path, text = demo
    assert "Images are identical." in text and "No errors were found" in text
    for name in ("top.qcow2", "mid.qcow2"):
        assert qemu_img("check", tmp_path / name)[0] == 0
    assert qemu_img("compare", tmp_path / "top.qcow2", tmp_path / "flat.raw")[0] == 0


def test_demo_machine(demo):
    """The demo's machine: its tree, clean images, and the tip it ends on, read by qemu-img."""
    import glob
    import json
    from tests.helpers.qemu import guest_bytes
    tmp_path, text = demo
    assert "Machine demo is consistent" in text and "  +- e\n" in text
    for f in glob.glob(str(tmp_path / "vm" / "*.qcow2")):
        assert qemu_img("check", f)[0] == 0, f
    from qcow2engine.cli.main import main as cli
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(["--state-dir", str(tmp_path / "state"), "machine", "info", "demo",
                    "--output=json"]) == 0
    disks = {d["name"]: d["active"] for d in json.loads(buf.getvalue())["disks"]}
    MiB = 1 << 20
    vda, vdb = guest_bytes(disks["vda"]), guest_bytes(disks["vdb"])
    assert vda[:65536] == b"a" * 65536 and vda[MiB:MiB + 65536] == b"b" * 65536
    assert vda[6 * MiB:6 * MiB + 65536] == b"x" * 65536
    assert vda[3 * MiB:3 * MiB + 65536] == bytes(65536)      # d's write is on another branch
    assert vdb[5 * MiB:5 * MiB + 65536] == b"e" * 65536
    assert vdb[2 * MiB:2 * MiB + 65536] == bytes(65536)      # c's too
