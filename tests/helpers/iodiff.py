"""Differential harness: the same guest I/O through qemu-io and through `qcow2engine io`.

A *variant* is a recipe (a list of qemu-img / qemu-io command lines, run in an empty
directory) that builds a starting image ``img.qcow2`` plus its backing / data files.  The
recipe is run once into a template directory; each *case* copies the template into two
directories ``A`` and ``B`` and runs one command sequence

    A:  qemu-io -f qcow2 -c CMD1 -c CMD2 ... img.qcow2
    B:  qcow2engine io -f qcow2 -c CMD1 -c CMD2 ... img.qcow2     (in-process by default)

(some cases split the commands over two invocations, so state must survive a reopen),
then checks, collecting every discrepancy before failing:

* ``qemu-img compare`` of A and B exits 0 (identical guest contents);
* ``qemu-img check --output=json`` on B exits 0 and reports no corruptions / leaks;
* ``qcow2engine check --output=json`` on B prints the same JSON with the same exit code;
* ``qemu-img info --output=json`` of A and B agree except for file sizes (dirty flag,
  snapshot table, feature bits, backing / data file names);
* for variants with an internal snapshot, ``qemu-img convert -l snapshot.name=s1 -O raw``
  gives the same bytes on A and B (writes must COW clusters shared with the snapshot);
* qemu-io and qcow2engine io exit with the same status and print the same lines (the
  timing lines "N bytes, 1 ops; ... sec (...)" are ignored);
* backing files are byte-for-byte unchanged.

Every tool runs with ``cwd`` set to the image's directory and relative file names, because
qemu 7.2 resolves a relative external data file name against the process' cwd.

On failure the message holds a shell script that replays the case by hand, and the case
directory is kept (on success it is deleted, to keep the disk usage small).

Environment knobs (harness self-test / debugging, not for CI):

* ``IODIFF_B=inproc`` (default) runs ``qcow2engine.cli.main.main(["io", ...])`` in-process;
  ``IODIFF_B=subprocess`` runs ``python -m qcow2engine io``; ``IODIFF_B=qemu-io`` runs
  qemu-io on B as well, which proves the harness (all checks but the engine's own
  ``check`` are then trivially satisfied).
* ``IODIFF_KEEP=1`` keeps the case directories of passing cases too.
"""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .engine import engine, engine_proc
from .files import file_sha256
from .qemu import CommandError, Result, guest_bytes, run

KiB = 1024
MiB = 1024 * KiB

IMG = "img.qcow2"

__all__ = ["KiB", "MiB", "IMG", "Variant", "VARIANTS", "VARIANTS_BY_NAME", "Template",
           "build_template", "gen_sequence", "run_case", "Cmd", "format_cmd"]


# --------------------------------------------------------------------------
# Variant recipes
# --------------------------------------------------------------------------

def _qimg_create(size: int | None, opts: str | None = None, backing: str | None = None,
                 backing_fmt: str | None = None, name: str = IMG, fmt: str = "qcow2"
                 ) -> list[str]:
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing:
        argv += ["-b", backing, "-F", backing_fmt or "qcow2"]
    if opts:
        argv += ["-o", opts]
    argv.append(name)
    if size is not None:
        argv.append(str(size))
    return argv


def _qio(*cmds: str, name: str = IMG, fmt: str = "qcow2") -> list[str]:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(name)
    return argv


def _al(x: int, g: int) -> int:
    return x // g * g


