"""Demo: build a three-layer backing chain with the engine alone and inspect it.

    python -m qcow2engine.demo [DIR]

raw base  <-  qcow2 middle (relative backing name, in a subfolder)  <-  qcow2 top, with
data, zero writes and discards in every layer; then `info --backing-chain`, `map`, `check`,
`convert -O raw` and `compare`, exactly as a user would run them.

Then a machine with two disks and a snapshot tree: the seed's tree (a, b, c, d, revert to b,
create e) with internal snapshots, an external branch on top followed, committed and
deleted, `snapshot-list --tree`, `machine info`, `machine check`.  No QEMU needed.
"""
from __future__ import annotations

import os
import sys
import tempfile

MiB = 1 << 20


def build(d: str) -> str:
    from . import api
    os.makedirs(os.path.join(d, "base"), exist_ok=True)
    base = os.path.join(d, "base", "base.raw")
    with open(base, "wb") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 4):
            f.seek(i * MiB)
            f.write(bytes([0x40 + i]) * (MiB // 2))
    mid = os.path.join(d, "mid.qcow2")
    api.create(mid, None, "cluster_size=64k", backing_file="base/base.raw", backing_fmt="raw")
    with api.open_chain(mid, writable=True) as c:
        c.write(3 * MiB + 1000, b"middle layer " * 20000)
        c.write_zeroes(8 * MiB, 2 * MiB)
    top = os.path.join(d, "top.qcow2")
    api.create(top, 96 * MiB, "extended_l2=on", backing_file="mid.qcow2", backing_fmt="qcow2")
    with api.open_chain(top, writable=True) as c:
        c.write(5 * MiB + 4096, b"top!" * 4096)
        c.write(70 * MiB, os.urandom(3 * MiB))
        c.discard(12 * MiB, 4 * MiB)
    return top


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = argv[0] if argv else tempfile.mkdtemp(prefix="qcow2engine-demo-")
    os.makedirs(d, exist_ok=True)
    top = build(d)
    from .cli.main import main as cli
    os.chdir(d)
    name = os.path.basename(top)
    steps = [
        ["info", "--backing-chain", name],
        ["map", "--output=json", name],
        ["check", name],
        ["convert", "-O", "raw", name, "flat.raw"],
        ["compare", name, "flat.raw"],
    ]
    for argv2 in steps:
        print("\n$ qcow2engine " + " ".join(argv2), flush=True)
        rc = cli(argv2)
        sys.stdout.flush()
        if rc != 0:
            print("demo step failed with exit code %d" % rc)
            return rc
    rc = machine_demo(d, cli)
    if rc != 0:
        return rc
    print("\nDemo chain and machine left in %s" % d)
    return 0


def _guest_write(state_dir: str, disk: str, offset: int, data: bytes) -> None:
    """What a guest would do between snapshots (through the engine: no QEMU here)."""
    from . import api
    from .tree import Tree
    with Tree(state_dir) as t:
        active = next(x for x in t.machine("demo").info()["disks"] if x["name"] == disk)["active"]
    with api.open_chain(active, writable=True) as c:
        c.write(offset, data)


def machine_demo(d: str, cli) -> int:
    from . import api
    vm = os.path.join(d, "vm")
    os.makedirs(vm, exist_ok=True)
    for disk, size in (("vda", 64 * MiB), ("vdb", 32 * MiB)):
        api.create(os.path.join(vm, disk + ".qcow2"), size)
    state = os.path.join(d, "state")
    S = ["--state-dir", state]
    steps = [
        ["machine", "define", "demo", "--disk", "vda=vm/vda.qcow2", "--disk", "vdb=vm/vdb.qcow2"],
        ("write", "vda", 0, b"a" * 65536),
        ["snapshot-create-as", "demo", "a", "--description", "first boot"],
        ("write", "vda", 1 * MiB, b"b" * 65536),
        ["snapshot-create-as", "demo", "b"],
        ("write", "vdb", 2 * MiB, b"c" * 65536),
        ["snapshot-create-as", "demo", "c"],
        ("write", "vda", 3 * MiB, b"d" * 65536),
        ["snapshot-create-as", "demo", "d"],
        ("write", "vda", 4 * MiB, b"tip" * 1000),
        ["snapshot-revert", "demo", "b"],
        ("write", "vdb", 5 * MiB, b"e" * 65536),
        ["snapshot-create-as", "demo", "e"],
        ["snapshot-list", "demo", "--tree"],
        ["snapshot-create-as", "demo", "x", "--disk-only"],
        ("write", "vda", 6 * MiB, b"x" * 65536),
        ["snapshot-revert", "demo", "d"],
        ["snapshot-revert", "demo", "x", "--follow"],
        ["snapshot-revert", "demo", "x", "--commit", "--discard"],
        ["snapshot-list", "demo", "--parent"],
        ["snapshot-delete", "demo", "c"],
        ["snapshot-list", "demo", "--tree"],
        ["machine", "info", "demo"],
        ["machine", "check", "demo"],
    ]
    for st in steps:
        if isinstance(st, tuple):
            _guest_write(state, st[1], st[2], st[3])
            print("\n# the guest writes %d bytes to %s at %d" % (len(st[3]), st[1], st[2]))
            continue
        print("\n$ qcow2engine --state-dir state " + " ".join(st), flush=True)
        rc = cli(S + st)
        sys.stdout.flush()
        if rc != 0:
            print("demo step failed with exit code %d" % rc)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
