"""Reporting: the one table printer, number formats, the machine description, and
the results table of ``python -m benchmarks.run``.

``format_table`` prints every table of the benchmark scripts: aligned text (columns
two spaces apart, a dashed line under the header, each column left- or
right-aligned) or Markdown; ``markdown_header``/``markdown_row`` are its Markdown
lines for scripts that print a row as soon as it is measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Sequence

from .compare import WorkloadResult
from .runner import MiB


def markdown_row(cells: Sequence[str]) -> str:
    """``| a | b |``; an empty cell is ``| |``."""
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def markdown_header(headers: Sequence[str]) -> str:
    return markdown_row(headers) + "\n" + "|" + "|".join("---" for _ in headers) + "|"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                 markdown: bool = False, align: str = "") -> str:
    """The table as text or (``markdown``) Markdown.

    ``align``: one letter per column, ``l`` or ``r`` (text only); columns it does
    not name are left-aligned.  Markdown cells have ``|`` escaped.
    """
    if markdown:
        def esc(c: str) -> str:
            return c.replace("|", "\\|")
        return "\n".join([markdown_header(headers)]
                         + [markdown_row([esc(c) for c in r]) for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if align[i:i + 1] == "r" else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def tool_version(binary: str) -> str:
    """First line of ``BINARY --version``."""
    try:
        return subprocess.run([binary, "--version"], capture_output=True,
                              text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


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
    qv = tool_version(qemu_img)
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


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}"


def fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


# --------------------------------------------------------------------------
# The results of benchmarks.run
# --------------------------------------------------------------------------

# "qemu" is qemu-img, or qemu-io for the write-* workloads (see --list).
HEADERS = ["workload", "qemu s", "engine s", "ratio", "target", "result",
           "qemu RSS MiB", "engine RSS MiB", "outputs"]


def table_rows(results: list[WorkloadResult]) -> list[list[str]]:
    rows = []
    for r in results:
        q, e = r.stats["qemu-img"], r.stats["engine"]
        n = len(e.times)
        e_cell = e.error or fmt_s(e.median)
        if e.error and e.times:
            e_cell = f"{fmt_s(e.median)} then {e.error}"
        if not e.error and n and n != len(q.times):
            e_cell += f" (n={n})"
        q_cell = q.error or fmt_s(q.median)
        rows.append([
            r.workload.name,
            r.error or q_cell,
            e_cell,
            "-" if r.ratio is None else f"{r.ratio:.2f}",
            r.workload.target.describe(),
            r.verdict(),
            fmt_mib(q.peak_rss_mib),
            fmt_mib(e.peak_rss_mib),
            r.verify or "-",
        ])
    return rows


NOISY_SPREAD = 1.5


def noise_notes(results: list[WorkloadResult]) -> list[str]:
    """One line per workload whose run times varied by more than 50%."""
    notes = []
    for r in results:
        label = {"qemu-img": r.workload.tool}
        parts = [f"{label.get(t, t)} {fmt_s(min(s.times))}-{fmt_s(max(s.times))} s"
                 for t, s in r.stats.items() if s.spread > NOISY_SPREAD]
        if parts:
            notes.append(f"{r.workload.name}: noisy timings ({', '.join(parts)})")
    return notes


def format_results(results: list[WorkloadResult], info: dict[str, str], profile: str,
                   repeat: int, rss_method: str, markdown: bool = False) -> str:
    """What ``benchmarks.run`` prints on stdout: a headline, the table, the notes."""
    rows = table_rows(results)
    notes = noise_notes(results)
    if markdown:
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
            format_table(HEADERS, rows, markdown=True),
        ]
        if notes:
            out += [""] + [f"- {n}" for n in notes]
        return "\n".join(out)
    out = [f"# {info['date']}; {info['cpu']}, {info['cores']} cores, "
           f"{info['ram']}; {info['qemu-img']}; {profile} profile, "
           f"median of {repeat}; CPU {info['cpu busy']} busy before the run",
           format_table(HEADERS, rows)]
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def results_json(results: list[WorkloadResult], info: dict[str, str], profile: str,
                 repeat: int, rss_method: str) -> str:
    """The raw results (all times) as JSON (``benchmarks.run --json``)."""
    return json.dumps({
        "machine": info, "profile": profile, "repeat": repeat,
        "rss_method": rss_method,
        "results": [{
            "workload": r.workload.name,
            "target": r.workload.target.describe(),
            "verdict": r.verdict(), "ratio": r.ratio, "outputs": r.verify,
            "error": r.error, "build_seconds": r.build_seconds,
            **{t: {"times": s.times, "median": s.median,
                   "rss_mib": [k / 1024 for k in s.rss_kib],
                   "peak_rss_mib": s.peak_rss_mib, "error": s.error}
               for t, s in r.stats.items()},
        } for r in results]}, indent=2)
