"""Interop: on every image variant QEMU writes, our CLI must print exactly what qemu-img prints
(info, check, map, compare) and convert -O raw must produce the same guest bytes."""
from __future__ import annotations

import os

import pytest

from tests.helpers.engine import engine
from tests.helpers.images import variant_params
from tests.helpers.qemu import qemu_img

NAMES = variant_params()          # every variant (building savevm boots qemu-system: live)

COMMANDS = {
    "info-json": ["info", "--output=json"],
    "info-human": ["info"],
    "info-chain-json": ["info", "--backing-chain", "--output=json"],
    "info-chain-human": ["info", "--backing-chain"],
    "check-json": ["check", "--output=json"],
    "check-human": ["check"],
    "map-json": ["map", "--output=json"],
    "map-human": ["map"],
}


def _norm_err(text: str) -> str:
    return text.replace("qemu-img: ", "").replace("qcow2engine: ", "")


@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.parametrize("name", NAMES)
def test_same_output_as_qemu_img(variant_images, name, cmd):
    v, path = variant_images[name]
    argv = COMMANDS[cmd] + [path.name]
    q_rc, q_out, q_err = qemu_img(*argv, cwd=path.parent)
    e_rc, e_out, e_err = engine(*argv, cwd=path.parent)
    assert e_rc == q_rc, (q_err, e_err)
    if cmd.startswith("check"):
        # per-cluster diagnostics go to stderr: we must report the same count of them
        assert e_out == q_out
        assert len(e_err.splitlines()) == len(q_err.splitlines()), (q_err, e_err)
    elif q_rc == 0:
        assert e_out == q_out
    else:
        assert e_err.count("\n") == 1, e_err


@pytest.mark.parametrize("name", NAMES)
def test_convert_raw_same_bytes(variant_images, name, tmp_path):
    v, path = variant_images[name]
    ours = tmp_path / "ours.raw"
    theirs = tmp_path / "theirs.raw"
    q = qemu_img("convert", "-O", "raw", path.name, theirs, cwd=path.parent)
    assert q[0] == 0, q[2]
    rc, out, err = engine("convert", "-O", "raw", path.name, ours, cwd=path.parent)
    assert rc == 0, err
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        while True:
            x, y = a.read(1 << 20), b.read(1 << 20)
            assert x == y
            if not x:
                break
    # sparse: no more blocks allocated than qemu-img's output
    assert os.stat(ours).st_blocks <= os.stat(theirs).st_blocks + 8
    # and qemu-img agrees that the guest views are identical
    rc, out, _ = qemu_img("compare", "-f", v.fmt, "-F", "raw", path.name, ours, cwd=path.parent)
    assert rc == 0, out


@pytest.mark.parametrize("name", NAMES)
def test_compare_against_raw_copy(variant_images, name, tmp_path):
    """compare <image> <its raw copy>: identical; after one changed byte: same mismatch offset."""
    v, path = variant_images[name]
    raw = tmp_path / "copy.raw"
    assert qemu_img("convert", "-O", "raw", path.name, raw, cwd=path.parent)[0] == 0
    args = ["compare", "-f", v.fmt, "-F", "raw", path.name, raw]
    q = qemu_img(*args, cwd=path.parent)
    e = engine(*args, cwd=path.parent)
    assert (e[0], e[1]) == (q[0], q[1]) == (0, "Images are identical.\n")
    size = os.path.getsize(raw)
    with open(raw, "r+b") as f:
        f.seek(size // 3 + 77)
        b = f.read(1)
        f.seek(size // 3 + 77)
        f.write(bytes([b[0] ^ 0x5A]))
    q = qemu_img(*args, cwd=path.parent)
    e = engine(*args, cwd=path.parent)
    assert (e[0], e[1]) == (q[0], q[1])
    assert q[0] == 1
    for strict in (["-s"],):
        a2 = ["compare", *strict, "-f", v.fmt, "-F", "raw", path.name, raw]
        q = qemu_img(*a2, cwd=path.parent)
        e = engine(*a2, cwd=path.parent)
        assert (e[0], e[1]) == (q[0], q[1])
