"""Benchmark qcow2engine against qemu-img / qemu-io on the same images.

Usage (from the repository root)::

    python -m benchmarks.run [--quick] [--only NAME ...] [--repeat N]
                             [--workdir DIR] [--markdown] [--list] ...

For every workload the harness

1. builds its input images, cached in ``WORKDIR/<profile>/<artifact>/``
   (profile is ``full`` or ``quick``) and rebuilt only when missing, when
   their build parameters changed, or with ``--rebuild``;
2. runs the reference command (``qemu-img ...``, or ``qemu-io ...`` for the
   ``write-*`` workloads) and the equivalent ``qcow2engine`` command
   (``python -m qcow2engine`` with the same arguments; ``qcow2engine io`` for
   qemu-io) once each, untimed, so both read their input from the page cache,
   and keeps their outputs for the correctness check;
3. runs them alternately (qemu, engine, qemu, engine, ...) N times,
   measuring wall time and peak RSS of each process, deleting output files
   before (and after) every run so both tools always write fresh files;
4. compares the outputs of the two tools (parsed JSON for check/map/info,
   byte contents for convert, ``qemu-img compare`` + ``qemu-img check`` for
   the written images) and prints a table: medians, ratio engine/qemu, the
   target and whether it is met.

Workloads that modify an image (the qemu-io ``write-*`` ones) have a
``prepare`` hook: before every run (warm-up and timed), untimed, it puts a
fresh copy of the starting image in place (``cp --sparse=always`` of a cached
template) and the harness syncs, so each run of either tool starts from the
same bytes and only the command itself is timed.  Their qemu-io command
scripts (``-c`` arguments) are generated per profile and, should the argument
list get long, split into several invocations run back to back inside one
timed measurement, identically for both tools (see ``IO_ARGV_BYTES``).

A failing or timed-out command never aborts the run: it is reported in the
table as ``error: ...`` / ``timeout``.  The harness does not import anything
from qcow2engine; it only runs its command line.

Workloads are entries of ``WORKLOADS`` (and their inputs entries of
``ARTIFACTS``); add new ones there.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = "/var/tmp/qcow2engine-bench"
GNU_TIME = "/usr/bin/time"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Building input images (artifacts)
# --------------------------------------------------------------------------

def _run_checked(argv: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()}")


def _qemu_io(qemu_img: str) -> str:
    """qemu-io next to the given qemu-img, else from PATH."""
    sibling = Path(qemu_img).with_name("qemu-io")
    return str(sibling) if sibling.is_absolute() and os.access(sibling, os.X_OK) \
        else "qemu-io"


def build_prealloc_metadata(d: Path, p: dict, qemu_img: str) -> None:
    """Empty image with all L2 tables and refcounts preallocated."""
    _run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                  "preallocation=metadata", "img.qcow2", str(p["size"])], cwd=d)


def build_scattered(d: Path, p: dict, qemu_img: str) -> None:
    """qcow2 with ``data`` bytes of random data in randomly chosen clusters.

    A sparse raw file is written with os.pwrite (holes elsewhere), then
    converted with ``qemu-img convert -O qcow2 -o cluster_size=...``.
    """
    import numpy as np

    bs = p["cluster_size"]
    nblocks = p["size"] // bs
    ndata = p["data"] // bs
    rng = np.random.default_rng(p["seed"])
    pos = np.sort(rng.choice(nblocks, size=ndata, replace=False))
    raw = d / "src.raw"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, p["size"])
        batch = 16384
        for b0 in range(0, ndata, batch):
            bpos = pos[b0:b0 + batch]
            n = len(bpos)
            # Random, hence incompressible and (practically) never zero.
            data = rng.integers(0, 256, n * bs, dtype=np.uint8)
            mv = memoryview(data).cast("B")
            # write runs of consecutive blocks with one pwrite each
            breaks = np.flatnonzero(np.diff(bpos) != 1) + 1
            starts = np.concatenate(([0], breaks))
            ends = np.concatenate((breaks, [n]))
            for i, j in zip(starts.tolist(), ends.tolist()):
                os.pwrite(fd, mv[i * bs:j * bs], int(bpos[i]) * bs)
    finally:
        os.close(fd)
    _run_checked([qemu_img, "convert", "-f", "raw", "-O", "qcow2", "-o",
                  f"cluster_size={bs}", str(raw), "img.qcow2"], cwd=d)
    raw.unlink()


def _text_chunk(np, rng, vocab, table, nbytes: int):
    """``nbytes`` of space-separated pseudo words (8-byte padded tokens)."""
    idx = table[rng.integers(0, len(table), nbytes // 8)]
    return vocab[idx]


def build_compressed(d: Path, p: dict, qemu_img: str) -> None:
    """zlib-compressed qcow2 made from ~3:1 compressible pseudo text."""
    import numpy as np

    rng = np.random.default_rng(p["seed"])
    nvocab = 16384
    lens = rng.integers(2, 8, nvocab)
    words = np.full((nvocab, 8), ord(" "), np.uint8)
    letters = rng.integers(ord("a"), ord("z") + 1, (nvocab, 8), dtype=np.uint8)
    mask = np.arange(8)[None, :] < lens[:, None]
    words[mask] = letters[mask]
    vocab = words.view(np.uint64).ravel()
    # Zipf-like word frequencies via a lookup table (fast sampling).
    weights = 1.0 / np.arange(1, nvocab + 1)
    counts = np.maximum(1, np.round(weights / weights.sum() * (1 << 20)))
    table = np.repeat(np.arange(nvocab), counts.astype(np.int64))

    raw = d / "src.raw"
    chunk = 64 * MiB
    with open(raw, "wb") as f:
        left = p["size"]
        while left > 0:
            n = min(chunk, left)
            f.write(_text_chunk(np, rng, vocab, table, n).tobytes())
            left -= n
    _run_checked([qemu_img, "convert", "-c", "-f", "raw", "-O", "qcow2",
                  str(raw), "img.qcow2"], cwd=d)
    raw.unlink()
    real = (d / "img.qcow2").stat().st_size
    log(f"    compressed {p['size'] / MiB:.0f} MiB -> {real / MiB:.0f} MiB "
        f"({p['size'] / real:.2f}:1)")


def build_small(d: Path, p: dict, qemu_img: str) -> None:
    """Small image with a little data, some zero clusters."""
    _run_checked([qemu_img, "create", "-q", "-f", "qcow2", "img.qcow2",
                  str(p["size"])], cwd=d)
    _run_checked([_qemu_io(qemu_img), "-f", "qcow2",
                  "-c", "write -q -P 0x11 0 4M",
                  "-c", "write -q -P 0x22 256M 1M",
                  "-c", "write -q -z 512M 1M",
                  "img.qcow2"], cwd=d)


def build_empty(d: Path, p: dict, qemu_img: str) -> None:
    """Empty qcow2 (the starting image of the sequential write workloads)."""
    _run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                  f"cluster_size={p['cluster_size']}", "img.qcow2",
                  str(p["size"])], cwd=d)


def build_backing(d: Path, p: dict, qemu_img: str) -> None:
    """A qcow2 base full of data and two empty overlays on it.

    ``base.qcow2`` (default 64 KiB clusters) is written whole with
    ``qemu-io -c 'write -P 0x5a 0 SIZE'``.  ``overlay.qcow2`` and
    ``overlay-extl2.qcow2`` (``extended_l2=on``) have the given cluster size
    and name the base by its absolute path, so copies of them placed anywhere
    (by the workloads' prepare step) still find it.
    """
    size = str(p["size"])
    base = (d / "base.qcow2").resolve()
    _run_checked([qemu_img, "create", "-q", "-f", "qcow2", str(base), size])
    _run_checked([_qemu_io(qemu_img), "-f", "qcow2", "-c",
                  f"write -q -P 0x5a 0 {size}", str(base)])
    cs = p["cluster_size"]
    for name, extra in (("overlay.qcow2", ""),
                        ("overlay-extl2.qcow2", ",extended_l2=on")):
        _run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                      f"cluster_size={cs}{extra}", "-b", str(base),
                      "-F", "qcow2", name, size], cwd=d)


def build_commit_chain(d: Path, p: dict, qemu_img: str) -> None:
    """A 1 GiB qcow2 base full of data and an overlay with ``overlay_data`` bytes of
    other data written over it (in 1 MiB stripes spread over the disk)."""
    size = p["size"]
    base = (d / "base.qcow2").resolve()
    _run_checked([qemu_img, "create", "-q", "-f", "qcow2", str(base), str(size)])
    _run_checked([_qemu_io(qemu_img), "-f", "qcow2", "-c",
                  f"write -q -P 0x5a 0 {size}", str(base)])
    _run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                  "overlay.qcow2", str(size)], cwd=d)
    stripe = 1 * MiB
    n = p["overlay_data"] // stripe
    step = size // n
    cmds = []
    for i in range(n):
        cmds += ["-c", f"write -q -P {i % 250 + 3} {i * step} {stripe}"]
    _run_checked([_qemu_io(qemu_img), "-f", "qcow2", *cmds, "overlay.qcow2"], cwd=d)


def copy_chain(outbase: str = "outbase", out: str = "out"):
    """Prepare hook: fresh copies of the base and the overlay, the overlay re-pointed at
    the copied base (so the timed command never touches the cached artifact)."""
    def prepare(inputs: dict[str, Path], outputs: dict[str, Path], qemu_img: str) -> None:
        _run_checked(["cp", "--sparse=always", str(inputs["base"]), str(outputs[outbase])])
        _run_checked(["cp", "--sparse=always", str(inputs["overlay"]), str(outputs[out])])
        _run_checked([qemu_img, "rebase", "-u", "-b", str(outputs[outbase]), "-F", "qcow2",
                      str(outputs[out])])
    prepare.__doc__ = "copy base and overlay"
    return prepare


def chain_equal(*placeholders: str):
    """Verifier: for each placeholder, qemu-img compare of the two results exits 0 and
    qemu-img check of the engine's result is clean."""
    def verify(q: "RunOutputs", e: "RunOutputs", qemu_img: str) -> str | None:
        for ph in placeholders:
            pa, pb = q.files[ph], e.files[ph]
            proc = subprocess.run([qemu_img, "compare", str(pa), str(pb)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                return f"mismatch on {{{ph}}}: {proc.stdout.strip()[:60]}"
            proc = subprocess.run([qemu_img, "check", str(pb)], capture_output=True, text=True)
            if proc.returncode != 0:
                return f"engine {{{ph}}} not clean (check exit {proc.returncode})"
        return None
    verify.__doc__ = "qemu-img compare + check of " + ", ".join(placeholders)
    return verify


def build_chain(d: Path, p: dict, qemu_img: str) -> None:
    """``depth`` images: a base and depth-1 overlays, each with a bit of data.

    Backing file names are stored relative (bare file names).  The top of
    the chain is ``img.qcow2``.
    """
    depth = p["depth"]
    names = [f"layer-{i:03d}.qcow2" for i in range(depth - 1)] + ["img.qcow2"]
    _run_checked([qemu_img, "create", "-q", "-f", "qcow2", names[0],
                  str(p["size"])], cwd=d)
    for i in range(1, depth):
        _run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-b",
                      names[i - 1], "-F", "qcow2", names[i]], cwd=d)
    for i, name in enumerate(names):
        _run_checked([_qemu_io(qemu_img), "-f", "qcow2", "-c",
                      f"write -q -P {i % 255 + 1} {i * 64}k 64k", name], cwd=d)


@dataclass(frozen=True)
class Artifact:
    """Input images for one or more workloads.

    ``params`` maps a profile name ("full"/"quick") to the build parameters;
    ``files`` maps placeholder names (used as ``{name}`` in workload argv)
    to file names inside the artifact's directory.  Bump ``version`` when the
    build function changes so cached copies are rebuilt.
    """
    name: str
    build: Callable[[Path, dict, str], None]
    params: dict[str, dict]
    files: dict[str, str] = field(default_factory=lambda: {"img": "img.qcow2"})
    version: int = 1


ARTIFACTS: dict[str, Artifact] = {a.name: a for a in [
    Artifact("prealloc-metadata", build_prealloc_metadata, {
        "full": {"size": 1 * TiB},
        "quick": {"size": 256 * GiB},
    }),
    Artifact("scattered-4k", build_scattered, {
        "full": {"size": 4 * GiB, "data": 1 * GiB, "cluster_size": 4096,
                 "seed": 1},
        "quick": {"size": 1 * GiB, "data": 256 * MiB, "cluster_size": 4096,
                  "seed": 1},
    }),
    Artifact("compressed-zlib", build_compressed, {
        "full": {"size": 1 * GiB, "seed": 2},
        "quick": {"size": 256 * MiB, "seed": 2},
    }),
    Artifact("small", build_small, {
        "full": {"size": 1 * GiB},
        "quick": {"size": 1 * GiB},
    }),
    Artifact("chain-64", build_chain, {
        "full": {"depth": 64, "size": 1 * GiB},
        "quick": {"depth": 64, "size": 1 * GiB},
    }),
    Artifact("empty-64k", build_empty, {
        "full": {"size": 2 * GiB, "cluster_size": 64 * KiB},
        "quick": {"size": 512 * MiB, "cluster_size": 64 * KiB},
    }),
    Artifact("backing-data", build_backing, {
        "full": {"size": 1 * GiB, "cluster_size": 64 * KiB},
        "quick": {"size": 256 * MiB, "cluster_size": 64 * KiB},
    }, files={"base": "base.qcow2", "overlay": "overlay.qcow2",
              "overlay_extl2": "overlay-extl2.qcow2"}),
    Artifact("commit-chain", build_commit_chain, {
        "full": {"size": 1 * GiB, "overlay_data": 768 * MiB},
        "quick": {"size": 256 * MiB, "overlay_data": 192 * MiB},
    }, files={"base": "base.qcow2", "overlay": "overlay.qcow2"}),
]}


def ensure_artifact(art: Artifact, profile: str, root: Path, qemu_img: str,
                    rebuild: bool = False) -> tuple[dict[str, Path], float]:
    """Build ``art`` unless a matching cached copy exists.

    Returns (placeholder -> absolute path, build seconds or 0.0 if cached).
    """
    d = root / profile / art.name
    stamp_path = d / ".built.json"
    want = {"version": art.version, "params": art.params[profile]}
    files = {k: d / v for k, v in art.files.items()}
    if not rebuild and stamp_path.exists():
        try:
            have = json.loads(stamp_path.read_text())
        except ValueError:
            have = None
        if have == want and all(f.exists() for f in files.values()):
            return files, 0.0
    log(f"  building {profile}/{art.name} {art.params[profile]} ...")
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    art.build(d, art.params[profile], qemu_img)
    dt = time.perf_counter() - t0
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise RuntimeError(f"artifact {art.name}: build did not create {missing}")
    stamp_path.write_text(json.dumps(want))
    log(f"  built {profile}/{art.name} in {dt:.1f} s")
    return files, dt


# --------------------------------------------------------------------------
# Correctness checks
# --------------------------------------------------------------------------

def _strip_keys(obj: Any, ignore: frozenset[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_keys(v, ignore) for k, v in obj.items()
                if k not in ignore}
    if isinstance(obj, list):
        return [_strip_keys(v, ignore) for v in obj]
    return obj


def _first_diff(a: Any, b: Any, path: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{path or '.'}: {_short(a)} vs {_short(b)}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                return f"{path}.{k}: missing in qemu-img output"
            if k not in b:
                return f"{path}.{k}: missing in engine output"
            r = _first_diff(a[k], b[k], f"{path}.{k}")
            if r:
                return r
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            r = _first_diff(x, y, f"{path}[{i}]")
            if r:
                return r
        if len(a) != len(b):
            return f"{path or '.'}: length {len(a)} vs {len(b)}"
        return None
    if a != b:
        return f"{path or '.'}: {_short(a)} vs {_short(b)}"
    return None


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


# Keys whose values legitimately differ between tools / runs.
DEFAULT_JSON_IGNORE = frozenset({"filename", "full-backing-filename",
                                 "actual-size"})


def json_equal(ignore: frozenset[str] = DEFAULT_JSON_IGNORE):
    """Verifier: stdout of both tools equal as parsed JSON (minus ``ignore``).

    A verifier is called as ``verify(qemu_outputs, engine_outputs, qemu_img)``
    and returns None when the outputs agree, else a short message.
    """
    def verify(q: "RunOutputs", e: "RunOutputs", qemu_img: str) -> str | None:
        try:
            a = json.loads(q.stdout.read_bytes())
        except ValueError as exc:
            return f"qemu-img output is not JSON ({exc})"
        try:
            b = json.loads(e.stdout.read_bytes())
        except ValueError as exc:
            return f"engine output is not JSON ({exc})"
        diff = _first_diff(_strip_keys(a, ignore), _strip_keys(b, ignore))
        return None if diff is None else f"mismatch {diff}"
    verify.__doc__ = "JSON equal"
    return verify


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Data extents per SEEK_DATA/SEEK_HOLE (whole file if unsupported)."""
    out = []
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
    except (OSError, AttributeError):
        return [(0, size)] if size else []
    return out


def files_equal(placeholder: str = "out"):
    """Verifier: the two output files have identical contents.

    Sparse-aware: only ranges that hold data in at least one of the files
    are read; holes in both are zeros in both.
    """
    def verify(q: "RunOutputs", e: "RunOutputs", qemu_img: str) -> str | None:
        pa, pb = q.files[placeholder], e.files[placeholder]
        if not pa.exists():
            return "qemu-img output missing"
        if not pb.exists():
            return "engine output missing"
        sa, sb = pa.stat().st_size, pb.stat().st_size
        if sa != sb:
            return f"mismatch: size {sa} vs {sb}"
        fa = os.open(pa, os.O_RDONLY)
        fb = os.open(pb, os.O_RDONLY)
        try:
            ext = sorted(_data_extents(fa, sa) + _data_extents(fb, sb))
            merged: list[list[int]] = []
            for s, t in ext:
                if merged and s <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], t)
                else:
                    merged.append([s, t])
            chunk = 8 * MiB
            for s, t in merged:
                off = s
                while off < t:
                    n = min(chunk, t - off)
                    a = os.pread(fa, n, off)
                    b = os.pread(fb, n, off)
                    if a != b:
                        i = next((k for k in range(min(len(a), len(b)))
                                  if a[k] != b[k]), min(len(a), len(b)))
                        return f"mismatch: contents differ at offset {off + i}"
                    off += n
        finally:
            os.close(fa)
            os.close(fb)
        return None
    verify.__doc__ = "files equal"
    return verify


def _io_report_lines(path: Path) -> list[str]:
    """qemu-io's per-command lines minus the timing ones ("... ops; ...")."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln and " ops; " not in ln]


def images_equal(placeholder: str = "out"):
    """Verifier for written images: ``qemu-img compare`` of the two results
    exits 0, ``qemu-img check`` finds nothing wrong in the engine's, and both
    tools reported the same per-command lines ("wrote N/N bytes at offset X").
    """
    def verify(q: "RunOutputs", e: "RunOutputs", qemu_img: str) -> str | None:
        pa, pb = q.files[placeholder], e.files[placeholder]
        if not pa.exists():
            return "qemu output missing"
        if not pb.exists():
            return "engine output missing"
        la, lb = _io_report_lines(q.stdout), _io_report_lines(e.stdout)
        if la != lb:
            i = next((k for k, (x, y) in enumerate(zip(la, lb)) if x != y),
                     min(len(la), len(lb)))
            x = la[i] if i < len(la) else "<end>"
            y = lb[i] if i < len(lb) else "<end>"
            return f"mismatch: report line {i + 1}: {x!r} vs {y!r}"[:90]
        proc = subprocess.run([qemu_img, "compare", "-f", "qcow2", "-F", "qcow2",
                               str(pa), str(pb)], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            msg = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
            return (f"mismatch: qemu-img compare exit {proc.returncode}: "
                    f"{msg[0] if msg else ''}")[:90]
        proc = subprocess.run([qemu_img, "check", "--output=json", "-f", "qcow2",
                               str(pb)], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        try:
            rep = json.loads(proc.stdout)
        except ValueError:
            rep = {}
        bad = {k: rep.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
        if proc.returncode != 0 or any(bad.values()):
            return (f"engine image not clean: qemu-img check exit {proc.returncode}"
                    + "".join(f", {k} {v}" for k, v in bad.items() if v))[:90]
        return None
    verify.__doc__ = "qemu-img compare + check"
    return verify


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    kind: str            # "ratio": engine/qemu-img <= value; "seconds": engine <= value
    value: float
    rss_mib: float | None = None   # optional cap on the engine's peak RSS

    def describe(self) -> str:
        if self.kind == "ratio" and self.value == float("inf"):
            s = "report only"
        else:
            s = (f"<= {self.value:.2f}x" if self.kind == "ratio"
                 else f"<= {self.value:g} s")
        if self.rss_mib is not None:
            s += f", RSS <= {self.rss_mib:g} MiB"
        return s


# In a workload's args: replaced by ``-c CMD`` for each command of its
# ``io_script`` (see Workload).
IO_COMMANDS = "{io_commands}"

# Longest -c argument list (bytes, "-c" and NULs included) given to one
# invocation.  Linux allows ARG_MAX (usually 2 MiB, argv + environment) in
# total and 128 KiB per single argument; longer scripts are split into
# several invocations, at the same places for both tools.
IO_ARGV_BYTES = 256 * KiB

# Reference program of a workload -> engine subcommand doing the same.
ENGINE_SUBCOMMAND = {"qemu-img": (), "qemu-io": ("io",)}


@dataclass(frozen=True)
class Workload:
    """One benchmark.

    ``args`` are the arguments of the reference program ``tool`` (qemu-img
    or qemu-io; without the program name), with ``{placeholder}`` for
    artifact files and ``{out}`` (etc., see ``outputs``) for per-tool output
    files.  The engine gets the same arguments (after ``io`` for qemu-io)
    unless ``engine_args`` is given.  stdout of each command goes to a file
    that ``verify`` can read.

    ``prepare(inputs, outputs, qemu_img)`` (optional) runs, untimed, before
    every run of either tool, after the run's output files were deleted;
    ``inputs`` maps the artifact's placeholders and ``outputs`` the run's
    output placeholders to paths.  It typically copies a starting image to
    ``{out}`` for a command that modifies it in place.

    ``io_script(params)`` (optional) returns a list of qemu-io commands for
    the profile's ``params`` (the artifact's build parameters updated with
    the workload's own ``params``); the ``IO_COMMANDS`` entry of ``args`` becomes
    ``-c CMD`` for each (split over several invocations if the argument list
    would exceed ``IO_ARGV_BYTES``).
    """
    name: str
    description: str
    artifact: str
    args: tuple[str, ...]
    target: Target
    verify: Optional[Callable[["RunOutputs", "RunOutputs", str], Optional[str]]] = None
    engine_args: Optional[tuple[str, ...]] = None
    outputs: tuple[str, ...] = ()          # placeholders naming output files
    ok_returncodes: tuple[int, ...] = (0,)
    tool: str = "qemu-img"                 # reference program: qemu-img | qemu-io
    prepare: Optional[Callable[[dict[str, Path], dict[str, Path], str], None]] = None
    io_script: Optional[Callable[[dict], list[str]]] = None
    params: dict[str, dict] = field(default_factory=dict)   # per profile


def copy_image(src: str, dst: str = "out"):
    """Prepare hook: ``cp --sparse=always`` artifact file ``{src}`` to ``{dst}``."""
    def prepare(inputs: dict[str, Path], outputs: dict[str, Path],
                qemu_img: str) -> None:
        _run_checked(["cp", "--sparse=always", str(inputs[src]),
                      str(outputs[dst])])
    prepare.__doc__ = f"copy {{{src}}} to {{{dst}}}"
    return prepare


def _qsize(n: int) -> str:
    """A byte count in qemu-io's notation (1G, 1M, 4k, or plain bytes)."""
    for suffix, unit in (("G", GiB), ("M", MiB), ("k", KiB)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def seq_write_script(p: dict) -> list[str]:
    """``length`` bytes from offset 0 in requests of ``request`` bytes."""
    req = p["request"]
    return [f"write -P {p['pattern']:#04x} {_qsize(off)} {_qsize(min(req, p['length'] - off))}"
            for off in range(0, p["length"], req)]


def random_write_script(p: dict) -> list[str]:
    """``count`` writes of ``request`` bytes at random ``request``-aligned
    offsets below ``size`` (the artifact's disk size; offsets may repeat), each with a random pattern byte
    1..255, from ``random.Random(seed)``."""
    import random
    rng = random.Random(p["seed"])
    req = p["request"]
    out = []
    for _ in range(p["count"]):
        off = rng.randrange(p["size"] // req) * req
        out.append(f"write -P {rng.randrange(1, 256):#04x} {off} {_qsize(req)}")
    return out


def split_io_commands(cmds: list[str], limit: int | None = None) -> list[list[str]]:
    """Cut a command list into chunks of at most ``limit`` (default
    ``IO_ARGV_BYTES``) argv bytes."""
    limit = IO_ARGV_BYTES if limit is None else limit
    chunks: list[list[str]] = [[]]
    used = 0
    for c in cmds:
        n = len("-c") + 1 + len(c.encode()) + 1
        if chunks[-1] and used + n > limit:
            chunks.append([])
            used = 0
        chunks[-1].append(c)
        used += n
    return chunks


WORKLOADS: list[Workload] = [
    Workload("check-1t-prealloc",
             "check of a 1 TiB preallocation=metadata image (16.7M clusters)",
             "prealloc-metadata",
             ("check", "--output=json", "{img}"),
             Target("ratio", 1.0, rss_mib=200), json_equal()),
    Workload("map-4g-scattered",
             "map --output=json, 4 GiB image, 1 GiB data in scattered 4 KiB "
             "clusters",
             "scattered-4k",
             ("map", "--output=json", "{img}"),
             Target("ratio", 1.0), json_equal()),
    Workload("convert-raw-scattered",
             "convert -O raw of the scattered 4 KiB-cluster image",
             "scattered-4k",
             ("convert", "-O", "raw", "{img}", "{out}"),
             Target("ratio", 1.0), files_equal("out"), outputs=("out",)),
    Workload("convert-raw-zlib",
             "convert -O raw of a zlib-compressed image (1 GiB, ~3:1)",
             "compressed-zlib",
             ("convert", "-O", "raw", "{img}", "{out}"),
             Target("ratio", 1.0), files_equal("out"), outputs=("out",)),
    Workload("info-small",
             "info --output=json of a small image (process wall time)",
             "small",
             ("info", "--output=json", "{img}"),
             Target("seconds", 0.15), json_equal()),
    Workload("info-chain-64",
             "info --output=json --backing-chain of a 64-deep chain",
             "chain-64",
             ("info", "--output=json", "--backing-chain", "{img}"),
             Target("seconds", 0.15), json_equal()),
    # qemu-io write workloads: {out} is a fresh copy of the starting image
    # for every run (prepare hook), written in place by the timed command.
    Workload("write-seq-1g",
             "qemu-io write -P 0xab 0 1G (one request) into an empty 2 GiB "
             "image, 64 KiB clusters",
             "empty-64k",
             ("-f", "qcow2", IO_COMMANDS, "{out}"),
             Target("ratio", 1.0), images_equal("out"), outputs=("out",),
             tool="qemu-io", prepare=copy_image("img"),
             io_script=seq_write_script,
             params={"full": {"length": 1 * GiB, "request": 1 * GiB,
                              "pattern": 0xab},
                     "quick": {"length": 256 * MiB, "request": 256 * MiB,
                               "pattern": 0xab}}),
    Workload("write-seq-1g-1m",
             "the same 1 GiB as 1024 requests of 1 MiB (-c each), one "
             "invocation",
             "empty-64k",
             ("-f", "qcow2", IO_COMMANDS, "{out}"),
             Target("ratio", 1.0), images_equal("out"), outputs=("out",),
             tool="qemu-io", prepare=copy_image("img"),
             io_script=seq_write_script,
             params={"full": {"length": 1 * GiB, "request": 1 * MiB,
                              "pattern": 0xab},
                     "quick": {"length": 256 * MiB, "request": 1 * MiB,
                               "pattern": 0xab}}),
    Workload("write-rand-4k-backing",
             "2000 random 4 KiB writes (seeded, -c each) into an empty "
             "1 GiB overlay (64 KiB clusters, COW) of a full 1 GiB base",
             "backing-data",
             ("-f", "qcow2", IO_COMMANDS, "{out}"),
             Target("ratio", float("inf")), images_equal("out"),
             outputs=("out",), tool="qemu-io", prepare=copy_image("overlay"),
             io_script=random_write_script,
             params={"full": {"count": 2000, "request": 4 * KiB, "seed": 4},
                     "quick": {"count": 500, "request": 4 * KiB, "seed": 4}}),
    Workload("write-rand-4k-extl2",
             "the same random writes, overlay with extended_l2=on "
             "(subcluster COW)",
             "backing-data",
             ("-f", "qcow2", IO_COMMANDS, "{out}"),
             Target("ratio", float("inf")), images_equal("out"),
             outputs=("out",), tool="qemu-io",
             prepare=copy_image("overlay_extl2"),
             io_script=random_write_script,
             params={"full": {"count": 2000, "request": 4 * KiB, "seed": 4},
                     "quick": {"count": 500, "request": 4 * KiB, "seed": 4}}),
    # chain operations: each run works on fresh copies of the base and the overlay
    Workload("commit-768m",
             "commit of a 768 MiB overlay into its 1 GiB base",
             "commit-chain",
             ("commit", "-q", "{out}"),
             Target("ratio", 1.0), chain_equal("outbase", "out"),
             outputs=("out", "outbase"), prepare=copy_chain()),
    Workload("rebase-flatten-1g",
             "safe rebase onto nothing (-b \"\") of the same overlay",
             "commit-chain",
             ("rebase", "-b", "", "{out}"),
             Target("ratio", 1.0), chain_equal("out"),
             outputs=("out", "outbase"), prepare=copy_chain()),
    Workload("convert-qcow2-scattered",
             "convert -O qcow2 of the scattered 4 KiB-cluster image",
             "scattered-4k",
             ("convert", "-O", "qcow2", "{img}", "{out}"),
             Target("ratio", 1.0), chain_equal("out"), outputs=("out",)),
    Workload("convert-qcow2-compress",
             "convert -O qcow2 -c (zlib) of the compressible 1 GiB image",
             "compressed-zlib",
             ("convert", "-O", "qcow2", "-c", "{img}", "{out}"),
             Target("ratio", 1.0), chain_equal("out"), outputs=("out",)),
]


# --------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------

@dataclass
class RunResult:
    seconds: float
    rss_kib: int | None
    returncode: int | None
    error: str | None        # None when the command succeeded


@dataclass
class RunOutputs:
    stdout: Path
    files: dict[str, Path]


def _noop() -> None:
    pass


def _first_stderr_line(path: Path, argv0: str = "", start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    # A Python traceback's first line says nothing; its last line does.
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    # "/usr/bin/python3: No module named ..." -> "No module named ..."
    for prefix in {argv0, os.path.basename(argv0)} - {""}:
        if line.startswith(prefix + ": "):
            line = line[len(prefix) + 2:]
            break
    return line


class Runner:
    def __init__(self, use_gnu_time: bool, env: dict[str, str], cwd: Path):
        self.use_gnu_time = use_gnu_time
        self.env = env
        self.cwd = cwd
        self.rss_method = ("/usr/bin/time -f %M" if use_gnu_time
                           else "os.wait4 ru_maxrss (includes harness RSS at fork)")

    def run(self, argvs: list[list[str]], stdout: Path, timeout: float,
            ok_returncodes: tuple[int, ...] = (0,)) -> RunResult:
        """Run the invocations ``argvs`` one after the other (usually one).

        Returns their summed wall time (process start to reaped) and the
        largest peak RSS; stops at the first failing one.  stdout/stderr of
        all go to ``stdout`` and ``stdout.with_suffix(".stderr")``;
        ``timeout`` applies to the sequence as a whole.
        """
        stderr = stdout.with_suffix(".stderr")
        total = 0.0
        peak: int | None = None
        rc: int | None = None
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            for argv in argvs:
                r = self._run_one(argv, out, err, stdout.with_suffix(".rss"),
                                  stderr, timeout - total, ok_returncodes)
                total += r.seconds
                rc = r.returncode
                if r.rss_kib is not None:
                    peak = r.rss_kib if peak is None else max(peak, r.rss_kib)
                if r.error:
                    if r.error.startswith("timeout"):
                        r.error = f"timeout after {timeout:g} s"
                    return RunResult(total, peak, rc, r.error)
        return RunResult(total, peak, rc, None)

    def _run_one(self, argv: list[str], out, err, rss_file: Path,
                 stderr: Path, timeout: float,
                 ok_returncodes: tuple[int, ...]) -> RunResult:
        full = argv
        if self.use_gnu_time:
            rss_file.unlink(missing_ok=True)
            full = [GNU_TIME, "-f", "%M", "-o", str(rss_file), "--"] + argv
        timed_out = threading.Event()
        out.flush()
        err.flush()
        err_pos = err.tell()
        kwargs: dict[str, Any] = {}
        if not self.use_gnu_time:
            # Force fork() instead of vfork(): a vfork child's ru_maxrss
            # inherits the harness's high-water RSS.
            kwargs["preexec_fn"] = _noop
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(full, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, cwd=self.cwd,
                                    env=self.env, start_new_session=True,
                                    **kwargs)
        except OSError as exc:
            return RunResult(0.0, None, None, f"error: {exc}")

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        timer = threading.Timer(max(timeout, 0.0), kill)
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            t1 = time.perf_counter()
            timer.cancel()
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc           # already reaped; keep Popen quiet
        rss: int | None = ru.ru_maxrss
        if self.use_gnu_time:
            rss = None
            try:
                lines = rss_file.read_text().split()
                rss = int(lines[-1]) if lines else None
            except (OSError, ValueError):
                pass
        error = None
        if timed_out.is_set():
            error = f"timeout after {timeout:g} s"
        elif rc not in ok_returncodes:
            msg = _first_stderr_line(stderr, argv[0], err_pos)
            if self.use_gnu_time and rc == 127 and not msg:
                msg = "command not found"
            error = f"error: {msg or f'exit status {rc}'}"
            if len(error) > 70:
                error = error[:67] + "..."
        return RunResult(t1 - t0, rss, rc, error)


# --------------------------------------------------------------------------
# Benchmark loop
# --------------------------------------------------------------------------

TOOLS = ("qemu-img", "engine")


@dataclass
class ToolStats:
    times: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def spread(self) -> float:
        """max/min of the timed runs (1.0 = perfectly steady)."""
        if not self.times or min(self.times) <= 0:
            return 1.0
        return max(self.times) / min(self.times)

    @property
    def peak_rss_mib(self) -> float | None:
        return max(self.rss_kib) / 1024 if self.rss_kib else None


@dataclass
class WorkloadResult:
    workload: Workload
    stats: dict[str, ToolStats]
    verify: str | None = None     # "ok", "mismatch ...", "n/a (...)"
    build_seconds: float = 0.0
    error: str | None = None      # harness-level problem (e.g. build failed)

    @property
    def ratio(self) -> float | None:
        q, e = self.stats["qemu-img"].median, self.stats["engine"].median
        if q is None or e is None or q <= 0:
            return None
        return e / q

    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        e = self.stats["engine"]
        if e.error or e.median is None:
            return "FAIL (engine error)"
        t = self.workload.target
        reasons = []
        if t.kind == "ratio":
            if self.ratio is None:
                return "n/a (no qemu-img time)"
            if self.ratio > t.value:
                reasons.append("time")
        elif e.median > t.value:
            reasons.append("time")
        if t.rss_mib is not None and (e.peak_rss_mib is None
                                      or e.peak_rss_mib > t.rss_mib):
            reasons.append("rss")
        if self.verify and self.verify != "ok" and not self.verify.startswith("n/a"):
            reasons.append("mismatch")
        return "PASS" if not reasons else f"FAIL ({', '.join(reasons)})"


def run_workload(w: Workload, files: dict[str, Path], runner: Runner,
                 run_dir: Path, qemu_img: str, engine_cmd: list[str],
                 repeat: int, timeout: float, budget: float,
                 params: dict | None = None) -> WorkloadResult:
    """``params``: the artifact's build parameters for the profile updated
    with the workload's (input of ``w.io_script``)."""
    stats = {t: ToolStats() for t in TOOLS}
    reference = [qemu_img] if w.tool == "qemu-img" else [_qemu_io(qemu_img)]
    prefix = {"qemu-img": reference,
              "engine": engine_cmd + list(ENGINE_SUBCOMMAND[w.tool])}
    label = {"qemu-img": w.tool, "engine": "engine"}
    chunks = (split_io_commands(w.io_script(params or {}))
              if w.io_script else [[]])
    if len(chunks) > 1:
        log(f"    {sum(map(len, chunks))} commands in {len(chunks)} "
            "invocations per run")

    def paths(tool: str, tag: str) -> RunOutputs:
        outs = {o: run_dir / f"{w.name}.{tool}.{tag}.{o}" for o in w.outputs}
        return RunOutputs(run_dir / f"{w.name}.{tool}.{tag}.stdout", outs)

    def argv(tool: str, ro: RunOutputs) -> list[list[str]]:
        """The invocations of one run (one unless the io script is split)."""
        subst = {k: str(v) for k, v in files.items()}
        subst.update({k: str(v) for k, v in ro.files.items()})
        args = w.engine_args if (tool == "engine" and w.engine_args) else w.args
        out = []
        for chunk in chunks:
            a: list[str] = []
            for x in args:
                if x == IO_COMMANDS:
                    for c in chunk:
                        a += ["-c", c]
                else:
                    a.append(x.format(**subst))
            out.append(prefix[tool] + a)
        return out

    def clean(ro: RunOutputs) -> None:
        for p in ro.files.values():
            p.unlink(missing_ok=True)

    def prepare(ro: RunOutputs) -> str | None:
        """Untimed set-up of one run; returns an error message or None."""
        clean(ro)
        if w.prepare is None:
            return None
        try:
            w.prepare(files, ro.files, qemu_img)
        except Exception as exc:  # noqa: BLE001 - report, don't crash
            return f"error: prepare: {exc}"[:70]
        os.sync()   # the copy's writeback must not land in the timed run
        return None

    os.sync()
    # Untimed warm-up; its outputs are kept for the correctness check.
    warm = {t: paths(t, "warmup") for t in TOOLS}
    for tool in TOOLS:
        err = prepare(warm[tool])
        if err:
            stats[tool].error = err
            log(f"    warm-up {label[tool]:8s} {err}")
            continue
        r = runner.run(argv(tool, warm[tool]), warm[tool].stdout, timeout,
                       w.ok_returncodes)
        log(f"    warm-up {label[tool]:8s} {r.seconds:8.3f} s"
            + (f"  {r.error}" if r.error else ""))
        if r.error:
            stats[tool].error = r.error
    if w.outputs:
        os.sync()   # flush the kept outputs now, not during timed runs

    timed = {t: paths(t, "timed") for t in TOOLS}
    spent = {t: 0.0 for t in TOOLS}
    for i in range(repeat):
        for tool in TOOLS:
            st = stats[tool]
            if st.error or (st.times and spent[tool] > budget):
                continue
            err = prepare(timed[tool])
            if err:
                st.error = err
                log(f"    run {i + 1} {label[tool]:8s} {err}")
                continue
            r = runner.run(argv(tool, timed[tool]), timed[tool].stdout,
                           timeout, w.ok_returncodes)
            clean(timed[tool])      # deleting drops the dirty pages unwritten
            spent[tool] += r.seconds
            if r.error:
                st.error = r.error
                log(f"    run {i + 1} {label[tool]:8s} {r.error}")
                continue
            st.times.append(r.seconds)
            if r.rss_kib is not None:
                st.rss_kib.append(r.rss_kib)
            log(f"    run {i + 1} {label[tool]:8s} {r.seconds:8.3f} s  "
                f"{(r.rss_kib or 0) / 1024:7.1f} MiB")

    res = WorkloadResult(w, stats)
    if w.verify is None:
        res.verify = "n/a"
    elif stats["qemu-img"].error:
        res.verify = f"n/a ({w.tool} failed)"
    elif stats["engine"].error:
        res.verify = "n/a (engine failed)"
    else:
        try:
            res.verify = (w.verify(warm["qemu-img"], warm["engine"], qemu_img)
                          or "ok")
        except Exception as exc:  # noqa: BLE001 - report, don't crash
            res.verify = f"verify error: {exc}"
    for tool in TOOLS:
        clean(warm[tool])
    return res


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def cpu_busy(sample: float = 1.0) -> str:
    """Share of CPU time not idle over ``sample`` seconds (other load)."""
    def snap() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(f), f[3] + (f[4] if len(f) > 4 else 0)
    try:
        t0, i0 = snap()
        time.sleep(sample)
        t1, i1 = snap()
        return f"{100 * (1 - (i1 - i0) / max(1, t1 - t0)):.0f}%"
    except (OSError, ValueError, IndexError):
        return "unknown"


def machine_info(workdir: Path, qemu_img: str) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / MiB:.1f} GiB"
                break
    except (OSError, ValueError):
        pass
    fs = "unknown"
    try:
        best = ""
        wd = str(workdir.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if (wd == mnt or wd.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fs = mnt, parts[2]
    except (OSError, IndexError):
        pass
    try:
        qv = subprocess.run([qemu_img, "--version"], capture_output=True,
                            text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        qv = "unknown"
    return {
        "cpu busy": cpu_busy(),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu-img": qv,
        "workdir fs": fs,
    }


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}"


def _fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


# "qemu" is qemu-img, or qemu-io for the write-* workloads (see --list).
HEADERS = ["workload", "qemu s", "engine s", "ratio", "target", "result",
           "qemu RSS MiB", "engine RSS MiB", "outputs"]


def table_rows(results: list[WorkloadResult]) -> list[list[str]]:
    rows = []
    for r in results:
        q, e = r.stats["qemu-img"], r.stats["engine"]
        n = len(e.times)
        e_cell = e.error or _fmt_s(e.median)
        if e.error and e.times:
            e_cell = f"{_fmt_s(e.median)} then {e.error}"
        if not e.error and n and n != len(q.times):
            e_cell += f" (n={n})"
        q_cell = q.error or _fmt_s(q.median)
        rows.append([
            r.workload.name,
            r.error or q_cell,
            e_cell,
            "-" if r.ratio is None else f"{r.ratio:.2f}",
            r.workload.target.describe(),
            r.verdict(),
            _fmt_mib(q.peak_rss_mib),
            _fmt_mib(e.peak_rss_mib),
            r.verify or "-",
        ])
    return rows


NOISY_SPREAD = 1.5


def noise_notes(results: list[WorkloadResult]) -> list[str]:
    """One line per workload whose run times varied by more than 50%."""
    notes = []
    for r in results:
        label = {"qemu-img": r.workload.tool}
        parts = [f"{label.get(t, t)} {_fmt_s(min(s.times))}-{_fmt_s(max(s.times))} s"
                 for t, s in r.stats.items() if s.spread > NOISY_SPREAD]
        if parts:
            notes.append(f"{r.workload.name}: noisy timings ({', '.join(parts)})")
    return notes


def format_text(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(HEADERS)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(HEADERS), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_markdown(rows: list[list[str]], info: dict[str, str],
                    profile: str, repeat: int, rss_method: str,
                    notes: list[str] = ()) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")
    out = [
        f"Benchmarks ({profile} profile, median of {repeat} alternating runs "
        f"after one warm-up run each; peak RSS via {rss_method}), "
        f"{info['date']}:",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, "
        f"Linux {info['kernel']}, work dir on {info['workdir fs']}, "
        f"CPU {info['cpu busy']} busy before the run",
        f"- {info['qemu-img']}; Python {info['python']}",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [w.name for w in WORKLOADS]
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark qcow2engine against qemu-img.",
        epilog="workloads: " + ", ".join(names))
    ap.add_argument("--quick", action="store_true",
                    help="smaller workloads, 3 repetitions, shorter timeout")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="run only these workloads (exact names or prefixes)")
    ap.add_argument("--repeat", type=int, metavar="N",
                    help="timed repetitions per tool (default 5, --quick 3)")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR,
                    help=f"where images are built and cached (default {DEFAULT_WORKDIR})")
    ap.add_argument("--markdown", action="store_true",
                    help="print the table as Markdown with date and machine")
    ap.add_argument("--json", metavar="FILE",
                    help="also write raw results (all times) as JSON")
    ap.add_argument("--rebuild", action="store_true",
                    help="rebuild the workloads' images even if cached")
    ap.add_argument("--timeout", type=float, metavar="SEC",
                    help="kill a command after SEC seconds (default 120, --quick 30)")
    ap.add_argument("--budget", type=float, metavar="SEC",
                    help="stop repeating a tool on a workload once its timed "
                         "runs took SEC seconds in total (default 60, --quick 10)")
    ap.add_argument("--qemu-img", default="qemu-img", metavar="PATH",
                    help="qemu-img binary (default: qemu-img from PATH)")
    ap.add_argument("--engine-cmd", metavar="CMD",
                    help="engine command line prefix, shell-quoted (default: "
                         f"'{sys.executable} -m qcow2engine')")
    ap.add_argument("--no-gnu-time", action="store_true",
                    help="measure RSS with os.wait4 even if /usr/bin/time exists")
    ap.add_argument("--strict", action="store_true",
                    help="exit with status 1 unless every workload passes")
    ap.add_argument("--list", action="store_true",
                    help="list the workloads and exit")
    args = ap.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.only:
        chosen = []
        for pat in args.only:
            match = [n for n in names if n == pat] or \
                    [n for n in names if n.startswith(pat)]
            if not match:
                ap.error(f"unknown workload {pat!r}; choose from {', '.join(names)}")
            chosen += [m for m in match if m not in chosen]
        args.only = chosen
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for w in WORKLOADS:
            print(f"{w.name:24s} {w.tool:8s} target {w.target.describe():28s} "
                  f"{w.description}")
        return 0

    profile = "quick" if args.quick else "full"
    repeat = args.repeat or (3 if args.quick else 5)
    timeout = args.timeout or (30.0 if args.quick else 120.0)
    budget = args.budget or (10.0 if args.quick else 60.0)
    workdir = Path(args.workdir).resolve()
    qemu_img = shutil.which(args.qemu_img) or args.qemu_img
    engine_cmd = (shlex.split(args.engine_cmd) if args.engine_cmd
                  else [sys.executable, "-m", "qcow2engine"])
    selected = [w for w in WORKLOADS if not args.only or w.name in args.only]

    if shutil.which(args.qemu_img) is None:
        log(f"qemu-img not found ({args.qemu_img}); install qemu-utils")
        return 2
    run_dir = workdir / profile / "_run"
    run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    need = (1.5 if args.quick else 5) * GiB
    if free < need:
        log(f"warning: only {free / GiB:.1f} GiB free in {workdir}; "
            f"about {need / GiB:.0f} GiB may be needed")

    use_time = (not args.no_gnu_time and os.access(GNU_TIME, os.X_OK))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    runner = Runner(use_time, env, run_dir)
    info = machine_info(workdir, qemu_img)
    if info["cpu busy"] != "unknown" and float(info["cpu busy"][:-1]) > 20:
        log(f"warning: CPU already {info['cpu busy']} busy; other processes "
            "will disturb the timings")
    log(f"qcow2engine benchmarks: profile {profile}, {repeat} runs, "
        f"workdir {workdir}, RSS via {runner.rss_method}")

    # Build every needed artifact first, so timing runs back to back.
    built: dict[str, tuple[dict[str, Path] | None, float, str | None]] = {}
    t_build = time.perf_counter()
    for w in selected:
        if w.artifact in built:
            continue
        try:
            files, dt = ensure_artifact(ARTIFACTS[w.artifact], profile,
                                        workdir, qemu_img, args.rebuild)
            built[w.artifact] = (files, dt, None)
        except Exception as exc:  # noqa: BLE001 - report, don't crash
            log(f"  build of {w.artifact} failed: {exc}")
            built[w.artifact] = (None, 0.0, f"build failed: {exc}"[:90])
    os.sync()   # don't let the builds' writeback disturb the timings
    log(f"workloads ready in {time.perf_counter() - t_build:.1f} s")

    results: list[WorkloadResult] = []
    t_run = time.perf_counter()
    for w in selected:
        files, dt, err = built[w.artifact]
        log(f"  {w.name}: {w.description}")
        if files is None:
            res = WorkloadResult(w, {t: ToolStats() for t in TOOLS}, error=err)
        else:
            art = ARTIFACTS[w.artifact]
            params = {**art.params[profile], **w.params.get(profile, {})}
            res = run_workload(w, files, runner, run_dir, qemu_img, engine_cmd,
                               repeat, timeout, budget, params)
            res.build_seconds = dt
        log(f"    -> {res.verdict()}; outputs: {res.verify}")
        results.append(res)
    log(f"benchmarks ran in {time.perf_counter() - t_run:.1f} s")

    rows = table_rows(results)
    if args.markdown:
        print(format_markdown(rows, info, profile, repeat, runner.rss_method,
                              noise_notes(results)))
    else:
        print(f"# {info['date']}; {info['cpu']}, {info['cores']} cores, "
              f"{info['ram']}; {info['qemu-img']}; {profile} profile, "
              f"median of {repeat}; CPU {info['cpu busy']} busy before the run")
        print(format_text(rows))
        for n in noise_notes(results):
            print(f"note: {n}")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": info, "profile": profile, "repeat": repeat,
            "rss_method": runner.rss_method,
            "results": [{
                "workload": r.workload.name,
                "target": r.workload.target.describe(),
                "verdict": r.verdict(), "ratio": r.ratio, "outputs": r.verify,
                "error": r.error, "build_seconds": r.build_seconds,
                **{t: {"times": s.times, "median": s.median,
                       "rss_mib": [k / 1024 for k in s.rss_kib],
                       "peak_rss_mib": s.peak_rss_mib, "error": s.error}
                   for t, s in r.stats.items()},
            } for r in results]}, indent=2))

    if args.strict and any(r.verdict() != "PASS" for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
