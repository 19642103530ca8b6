"""The README's first command: the demo builds a chain with the engine alone and inspects it."""
from __future__ import annotations

import contextlib
import io
import os

from tests.helpers.qemu import qemu_img


def test_demo_chain(tmp_path):
    from qcow2engine.demo import main
    out = io.StringIO()
    cwd = os.getcwd()
    try:
        with contextlib.redirect_stdout(out):
            rc = main([str(tmp_path)])
    finally:
        os.chdir(cwd)
    assert rc == 0, out.getvalue()
    text = out.getvalue()
    assert "Images are identical." in text and "No errors were found" in text
    for name in ("top.qcow2", "mid.qcow2"):
        assert qemu_img("check", tmp_path / name)[0] == 0
    assert qemu_img("compare", tmp_path / "top.qcow2", tmp_path / "flat.raw")[0] == 0
