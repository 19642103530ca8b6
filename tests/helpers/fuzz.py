"""A structure-aware qcow2 fuzzer (issue 14): seeded, reproducible mutators over small base
images built with qemu-img/qemu-io, and a runner that puts every CLI command through each
mutant in a child process with a time and memory limit.

`mutate(data, rng)` returns (mutated bytes, description); the same (base, seed) always gives
the same mutant.  `run_mutant(path, workdir)` runs the commands and returns the failures
found (an empty list: nothing wrong), each a (class, detail) pair; classes are "traceback",
"hang", "memory", "changed", "new-corruption", "repair-unclean", "differs".
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from tests.helpers.qemu import qemu_img, qemu_io

TIMEOUT = 20
MEM_LIMIT = 1 << 30
ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- base images


def build_bases(d: Path) -> dict[str, Path]:
    """Small images of the kinds the interop tests use: v2, v3, extended L2, compressed
    clusters, internal snapshots, a backing chain (the overlay is the base mutated)."""
    d = Path(d)
    out = {}

    def mk(name, opts, cmds=("write -P 0x11 0 64k", "write -P 0x22 192k 100k"), size="1M"):
        p = d / name
        args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + [p, size]
        qemu_img(*args, check=True)
        if cmds:
            qemu_io(p, *cmds)
        out[name] = p
        return p

    mk("v3.qcow2", None)
    mk("v2.qcow2", "compat=0.10")
    mk("extl2.qcow2", "extended_l2=on,cluster_size=64k", ("write -P 0x33 0 8k",
                                                       "write -P 0x44 100k 40k"))
    mk("small_cluster.qcow2", "cluster_size=4k,refcount_bits=4")
    c = mk("compressed.qcow2", None, ())
    qemu_io(c, "write -c -P 0x55 0 64k", "write -c -P 0x66 64k 64k", "write -P 0x77 256k 64k")
    s = mk("snapshots.qcow2", None)
    qemu_img("snapshot", "-c", "s1", s, check=True)
    qemu_io(s, "write -P 0x88 0 64k")
    qemu_img("snapshot", "-c", "s2", s, check=True)
    base = mk("chain_base.qcow2", None)
    top = d / "chain_top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, check=True,
             cwd=d)
    qemu_io(top, "write -P 0x99 64k 64k", cwd=d)
    out["chain_top.qcow2"] = top
    return out


# ---------------------------------------------------------------- mutators

BOUNDARY64 = [0, 1, 0x200, 0x10000, 0x7FFFFFFFFFFFFFFF, 0x8000000000000000,
              0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFF0000, 1 << 40, 1 << 56, 1 << 62]
BOUNDARY32 = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 65536, 512]
HEADER_FIELDS = [  # (offset, size)
    (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4), (60, 4),
    (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4)]


def _u(data, off, fmt):
    """The field at off, or 0 where an earlier mutation cut the file shorter."""
    if off < 0 or off + struct.calcsize(fmt) > len(data):
        return 0
    return struct.unpack_from(fmt, data, off)[0]


def _p(data, off, fmt, v):
    if off + struct.calcsize(fmt) <= len(data):
        struct.pack_into(fmt, data, off, v & ((1 << (8 * struct.calcsize(fmt))) - 1))


def _geometry(data):
    cb = _u(data, 20, ">I")
    cs = 1 << cb if 9 <= cb <= 21 else 65536
    return dict(cs=cs, l1=_u(data, 40, ">Q"), l1_size=_u(data, 36, ">I"),
                rt=_u(data, 48, ">Q"), rt_clusters=_u(data, 56, ">I"),
                nb_snap=_u(data, 60, ">I"), snap=_u(data, 64, ">Q"))


def _meta_offsets(data, g):
    """Offsets of metadata clusters (for pointing entries at them and flipping bits in)."""
    offs = [0, g["l1"], g["rt"], g["snap"]]
    rt = g["rt"]
    for i in range(min(64, g["cs"] // 8)):
        if rt + 8 * i + 8 <= len(data):
            e = _u(data, rt + 8 * i, ">Q") & ~0x1FF
            if e:
                offs.append(e)
    l2s = []
    for i in range(min(g["l1_size"], 64)):
        if g["l1"] + 8 * i + 8 <= len(data):
            e = _u(data, g["l1"] + 8 * i, ">Q") & 0x00FFFFFFFFFFFE00
            if e:
                l2s.append(e)
    return [o for o in offs if o < len(data)], [o for o in l2s if o < len(data)]


def _value(rng, g, data):
    metas, l2s = _meta_offsets(data, g)
    choices = BOUNDARY64 + metas + l2s + [len(data), len(data) + g["cs"],
                                          (len(data) // g["cs"]) * g["cs"]]
    return rng.choice(choices)


def m_header_field(data, rng, g):
    off, size = rng.choice(HEADER_FIELDS)
    v = rng.choice(BOUNDARY64 if size == 8 else BOUNDARY32 + [rng.randrange(1 << 32)])
    if size == 8 and rng.random() < 0.4:
        v = _value(rng, g, data)
    _p(data, off, ">Q" if size == 8 else ">I", v)
    return "header[%d:%d]=%#x" % (off, off + size, v)


def m_ext_length(data, rng, g):
    pos = 104 if _u(data, 4, ">I") == 3 else 72
    if _u(data, 4, ">I") == 3:
        pos = _u(data, 100, ">I")
    exts = []
    while pos + 8 <= min(len(data), g["cs"]):
        t, n = _u(data, pos, ">I"), _u(data, pos + 4, ">I")
        exts.append(pos)
        if t == 0:
            break
        pos += 8 + ((n + 7) & ~7)
    if not exts:
        return m_header_field(data, rng, g)
    p = rng.choice(exts)
    v = rng.choice([0, 1, 7, 0xFFFFFFFF, 0x7FFFFFFF, g["cs"], g["cs"] - p, 48 * 1000])
    if rng.random() < 0.3:
        _p(data, p, ">I", rng.choice([0xE2792ACA, 0x6803F857, 0x0537BE77, 0x23852875,
                                      0x44415441, 0x4452]))
        return "extension@%d type changed" % p
    _p(data, p + 4, ">I", v)
    return "extension@%d length=%#x" % (p, v)


def _entry_mutation(data, rng, g, base, count, what):
    if not base or base >= len(data) or count <= 0:
        return m_header_field(data, rng, g)
    i = rng.randrange(max(1, min(count, g["cs"] // 8)))
    off = base + 8 * i
    if off + 8 > len(data):
        return m_header_field(data, rng, g)
    old = _u(data, off, ">Q")
    kind = rng.random()
    if kind < 0.5:
        v = _value(rng, g, data) | (old & (1 << 63))
    elif kind < 0.75:
        v = old | rng.choice([1, 1 << 9, 1 << 56, 1 << 62, 0x1FF])     # reserved bits
    else:
        v = old ^ (1 << rng.randrange(64))
    _p(data, off, ">Q", v)
    return "%s[%d] %#x -> %#x" % (what, i, old, v)


def m_l1_entry(data, rng, g):
    return _entry_mutation(data, rng, g, g["l1"], g["l1_size"], "L1")


def m_l2_entry(data, rng, g):
    _, l2s = _meta_offsets(data, g)
    if not l2s:
        return m_l1_entry(data, rng, g)
    base = rng.choice(l2s)
    return _entry_mutation(data, rng, g, base, g["cs"] // 8, "L2@%#x" % base)


def m_reftable_entry(data, rng, g):
    return _entry_mutation(data, rng, g, g["rt"], g["rt_clusters"] * g["cs"] // 8, "reftable")


def m_refblock(data, rng, g):
    metas, _ = _meta_offsets(data, g)
    rbs = metas[4:]
    if not rbs:
        return m_reftable_entry(data, rng, g)
    rb = rng.choice(rbs)
    i = rng.randrange(64)
    v = rng.choice([0, 1, 2, 0xFF, 0xFFFF])
    if rb + 2 * i + 2 <= len(data):
        _p(data, rb + 2 * i, ">H", v)
    return "refblock@%#x[%d]=%d" % (rb, i, v)


def m_snapshot_table(data, rng, g):
    r = rng.random()
    if r < 0.4 or not g["nb_snap"] or g["snap"] + 40 > len(data):
        v = rng.choice([0, 1, 2, 3, 5, 65536, 0xFFFFFFFF])
        _p(data, 60, ">I", v)
        return "nb_snapshots=%d" % v
    off = g["snap"] + rng.choice([0, 8, 12, 14, 16, 32, 36])   # l1 off/size, id/name sizes, extra
    size = {0: ">Q", 8: ">I", 12: ">H", 14: ">H", 16: ">I", 32: ">I", 36: ">I"}[off - g["snap"]]
    v = rng.choice([0, 1, 8, 0xFFFF, 0xFFFFFFFF, 1025, g["cs"], g["l1"], g["rt"], 1 << 40])
    _p(data, off, size, v)
    return "snapshot entry field +%d=%#x" % (off - g["snap"], v)


def m_truncate(data, rng, g):
    cs = g["cs"]
    points = sorted({o + d for o in [0, g["l1"], g["rt"], g["snap"]] + _meta_offsets(data, g)[0]
                     for d in (0, 8, cs) if 0 < o + d < len(data)} | {cs, 104, 72, 200})
    n = rng.choice(points) if points else len(data) // 2
    del data[n:]
    return "truncated at %d" % n


def m_bitflip(data, rng, g):
    metas, l2s = _meta_offsets(data, g)
    base = rng.choice(metas + l2s)
    out = []
    for _ in range(rng.randint(1, 4)):
        pos = base + rng.randrange(g["cs"] if base else 512)
        if pos < len(data):
            data[pos] ^= 1 << rng.randrange(8)
            out.append(pos)
    return "bit flips at %s" % out


def m_backing(data, rng, g):
    name = rng.choice([b"self.qcow2", b"nbd://127.0.0.1:1/x", b"json:{\"driver\":\"null-co\"}",
                       b"file:/etc/passwd", b"/dev/zero", b"../" * 40, b"\xff\xfe", b"x" * 1100])
    off = min(g["cs"], len(data)) - len(name) - 8
    if off < 120:
        return m_header_field(data, rng, g)
    data[off:off + len(name)] = name
    _p(data, 8, ">Q", off)
    _p(data, 16, ">I", len(name))
    return "backing name %r" % name[:40]


MUTATORS = [m_header_field, m_ext_length, m_l1_entry, m_l2_entry, m_reftable_entry, m_refblock,
            m_snapshot_table, m_truncate, m_bitflip, m_backing]


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    g = _geometry(buf)
    what = []
    for _ in range(1 if rng.random() < 0.7 else 2):
        what.append(rng.choice(MUTATORS)(buf, rng, g))
    return bytes(buf), "; ".join(what)


def make_mutant(base: Path, seed: int, dest: Path) -> str:
    """Write the mutant of base for seed at dest (companion files copied beside it)."""
    rng = random.Random("%s:%d" % (base.name, seed))
    data, what = mutate(base.read_bytes(), rng)
    dest.write_bytes(data)
    if base.name == "chain_top.qcow2":
        shutil.copy(base.parent / "chain_base.qcow2", dest.parent / "chain_base.qcow2")
    if b"self.qcow2" in data[:70000]:
        pass
    return what


# ---------------------------------------------------------------- runner (child side)

READ_ONLY = [
    ["info"], ["info", "--output=json"], ["check"], ["map", "--output=json"],
    ["convert", "-O", "raw", "@IMG", "@OUT"], ["snapshot", "-l"], ["io", "-r", "-c",
                                                                   "read 0 256k"],
    ["compare", "@IMG", "@IMG"],
]
MUTATING = [["check", "-r", "all"], ["io", "-c", "write -P 0xab 0 64k", "-c",
                                      "write -P 0xcd 300k 8k"], ["snapshot", "-c", "fz"]]


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _cli(args, cwd):
    try:
        p = subprocess.run([sys.executable, "-m", "qcow2engine", *map(str, args)], cwd=cwd,
                           capture_output=True, text=True, errors="replace", timeout=TIMEOUT,
                           preexec_fn=_limits, stdin=subprocess.DEVNULL,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
    except subprocess.TimeoutExpired:
        return None, "", "hang"
    return p.returncode, p.stdout, p.stderr


def _bad_output(rc, err):
    if rc is None:
        return "hang", "timeout"
    if "Traceback" in err or "internal error" in err:
        return "traceback", err.strip().splitlines()[-1][:200]
    if "MemoryError" in err or rc in (-9, -6, -11):
        return "memory", "rc=%s %s" % (rc, err.strip()[-200:])
    if rc not in (0, 2, 3) and err.strip().count("\n") > 0 and "qemu-img" not in err:
        return None
    return None


def _qcheck(path):
    r = qemu_img("check", "--output=json", path, timeout=60)
    try:
        d = json.loads(r.out) if r.out.strip() else {}
    except ValueError:
        d = {}
    return r.rc, d


def _corruptions(path):
    rc, d = _qcheck(path)
    if rc == 1 and not d:
        return None                     # qemu-img cannot open it
    return int(d.get("corruptions", 0)) + int(d.get("check-errors", 0))


def run_mutant(path: Path, workdir: Path, commands=None) -> list:
    """Every command on the mutant at path; the failures found."""
    fails = []
    path = Path(path)
    before = path.read_bytes()
    out = workdir / "out.raw"
    qout = workdir / "qout.raw"
    for argv in (READ_ONLY if commands is None else [c for c in READ_ONLY if c in commands]):
        args = [str(path) if a == "@IMG" else str(out) if a == "@OUT" else a for a in argv]
        if "@IMG" not in argv:
            args.append(str(path))
        if out.exists():
            out.unlink()
        rc, so, se = _cli(args, workdir)
        bad = _bad_output(rc, se)
        if bad:
            fails.append((bad[0], "%s: %s" % (" ".join(argv), bad[1])))
        if path.read_bytes() != before:
            fails.append(("changed", " ".join(argv)))
            path.write_bytes(before)
        if argv[0] == "convert" and rc == 0:
            q = qemu_img("convert", "-O", "raw", path, qout, timeout=60, cwd=workdir)
            if q.rc == 0 and qout.read_bytes() != out.read_bytes():
                fails.append(("differs", "convert -O raw output differs from qemu-img's"))
    qbefore = _corruptions(path)
    for argv in (MUTATING if commands is None else [c for c in MUTATING if c in commands]):
        cp = workdir / ("m_" + path.name)
        shutil.copy(path, cp)
        rc, so, se = _cli(list(argv) + [str(cp)], workdir)
        bad = _bad_output(rc, se)
        if bad:
            fails.append((bad[0], "%s: %s" % (" ".join(argv), bad[1])))
        if cp.stat().st_size > 1 << 30:         # wrote at a wild offset: never read it whole
            fails.append(("grew", "%s: the image grew to %d bytes" % (" ".join(argv),
                                                                     cp.stat().st_size)))
            cp.unlink()
            continue
        after = cp.read_bytes()
        if rc is not None and after != before:
            qafter = _corruptions(cp)
            if argv[1] == "-r":
                if rc == 0:
                    qrc, d = _qcheck(cp)
                    if qrc != 0 and d:
                        fails.append(("repair-unclean", "qemu-img check rc=%d %s"
                                      % (qrc, {k: d.get(k) for k in ("corruptions", "leaks")})))
            elif rc == 0 and qafter is not None and qbefore is not None and qafter > qbefore:
                fails.append(("new-corruption", "%s: %d -> %d" % (argv[0], qbefore, qafter)))
            elif rc != 0:
                diff = [i for i in range(min(len(before), len(after))) if before[i] != after[i]]
                if len(before) != len(after) or any(not 72 <= i < 80 for i in diff[:1000]):
                    if qafter is not None and qbefore is not None and qafter > qbefore:
                        fails.append(("new-corruption", "%s refused after writing: %d -> %d"
                                      % (argv[0], qbefore, qafter)))
        cp.unlink()
    return fails


def fuzz_one(base: Path, seed: int, workdir: Path) -> tuple[str, list]:
    workdir.mkdir(parents=True, exist_ok=True)
    dest = workdir / ("mut_" + base.name)
    what = make_mutant(base, seed, dest)
    try:
        return what, run_mutant(dest, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
