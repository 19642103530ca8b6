"""Do the two tools' outputs agree?

A verifier is made by one of the functions below and called, after the timed runs,
as ``verify(qemu_outputs, engine_outputs, qemu_img)`` on the outputs the warm-up runs
kept (``compare.RunOutputs``); it returns None when they agree, else a short message
for the table's ``outputs`` column.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import image_check
from .runner import MiB

if TYPE_CHECKING:
    from .compare import RunOutputs


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
            proc = image_check(qemu_img, pb)
            if proc.returncode != 0:
                return f"engine {{{ph}}} not clean (check exit {proc.returncode})"
        return None
    verify.__doc__ = "qemu-img compare + check of " + ", ".join(placeholders)
    return verify