def _initial_data(size: int, cs: int, l2_cover: int, p: int = 0x50) -> list[str]:
    """Initial guest data so that the sequences meet allocated, zero and discarded clusters."""
    chunk = max(1, min(3 * cs, size // 8))
    cmds = [
        f"write -P {p + 1} 0 {chunk}",                              # aligned, from 0
        f"write -P {p + 2} {size // 4 + 123} {min(2 * cs, size // 8) + 1000}",  # unaligned
        f"write -z {_al(size * 3 // 8, cs)} {cs}",                  # zero, unallocated
        f"write -P {p + 3} {_al(size // 2, cs)} {2 * cs}",
        f"write -z {_al(size // 2, cs)} {cs}",                      # zero over data
        f"write -P {p + 4} {_al(size * 5 // 8, cs)} {2 * cs}",
        f"discard {_al(size * 5 // 8, cs)} {cs}",                   # discard over data
        f"write -P {p + 5} {size - 3000} 3000",                     # tail of the disk
    ]
    if l2_cover < size:                                             # across an L2 boundary
        cmds.append(f"write -P {p + 6} {l2_cover - cs - 100} {2 * cs + 200}")
    return cmds


@dataclass(frozen=True)
class Variant:
    """A starting image: ``setup`` argv lists are run in an empty directory and leave
    ``img.qcow2`` there (plus backing / data files, all in the same directory)."""
    name: str
    size: int
    cluster_size: int
    setup: tuple[tuple[str, ...], ...]
    extended_l2: bool = False
    backing_files: tuple[str, ...] = ()     # never written: verified unchanged afterwards
    backing_size: int = 0                   # guest bytes backed (for hot spots), 0 = none
    data_file: str | None = None            # external data file (copied, written)
    snapshot: str | None = None             # internal snapshot whose content must survive
    seeds: int = 15                         # number of random sequences in the test file
    ncmds: tuple[int, int] = (10, 30)       # commands per qemu-io invocation
    max_len: int = 0                        # cap of one request's length (0 = 4 clusters)

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // 32 if self.extended_l2 else self.cluster_size

    @property
    def l2_cover(self) -> int:
        """Guest bytes covered by one L2 table."""
        entry = 16 if self.extended_l2 else 8
        return self.cluster_size // entry * self.cluster_size

    def recipe(self) -> str:
        return "\n".join(shlex.join(a) for a in self.setup)

    def __repr__(self) -> str:
        return f"Variant({self.name})"


def _simple(name: str, size: int, cs: int, opts: str | None, *, extra: Sequence[str] = (),
            xl2: bool = False, **kw) -> Variant:
    cover = cs // (16 if xl2 else 8) * cs
    setup = [_qimg_create(size, opts), _qio(*_initial_data(size, cs, cover), *extra)]
    return Variant(name, size, cs, tuple(map(tuple, setup)), extended_l2=xl2, **kw)


def _refcount_variant(bits: int) -> Variant:
    return _simple(f"refcount{bits}-4k", 4 * MiB, 4 * KiB, f"cluster_size=4k,refcount_bits={bits}",
                   seeds=12)


def _zstd() -> Variant:
    size, cs = 8 * MiB, 64 * KiB
    setup = [
        _qimg_create(size, "compression_type=zstd"),
        # compressed writes need unallocated, cluster-aligned targets: do them first
        _qio("write -c -P 1 0 64k", "write -c -P 2 192k 128k",
             f"write -c -P 3 {size // 2 + 5 * cs} {cs}", f"write -c -P 4 {size - cs} {cs}"),
        _qio("write -P 0x21 1M 100000", "write -z 2M 64k", "write -P 0x22 3000000 70000"),
    ]
    return Variant("zstd-compressed", size, cs, tuple(map(tuple, setup)), seeds=15)


def _raw_backing(name: str, opts: str | None, *, xl2: bool = False, cs: int = 64 * KiB,
                 size: int = 8 * MiB, seeds: int = 15) -> Variant:
    setup = [
        _qimg_create(size, name="base.raw", fmt="raw"),
        _qio("write -P 0xa1 0 3M", "write -P 0xa2 3M 1M", f"write -P 0xa3 5M {3 * MiB}",
             "write -P 0xa4 1000000 77777", name="base.raw", fmt="raw"),   # 4M..5M: zeroes
        _qimg_create(size, opts, backing="base.raw", backing_fmt="raw"),
        _qio("write -P 0x31 0 64k", "write -P 0x32 200000 9000", "write -z 1M 128k",
             "write -P 0x33 6M 100k"),
    ]
    return Variant(name, size, cs, tuple(map(tuple, setup)), extended_l2=xl2,
                   backing_files=("base.raw",), backing_size=size, seeds=seeds)


def _qcow2_backing_short() -> Variant:
    """8 MiB overlay (64k clusters) over a 3 MiB + 1536 B qcow2 base (4k clusters): the
    overlay's cluster at 3 MiB straddles the end of the backing file."""
    size, bsize = 8 * MiB, 3 * MiB + 1536
    setup = [
        _qimg_create(bsize, "cluster_size=4k", name="base.qcow2"),
        _qio("write -P 0xb1 0 1M", "write -P 0xb2 1M 1M", "write -z 2M 256k",
             f"write -P 0xb3 {2 * MiB + 256 * KiB} {bsize - 2 * MiB - 256 * KiB}",
             name="base.qcow2"),
        _qimg_create(size, None, backing="base.qcow2", backing_fmt="qcow2"),
        _qio("write -P 0x41 64k 64k", "write -P 0x42 3000000 200000", "write -P 0x43 7M 5000"),
    ]
    return Variant("qcow2-backing-short", size, 64 * KiB, tuple(map(tuple, setup)),
                   backing_files=("base.qcow2",), backing_size=bsize, seeds=15)


def _xl2_backing() -> Variant:
    size, cs = 8 * MiB, 32 * KiB
    setup = [
        _qimg_create(size, None, name="base.qcow2"),
        _qio("write -P 0xc1 0 4M", "write -P 0xc2 5M 3M", name="base.qcow2"),
        _qimg_create(size, "extended_l2=on,cluster_size=32k", backing="base.qcow2",
                     backing_fmt="qcow2"),
        _qio("write -P 0x51 0 4k", "write -P 0x52 33k 3k", "write -z 64k 2k",
             "write -P 0x53 1M 64k", "discard 1M 32k", "write -P 0x54 4M 100000",
             "write -z -u 6M 96k"),
    ]
    return Variant("xl2-32k-backing", size, cs, tuple(map(tuple, setup)), extended_l2=True,
                   backing_files=("base.qcow2",), backing_size=size, seeds=18)


def _snapshot(name: str, cs: int, opts: str | None, size: int = 8 * MiB) -> Variant:
    cover = cs // 8 * cs
    setup = [
        _qimg_create(size, opts),
        _qio(*_initial_data(size, cs, cover)),
        ["qemu-img", "snapshot", "-c", "s1", IMG],
        # after the snapshot: some clusters are then private to the active layer
        _qio(f"write -P 0x61 {cs} {cs}", f"write -P 0x62 {size // 4} 1000",
             f"write -z {_al(size // 8, cs)} {cs}"),
    ]
    return Variant(name, size, cs, tuple(map(tuple, setup)), snapshot="s1", seeds=18)


def _data_file() -> Variant:
    size, cs = 8 * MiB, 64 * KiB
    setup = [_qimg_create(size, "data_file=img.data"),
             _qio(*_initial_data(size, cs, cs // 8 * cs))]
    return Variant("data-file", size, cs, tuple(map(tuple, setup)), data_file="img.data",
                   seeds=15)


VARIANTS: list[Variant] = [
    _simple("v3-64k", 8 * MiB, 64 * KiB, None, seeds=18),
    _simple("v2-compat010", 8 * MiB, 64 * KiB, "compat=0.10", seeds=18),
    # v2 + backing: qemu ignores discard there (no zero flag to hide the backing data)
    _raw_backing("v2-raw-backing", "compat=0.10", seeds=12),
    # virtual size not a multiple of the cluster size: a discard of the partial last
    # cluster only takes effect if the request reaches the end of the disk
    _simple("odd-size-64k", 8 * MiB + 12800, 64 * KiB, None, seeds=12),
    _simple("odd-size-xl2-16k", 4 * MiB + 2560, 16 * KiB, "extended_l2=on,cluster_size=16k",
            xl2=True, seeds=12),
    _simple("cluster-512", 4 * MiB, 512, "cluster_size=512", seeds=15, max_len=8 * KiB),
    _simple("cluster-4k", 8 * MiB, 4 * KiB, "cluster_size=4k", seeds=18),
    _simple("cluster-2M", 16 * MiB, 2 * MiB, "cluster_size=2M", seeds=8, ncmds=(8, 16),
            max_len=3 * MiB),
    *[_refcount_variant(b) for b in (1, 2, 8, 32, 64)],
    _simple("xl2-64k", 8 * MiB, 64 * KiB, "extended_l2=on", xl2=True, seeds=18),
    _simple("xl2-32k", 8 * MiB, 32 * KiB, "extended_l2=on,cluster_size=32k", xl2=True,
            seeds=15),
    _xl2_backing(),
    _simple("lazy-refcounts", 8 * MiB, 64 * KiB, "lazy_refcounts=on", seeds=15),
    _zstd(),
    _raw_backing("raw-backing", None),
    _qcow2_backing_short(),
    _snapshot("snapshot-64k", 64 * KiB, None),
    _snapshot("snapshot-4k", 4 * KiB, "cluster_size=4k"),
    _data_file(),
]
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}


# --------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------

@dataclass
class Template:
    variant: Variant
    dir: Path
    backing_digests: dict[str, str] = field(default_factory=dict)
    snapshot_raw: bytes | None = None


def _run(argv: Sequence[str], cwd: Path) -> Result:
    return run(*argv, check=False, cwd=cwd)


def build_template(v: Variant, d: Path) -> Template:
    """Run the variant's recipe in ``d`` (``python`` as argv[0] means this interpreter)."""
    d.mkdir(parents=True, exist_ok=True)
    for argv in v.setup:
        p = _run([sys.executable, *argv[1:]] if argv[0] == "python" else argv, d)
        out = p.stdout + p.stderr
        if p.returncode != 0 or "failed" in out:
            raise RuntimeError(f"template {v.name}: {shlex.join(argv)} -> rc {p.returncode}\n"
                               f"{out}")
    t = Template(v, d, {b: file_sha256(d / b) for b in v.backing_files})
    if v.snapshot:
        t.snapshot_raw = _snapshot_bytes(d, v.snapshot)
    return t


def _snapshot_bytes(d: Path, snap: str) -> bytes:
    return guest_bytes(IMG, snapshot=f"snapshot.name={snap}", cwd=d)


# --------------------------------------------------------------------------
# Command generation
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Cmd:
    op: str                      # write | zero | discard | read
    off: int
    length: int
    pattern: int | None = None   # write / read -P
    unmap: bool = False          # write -z -u


def _num(rng: random.Random | None, x: int) -> str:
    """Decimal, or (sometimes) qemu-io's k / M suffix when exact."""
    if rng is not None and x:
        r = rng.random()
        if x % MiB == 0 and r < 0.3:
            return f"{x // MiB}M"
        if x % KiB == 0 and r < 0.6:
            return f"{x // KiB}k"
    return str(x)


def _pat(rng: random.Random | None, p: int) -> str:
    if rng is not None and rng.random() < 0.5:
        return str(p)
    return f"0x{p:02x}"


def format_cmd(c: Cmd, rng: random.Random | None = None) -> str:
    off, ln = _num(rng, c.off), _num(rng, c.length)
    if c.op == "write":
        return f"write {off} {ln}" if c.pattern is None else \
            f"write -P {_pat(rng, c.pattern)} {off} {ln}"
    if c.op == "zero":
        return f"write -z {'-u ' if c.unmap else ''}{off} {ln}"
    if c.op == "discard":
        return f"discard {off} {ln}"
    if c.op == "read":
        return f"read {off} {ln}" if c.pattern is None else \
            f"read -P {_pat(rng, c.pattern)} {off} {ln}"
    raise ValueError(c.op)


def _hotspots(v: Variant) -> list[int]:
    cs, size = v.cluster_size, v.size
    spots = [0, cs, size // 4, size * 3 // 8, size // 2, size * 5 // 8, size - 1]
    cover = v.l2_cover
    spots += [k * cover for k in range(1, min(size // cover, 6) + 1) if k * cover < size]
    if v.backing_size:
        spots.append(v.backing_size)
    return spots


def gen_range(rng: random.Random, v: Variant) -> tuple[int, int]:
    """A request range inside the disk, mixing granularities and hot spots."""
    cs, sc, size = v.cluster_size, v.subcluster_size, v.size
    max_len = min(v.max_len or 4 * cs, size)
    g = rng.choice([cs, cs, sc, sc, 512, 1, 1] if v.extended_l2 else [cs, cs, 512, 1, 1])
    g = min(g, cs)
    # length
    shape = rng.random()
    if shape < 0.15:
        length = rng.randint(1, min(64, max_len))               # tiny
    elif shape < 0.55:
        length = rng.randint(1, min(cs, max_len))               # within about a cluster
    else:
        length = rng.randint(1, max_len)                        # several clusters
    if g > 1:
        length = max(g, _al(length + g - 1, g))
        length = min(length, _al(size, g) or size)
    # offset near a hot spot, or anywhere
    if rng.random() < 0.1:
        off = size - length                                     # ends at the end of disk
    else:
        if rng.random() < 0.7:
            base = rng.choice(_hotspots(v)) + rng.randint(-2 * cs, 2 * cs)
        else:
            base = rng.randrange(size)
        off = _al(min(max(base, 0), size - length), g)
    off = max(0, min(off, size - length))
    return off, length


def gen_sequence(rng: random.Random, v: Variant, n: int | None = None) -> list[str]:
    """n command strings in qemu-io syntax; every request lies inside the disk."""
    if n is None:
        n = rng.randint(*v.ncmds)
    history: list[Cmd] = []
    out: list[str] = []
    for _ in range(n):
        kind = rng.choices(["write", "zero", "discard", "read"], [50, 22, 16, 12])[0]
        if kind == "read" and history and rng.random() < 0.7:
            h = rng.choice(history)          # re-read an earlier request (may be overwritten)
            pat = 0 if h.op in ("zero", "discard") else (0xcd if h.pattern is None
                                                        else h.pattern)
            c = Cmd("read", h.off, h.length, pat)
        else:
            off, ln = gen_range(rng, v)
            if kind == "write":
                pat = None if rng.random() < 0.05 else rng.randrange(256)
                c = Cmd("write", off, ln, pat)
            elif kind == "zero":
                c = Cmd("zero", off, ln, unmap=rng.random() < 0.4)
            elif kind == "discard":
                c = Cmd("discard", off, ln)
            else:
                c = Cmd("read", off, ln, None if rng.random() < 0.3 else rng.randrange(256))
        if c.op != "read":
            history.append(c)
        out.append(format_cmd(c, rng))
    return out


# --------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------

_STATS = re.compile(r", \d+ ops; ")
_PREFIX = re.compile(r"^(qemu-io|qcow2engine|qcow2engine io): ")


def _norm(text: str) -> list[str]:
    return [_PREFIX.sub("", ln.rstrip()) for ln in text.splitlines()
            if ln.strip() and not _STATS.search(ln)]


def _io_argv(prog: Sequence[str], cmds: Sequence[str]) -> list[str]:
    argv = list(prog) + ["-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    return argv + [IMG]


def _engine(args: Sequence[str], cwd: Path, mode: str) -> tuple[int, str, str]:
    if mode == "subprocess":
        return engine_proc(*args, cwd=cwd)
    return engine(*args, cwd=cwd, catch_exit=True)      # argparse / sys.exit in a command


def _run_b(cmds: Sequence[str], cwd: Path, mode: str) -> tuple[int, str, str]:
    if mode == "qemu-io":
        p = _run(_io_argv(["qemu-io"], cmds), cwd)
        return p.returncode, p.stdout, p.stderr
    return _engine(_io_argv(["io"], cmds), cwd, mode)


def _copy_template(t: Template, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in t.dir.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)


def _info(d: Path) -> tuple[int, dict, str]:
    p = _run(["qemu-img", "info", "--output=json", IMG], d)
    try:
        doc = json.loads(p.stdout) if p.returncode == 0 else {}
    except ValueError:
        doc = {}
    for k in ("actual-size", "disk-size"):
        doc.pop(k, None)
    return p.returncode, doc, p.stderr


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def replay_script(t: Template, cmds, case_dir: Path | None = None,
                  b_template: Template | None = None) -> str:
    v = t.variant
    lines = [
        f"# variant {v.name}: build the starting image in an empty directory T",
        "mkdir T && cd T",
        *(shlex.join(a) for a in v.setup),
    ]
    if b_template is None:
        lines.append("cd .. && cp -r T A && cp -r T B")
    else:
        lines += [f"# B starts from variant {b_template.variant.name}, built in TB",
                  "cd .. && mkdir TB && cd TB",
                  *(shlex.join(a) for a in b_template.variant.setup),
                  "cd .. && cp -r T A && cp -r TB B"]
    lines.append("# copy A through qemu-io, copy B through qcow2engine")
    for batch in _batches(cmds):
        lines += [
            "(cd A && " + shlex.join(_io_argv(["qemu-io"], batch)) + ")",
            "(cd B && " + shlex.join(_io_argv(["python", "-m", "qcow2engine", "io"], batch))
            + ")",
        ]
    if v.data_file:
        lines.append("(cd A && " + shlex.join(["qemu-img", "compare", IMG, _json_b(v)]) + ")")
    else:
        lines.append(shlex.join(["qemu-img", "compare", f"A/{IMG}", f"B/{IMG}"]))
    lines += [
        f"(cd B && qemu-img check --output=json {IMG}; "
        f"python -m qcow2engine check --output=json {IMG})",
    ]
    if v.snapshot:
        lines.append(
            f"for d in A B; do (cd $d && qemu-img convert -l snapshot.name={v.snapshot} "
            f"-O raw {IMG} ../snap-$d.raw); done; cmp snap-A.raw snap-B.raw")
    text = "\n".join(lines)
    if case_dir is not None:
        text += f"\n# the case's directories are kept: A={case_dir}/A B={case_dir}/B " \
                f"T={t.dir}" + (f" TB={b_template.dir}" if b_template else "")
    return text


def _json_b(v: Variant) -> str:
    """B's image as seen from A's directory (an external data file name is resolved against
    the cwd by qemu 7.2, so it must be given explicitly)."""
    doc = {"driver": "qcow2", "file": {"driver": "file", "filename": f"../B/{IMG}"}}
    if v.data_file:
        doc["data-file"] = {"driver": "file", "filename": f"../B/{v.data_file}"}
    return "json:" + json.dumps(doc)


def _batches(cmds) -> list[list[str]]:
    """A flat list of command strings is one invocation; a list of lists is several."""
    cmds = list(cmds)
    if cmds and not isinstance(cmds[0], str):
        return [list(b) for b in cmds]
    return [cmds]


def run_case(t: Template, cmds: Sequence[str] | Sequence[Sequence[str]], case_dir: Path, *,
             b_template: Template | None = None, b_mode: str | None = None,
             keep: bool | None = None) -> None:
    """Run `cmds` on fresh copies A (qemu-io) and B (qcow2engine io) of the template (a list
    of lists: one qemu-io / qcow2engine io invocation per inner list) and
    assert everything listed in the module docstring.  Raises AssertionError with a replay
    script on failure.  With ``b_template`` B starts from that template instead (same
    guest contents expected, e.g. an image made by ``qcow2engine create``)."""
    v = t.variant
    tb = b_template or t
    batches = _batches(cmds)
    b_outputs: list[str] = []
    b_mode = b_mode or os.environ.get("IODIFF_B", "inproc")
    keep = bool(os.environ.get("IODIFF_KEEP")) if keep is None else keep
    a_dir, b_dir = case_dir / "A", case_dir / "B"
    if case_dir.exists():
        shutil.rmtree(case_dir)
    _copy_template(t, a_dir)
    _copy_template(tb, b_dir)
    problems: list[str] = []

    # --- the two writers, one invocation per batch (images reopened in between)
    for n, batch in enumerate(batches):
        tag = f"invocation {n + 1}/{len(batches)}: " if len(batches) > 1 else ""
        pa = _run(_io_argv(["qemu-io"], batch), a_dir)
        a_rc, a_out, a_err = pa.returncode, pa.stdout, pa.stderr
        bad = [ln for ln in (a_out + a_err).splitlines()
               if "failed:" in ln or "not found" in ln or "invalid" in ln.lower()]
        if bad:   # a harness bug: the generator must only produce commands qemu-io accepts
            raise RuntimeError("qemu-io rejected a generated command: %s\n%s"
                               % (bad, replay_script(t, batches, b_template=b_template)))
        try:
            b_rc, b_out, b_err = _run_b(batch, b_dir, b_mode)
        except Exception as e:                       # noqa: BLE001 - reported with the replay
            b_rc, b_out, b_err = None, "", "harness: %s: %s" % (type(e).__name__, e)
        b_outputs.append(b_out + b_err)
        if b_rc != a_rc:
            problems.append(f"{tag}exit status: qemu-io {a_rc}, qcow2engine io {b_rc}")
        na, nb = _norm(a_out), _norm(b_out)
        if na != nb:
            problems.append(f"{tag}stdout differs (timing lines ignored):\n" + _diff(na, nb))
        if _norm(a_err) != _norm(b_err):
            problems.append(f"{tag}stderr differs:\n" + _diff(_norm(a_err), _norm(b_err)))

    # --- guest contents
    if v.data_file:
        pc = _run(["qemu-img", "compare", IMG, _json_b(v)], a_dir)
    else:
        pc = _run(["qemu-img", "compare", f"A/{IMG}", f"B/{IMG}"], case_dir)
    if pc.returncode != 0:
        problems.append(f"qemu-img compare A B: rc {pc.returncode}: "
                        f"{(pc.stdout + pc.stderr).strip()}")

    # --- consistency of B, and our check agrees with qemu-img's
    pk = _run(["qemu-img", "check", "--output=json", IMG], b_dir)
    qdoc = _json(pk.stdout)
    if pk.returncode != 0 or not qdoc or any(
            qdoc.get(k) for k in ("corruptions", "leaks", "check-errors",
                                  "corruptions-fixed", "leaks-fixed")):
        problems.append(f"qemu-img check B: rc {pk.returncode}\n{pk.stdout}{pk.stderr}")
    e_rc, e_out, e_err = _engine(["check", "--output=json", IMG], b_dir,
                                 "subprocess" if b_mode == "subprocess" else "inproc")
    if e_rc != pk.returncode or _json(e_out) != qdoc:
        problems.append(f"qcow2engine check B disagrees with qemu-img check: "
                        f"rc {e_rc} vs {pk.returncode}\nours:\n{e_out}{e_err}\n"
                        f"qemu-img:\n{pk.stdout}{pk.stderr}")

    # --- header-level state (dirty flag, features, snapshot table, file names)
    ia, ib = _info(a_dir), _info(b_dir)
    if ia[:2] != ib[:2]:
        problems.append("qemu-img info differs (sizes ignored):\nA: %s\nB: %s"
                        % (json.dumps(ia[1], sort_keys=True) + ia[2],
                           json.dumps(ib[1], sort_keys=True) + ib[2]))

    # --- internal snapshot content survives the writes
    if v.snapshot:
        try:
            sa = _snapshot_bytes(a_dir, v.snapshot)
            sb = _snapshot_bytes(b_dir, v.snapshot)
        except CommandError as e:
            problems.append(str(e))
        else:
            if sa != t.snapshot_raw:
                problems.append("harness: qemu-io changed snapshot %s of A" % v.snapshot)
            if sb != sa:
                problems.append(f"snapshot {v.snapshot} content differs between A and B "
                                f"(first differing byte {_first_diff(sa, sb)})")

    # --- backing files untouched
    for name, digest in t.backing_digests.items():
        for d in (a_dir, b_dir):
            if (d / name).exists() and file_sha256(d / name) != digest:
                problems.append(f"backing file {d.name}/{name} was modified")

    if problems:
        ncmds = sum(map(len, batches))
        msg = [f"{len(problems)} problem(s) on variant {v.name} after {ncmds} commands "
               f"in {len(batches)} invocation(s):"]
        msg += ["- " + p for p in problems]
        msg += ["", "commands (python list):", repr(batches if len(batches) > 1 else batches[0]),
                "", "replay by hand:", replay_script(t, batches, case_dir, b_template)]
        for n, o in enumerate(b_outputs):
            if o:
                msg += ["", f"qcow2engine io output (invocation {n + 1}):", o[-4000:]]
        raise AssertionError("\n".join(msg))
    if not keep:
        shutil.rmtree(case_dir, ignore_errors=True)


def _first_diff(a: bytes, b: bytes) -> int | None:
    for i in range(0, max(len(a), len(b)), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            for j in range(i, i + 4096):
                if a[j:j + 1] != b[j:j + 1]:
                    return j
    return None


def _diff(a: list[str], b: list[str], limit: int = 40) -> str:
    import difflib
    d = list(difflib.unified_diff(a, b, "qemu-io", "qcow2engine io", lineterm="", n=1))
    if len(d) > limit:
        d = d[:limit] + [f"... ({len(d) - limit} more diff lines)"]
    return "\n".join(d)

