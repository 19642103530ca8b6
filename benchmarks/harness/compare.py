"""Side by side: the reference tool and the engine on the same workload.

A ``Workload`` names the reference command (``qemu-img ...`` or ``qemu-io ...``), the
engine runs the same arguments (``python -m qcow2engine [io] ...``); ``run_workload``
gives each tool one untimed warm-up run (its outputs are kept for the correctness
check), then alternating timed runs through ``runner.repeat_alternating``;
``WorkloadResult`` holds the samples, the ratio engine/qemu and the verdict against the
workload's ``Target``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .artifacts import qemu_io_for
from .runner import KiB, WARMUP, Runner, RunResult, Samples, log, repeat_alternating


def engine_ratio(engine: float | None, qemu: float | None) -> float | None:
    """engine / qemu (below 1 the engine is faster); None without both times."""
    if qemu is None or engine is None or qemu <= 0:
        return None
    return engine / qemu


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


@dataclass
class RunOutputs:
    stdout: Path
    files: dict[str, Path]


TOOLS = ("qemu-img", "engine")


@dataclass
class WorkloadResult:
    workload: Workload
    stats: dict[str, Samples]
    verify: str | None = None     # "ok", "mismatch ...", "n/a (...)"
    build_seconds: float = 0.0
    error: str | None = None      # harness-level problem (e.g. build failed)

    @property
    def ratio(self) -> float | None:
        return engine_ratio(self.stats["engine"].median, self.stats["qemu-img"].median)

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
    reference = [qemu_img] if w.tool == "qemu-img" else [qemu_io_for(qemu_img)]
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

    # The warm-up run's outputs are kept for the correctness check; the
    # timed runs' are deleted after each run.
    warm = {t: paths(t, "warmup") for t in TOOLS}
    timed = {t: paths(t, "timed") for t in TOOLS}

    def once(tool: str, i: int) -> RunResult:
        ro = warm[tool] if i == WARMUP else timed[tool]
        what = "warm-up" if i == WARMUP else f"run {i + 1}"
        err = prepare(ro)
        if err:
            log(f"    {what} {label[tool]:8s} {err}")
            return RunResult(0.0, None, None, err)
        r = runner.run(argv(tool, ro), ro.stdout, timeout, w.ok_returncodes)
        if i == WARMUP:
            log(f"    warm-up {label[tool]:8s} {r.seconds:8.3f} s"
                + (f"  {r.error}" if r.error else ""))
            return r
        clean(ro)      # deleting drops the dirty pages unwritten
        if r.error:
            log(f"    {what} {label[tool]:8s} {r.error}")
        else:
            log(f"    {what} {label[tool]:8s} {r.seconds:8.3f} s  "
                f"{(r.rss_kib or 0) / 1024:7.1f} MiB")
        return r

    def flush_kept() -> None:
        if w.outputs:
            os.sync()   # flush the kept outputs now, not during timed runs

    os.sync()
    stats = repeat_alternating(TOOLS, repeat, once, warmup=1, budget=budget,
                               after_warmup=flush_kept)

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
