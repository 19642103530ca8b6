"""Backing chains built with QEMU's tools from a specification (the chain-operation
differential tests and their fault injection).

A :class:`ChainSpec` lists its layers bottom first; each :class:`Layer` is created with
``qemu-img create`` (backing name relative to the layer's directory) and filled by qemu-io with
its fixed commands and then seeded random ones (patterns, random bytes, zero writes, discards,
compressed writes), optionally with an internal snapshot in the middle.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from qcow2engine.units import parse_size

from .qemu import qemu_img, qemu_io

__all__ = ["KiB", "MiB", "Layer", "ChainSpec", "UNRELATED", "UNRELATED_BIG", "build_chain"]

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Layer:
    path: str                      # relative to the chain directory
    fmt: str = "qcow2"
    size: int = 4 * MiB
    opts: str = ""                 # qemu-img create -o
    kinds: str = "PR"              # random op kinds: P pattern, R random bytes, Z zero,
    #                                U zero+unmap, D discard, C compressed
    nops: int = 6
    gran: int = 4 * KiB            # offset / length granularity of the random ops
    maxlen: int = 384 * KiB
    cmds: list[str] = field(default_factory=list)    # fixed qemu-io commands, run first
    snapshot: str | None = None    # internal snapshot taken after the ops, then more ops

    @property
    def cluster(self) -> int:
        for o in self.opts.split(","):
            if o.startswith("cluster_size="):
                return parse_size(o.split("=", 1)[1])
        return 64 * KiB


@dataclass
class ChainSpec:
    name: str
    layers: list[Layer]            # bottom first; the last one is the top
    seed: int = 0

    @property
    def depth(self) -> int:
        return len(self.layers)

    def backing_name(self, i: int) -> str | None:
        """The backing file name stored in layer i (relative to its directory)."""
        if i == 0:
            return None
        below, me = self.layers[i - 1].path, self.layers[i].path
        return os.path.relpath(below, os.path.dirname(me) or ".")

    def rel(self, target: int, frm: int) -> str:
        """Name of layer `target` relative to the directory of layer `frm`."""
        return os.path.relpath(self.layers[target].path,
                               os.path.dirname(self.layers[frm].path) or ".")


UNRELATED = "other/unrelated.qcow2"
UNRELATED_BIG = "other/big.raw"            # larger than every chain


def _parse_range(cmd: str) -> tuple[int, int]:
    off, ln = cmd.split()[-2:]
    return parse_size(off), parse_size(ln)


def _rand_cmds(rng: random.Random, L: Layer, rnd: Path, used: set[int]) -> list[str]:
    """nops random qemu-io commands for layer L; used: clusters written compressed or
    otherwise allocated so far (a compressed write must go to unallocated clusters)."""
    out = []
    g = L.gran
    cs = L.cluster
    for _ in range(L.nops):
        k = rng.choice(L.kinds)
        if k == "C":
            free = [c for c in range(-(-L.size // cs)) if c not in used]
            if not free:
                continue
            c0 = rng.choice(free)
            n = 1
            while n < 4 and c0 + n in free:
                n += 1
            n = rng.randrange(1, n + 1)
            used.update(range(c0, c0 + n))
            off = c0 * cs
            ln = min(n * cs, L.size - off)
            src = rng.choice([f"-P {rng.randrange(1, 256):#x}", f"-s {rnd}"])
            out.append(f"write -c {src} {off} {ln}")
            continue
        off = rng.randrange(0, L.size // g) * g
        ln = min(rng.randrange(1, L.maxlen // g + 1) * g, L.size - off,
                 256 * KiB if k == "R" else L.size)
        used.update(range(off // cs, -(-(off + ln) // cs)))
        if k == "P":
            out.append(f"write -P {rng.randrange(1, 256):#x} {off} {ln}")
        elif k == "R":
            out.append(f"write -s {rnd} {off} {ln}")
        elif k == "Z":
            out.append(f"write -z {off} {ln}")
        elif k == "U":
            out.append(f"write -z -u {off} {ln}")
        elif k == "D":
            out.append(f"discard {off} {ln}")
    return out


def build_chain(spec: ChainSpec, d: Path, rnd: Path, others: bool = True) -> Path:
    """Build the chain (and, with others, the images other/unrelated.qcow2 and
    other/big.raw) in d with QEMU's tools."""
    rng = random.Random(f"{spec.name}:{spec.seed}")
    d.mkdir(parents=True)
    for i, L in enumerate(spec.layers):
        p = d / L.path
        p.parent.mkdir(parents=True, exist_ok=True)
        args = ["create", "-q", "-f", L.fmt]
        if i:
            args += ["-b", spec.backing_name(i), "-F", spec.layers[i - 1].fmt]
        if L.opts:
            args += ["-o", L.opts]
        qemu_img(*args, L.path, L.size, cwd=d, check=True)
        used: set[int] = set()
        for cmd in L.cmds:
            off, ln = _parse_range(cmd)
            used.update(range(off // L.cluster, -(-(off + ln) // L.cluster)))
        cmds = list(L.cmds) + _rand_cmds(rng, L, rnd, used)
        if cmds:
            qemu_io(L.path, *cmds, fmt=L.fmt, cwd=d)
        if L.snapshot:
            qemu_img("snapshot", "-c", L.snapshot, L.path, cwd=d, check=True)
            qemu_io(L.path, *_rand_cmds(rng, L, rnd, used), fmt=L.fmt, cwd=d)
    if not others:
        return d
    # an image outside the chain (rebase target), smaller than most chains
    (d / "other").mkdir(exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", UNRELATED, 3 * MiB, cwd=d,
             check=True)
    qemu_io(UNRELATED, f"write -P 0x{0x40 + spec.seed % 64:02x} 0 1M",
            f"write -s {rnd} 1536k 256k", "write -P 0x11 2M 64k", cwd=d)
    qemu_img("create", "-q", "-f", "raw", UNRELATED_BIG, 10 * MiB, cwd=d, check=True)
    qemu_io(UNRELATED_BIG, "write -P 0x0e 0 3M", f"write -s {rnd} 5M 256k", "write -P 0x0f 9M 1M",
            fmt="raw", cwd=d)
    return d
