"""Demo: build a three-layer backing chain with the engine alone and inspect it.

    python -m qcow2engine.demo [DIR]

raw base  <-  qcow2 middle (relative backing name, in a subfolder)  <-  qcow2 top, with
data, zero writes and discards in every layer; then `info --backing-chain`, `map`, `check`,
`convert -O raw` and `compare`, exactly as a user would run them.  No QEMU needed.
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
    print("\nDemo chain left in %s" % d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
