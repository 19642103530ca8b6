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

A failing or timed-out command never aborts the run: it is reported in the
table as ``error: ...`` / ``timeout``.  The harness does not import anything
from qcow2engine; it only runs its command line.  The exception are the
``tree-*`` workloads (``benchmarks/tree_bench.py``): machine snapshot-tree verbs
through the Python API in this process against the ``qemu-img`` commands a
script would run; they are timed there (``--engine-cmd`` does not apply), and
a second table shows the tree's own overhead per verb.

This file is the command line; the workloads and their input images are in
``benchmarks/workloads.py`` (``WORKLOADS``, ``ARTIFACTS``: add new ones there),
the machinery in ``benchmarks/harness/`` (``artifacts``: building and caching
images; ``runner``: timing and repetition; ``compare``: the side-by-side run, ratio
and verdict; ``verify``: output checks; ``report``: the table).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks.harness.artifacts import ensure_artifact
from benchmarks.harness.compare import TOOLS, WorkloadResult, run_workload
from benchmarks.harness.report import format_results, machine_info, results_json
from benchmarks.harness.runner import GNU_TIME, GiB, Runner, Samples, log
from benchmarks.tree_bench import TreeWorkload, format_overhead, overhead_json, run_tree_workload
from benchmarks.workloads import ARTIFACTS, WORKLOADS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = "/var/tmp/qcow2engine-bench"


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
            res = WorkloadResult(w, {t: Samples() for t in TOOLS}, error=err)
        else:
            art = ARTIFACTS[w.artifact]
            params = {**art.params[profile], **w.params.get(profile, {})}
            if isinstance(w, TreeWorkload):     # the engine's API in this process
                res = run_tree_workload(w, files, run_dir, qemu_img, repeat, timeout,
                                        budget, profile)
            else:
                res = run_workload(w, files, runner, run_dir, qemu_img, engine_cmd,
                                   repeat, timeout, budget, params)
            res.build_seconds = dt
        log(f"    -> {res.verdict()}; outputs: {res.verify}")
        results.append(res)
    log(f"benchmarks ran in {time.perf_counter() - t_run:.1f} s")

    print(format_results(results, info, profile, repeat, runner.rss_method,
                         markdown=args.markdown))
    tree = format_overhead(results, args.markdown)
    if tree:
        print("\n" + tree)
    if args.json:
        doc = json.loads(results_json(results, info, profile, repeat, runner.rss_method))
        doc["tree_overhead"] = overhead_json(results)
        Path(args.json).write_text(json.dumps(doc, indent=2))

    if args.strict and any(r.verdict() != "PASS" for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
