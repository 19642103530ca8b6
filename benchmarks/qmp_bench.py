"""Live QMP benchmarks: snapshot switch latency and live-commit throughput.

Usage (from the repository root)::

    python -m benchmarks.qmp_bench [--quick] [--repeat N] [--data-mib N] [--workdir DIR]

1. **Snapshot switch latency** for 1, 4 and 16 disks: a QEMU (-M pc, TCG, prelaunch) with one
   virtio-blk device per disk; `qmp_bridge.snapshot.snapshot_disks` creates the overlays and
   switches every disk in one `transaction`.  "switch" is the transaction's round trip (the
   time during which the guest's disks change over, measured around the QMP command);
   "whole snapshot" adds reading the graph, creating the overlay files with our engine and
   blockdev-add of each overlay.  Each repetition snapshots again on top of the last.
2. **Commit throughput** on the same data: a base and an overlay holding DATA MiB; timed are
   a live active commit (block-commit, wait for READY, job-complete = pivot, node cleanup),
   a live intermediate commit (the same overlay below a fresh empty top), `qemu-img commit`
   offline, and our engine's offline `commit`.  Each run starts from fresh copies of the same
   images (`cp --sparse=always`, untimed), so every tool reads from the page cache.

Prints one table per part (medians, plus min/max for the latency).  Repetition, the
offline commands' timing and the tables are ``benchmarks.harness``'s.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):          # python benchmarks/qmp_bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks.harness.artifacts import run_checked, sparse_copy
from benchmarks.harness.report import format_table, tool_version
from benchmarks.harness.runner import Runner, repeat_alternating
from qmp_bridge import nodes as N
from qmp_bridge.blockjobs import start_commit
from qmp_bridge.launch import QemuProcess
from qmp_bridge.snapshot import snapshot_disks


def _run(*argv: object) -> None:
    run_checked(list(argv), timeout=600)


def _qemu_version() -> str:
    return tool_version("qemu-system-x86_64").replace("QEMU emulator version ", "")


# ---------------------------------------------------------------------- snapshot latency
def bench_snapshot(work: Path, disks: int, repeat: int) -> dict[str, float]:
    """Median/min/max transaction seconds and median whole-snapshot seconds."""
    d = work / ("snap%d" % disks)
    d.mkdir()
    whole: list[float] = []
    with QemuProcess(machine="pc", log_path=str(d / "qemu.log")) as vm:
        for i in range(disks):
            img = d / ("d%d.qcow2" % i)
            _run("qemu-img", "create", "-q", "-f", "qcow2", img, "1G")
            N.add_image(vm.qmp, str(img), "d%d" % i, backing=None)
            N.attach_device(vm.qmp, "d%d" % i, "vd%d" % i)
        snap_no = itertools.count()   # each snapshot on top of the last: s0, s1, ...

        def once(_name: str, _i: int) -> float:
            r = next(snap_no)
            res = snapshot_disks(vm.qmp, {"vd%d" % i: str(d / ("d%d.s%d.qcow2" % (i, r)))
                                          for i in range(disks)})
            if r:  # the first run warms up (imports, page cache)
                whole.append(res.total_seconds)
            return res.transaction_seconds

        switch = repeat_alternating(["switch"], repeat, once, warmup=1)["switch"].times
    shutil.rmtree(d, ignore_errors=True)
    return {"median": statistics.median(switch), "min": min(switch), "max": max(switch),
            "whole": statistics.median(whole)}


# ---------------------------------------------------------------------- commit throughput
def _images(work: Path, data_mib: int) -> tuple[Path, Path]:
    """Template base (1/4 of the data written) and overlay (DATA MiB written)."""
    t = work / "tpl"
    t.mkdir(exist_ok=True)
    base, top = t / "base.qcow2", t / "top.qcow2"
    size = "%dM" % (data_mib * 2)
    _run("qemu-img", "create", "-q", "-f", "qcow2", base, size)
    _run("qemu-io", "-c", "write -P 0x11 0 %dM" % (data_mib // 4), base)
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, size)
    _run("qemu-io", "-c", "write -P 0x22 %dM %dM" % (data_mib // 8, data_mib), top)
    return base, top


def _fresh(tpl: tuple[Path, Path], run_dir: Path) -> tuple[Path, Path]:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir()
    for p in tpl:
        sparse_copy(p, run_dir / p.name)
    os.sync()
    return run_dir / tpl[0].name, run_dir / tpl[1].name


def _live_commit(base: Path, top: Path, intermediate: bool) -> float:
    with QemuProcess(machine="pc", log_path=str(base.parent / "qemu.log")) as vm:
        q = vm.qmp
        N.add_chain(q, [str(base), str(top)], ["base", "top"])
        root = "top"
        if intermediate:
            active = top.parent / "active.qcow2"
            _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2",
                 active)
            N.add_image(q, str(active), "active", backing="top")
            root = "active"
        N.attach_device(q, root, "vd0")
        t = time.perf_counter()
        if intermediate:
            with start_commit(q, "vd0", top="top", base="base") as job:
                job.finish()
        else:
            with start_commit(q, "vd0") as job:
                job.wait_ready()
                job.finish(pivot=True)
        return time.perf_counter() - t


def _offline(argv: list[object], stdout: Path) -> float:
    """Whole-process wall time of one offline command."""
    argv = [str(a) for a in argv]
    r = Runner(fork_for_rss=False).run([argv], stdout, timeout=600)   # RSS not reported
    if r.error:
        raise RuntimeError("%s failed: %s" % (shlex.join(argv), r.error))
    return r.seconds


def bench_commit(work: Path, data_mib: int, repeat: int) -> list[tuple[str, float]]:
    """(method, median seconds) for each way of committing the same data."""
    tpl = _images(work, data_mib)
    run_dir = work / "run"
    out = work / "offline.stdout"
    methods: dict[str, Callable[[Path, Path], float]] = {
        "live active commit (QMP, pivot)": lambda b, t: _live_commit(b, t, False),
        "live intermediate commit (QMP)": lambda b, t: _live_commit(b, t, True),
        "qemu-img commit (offline)": lambda b, t: _offline(["qemu-img", "commit", "-q", t], out),
        "qcow2engine commit (offline)":
            lambda b, t: _offline([sys.executable, "-m", "qcow2engine", "commit", "-q", t], out),
    }

    def once(name: str, i: int) -> float:
        base, top = _fresh(tpl, run_dir)
        return methods[name](base, top)

    # interleaved, so drift hits every method alike; the first round warms up
    samples = repeat_alternating(methods, repeat, once, warmup=1)
    shutil.rmtree(run_dir, ignore_errors=True)
    return [(name, samples[name].median) for name in methods]


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run both parts and print the tables."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.qmp_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB of data, 3 repetitions")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--data-mib", type=int, default=None, help="MiB to commit (default 256)")
    ap.add_argument("--disks", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 7)
    data = args.data_mib or (64 if args.quick else 256)
    work = Path(tempfile.mkdtemp(prefix="qmp-bench-", dir=args.workdir))
    try:
        print("QEMU %s, -M pc -accel tcg (prelaunch), virtio-blk; %d runs per point (median)\n"
              % (_qemu_version(), repeat))
        rows = []
        for n in args.disks:
            r = bench_snapshot(work, n, repeat)
            rows.append([str(n)] + ["%.2f ms" % (r[k] * 1e3)
                                    for k in ("median", "min", "max", "whole")])
        print("External snapshot, one transaction over all disks")
        print(format_table(["disks", "switch median", "switch min", "switch max",
                            "whole snapshot"], rows, align="lrrrr") + "\n")
        res = bench_commit(work, data, repeat)
        rows = [[name, "%.3f" % secs, "%.0f" % (data / secs)] for name, secs in res]
        print("Commit %d MiB of overlay data into its base (fresh copies each run)" % data)
        print(format_table(["method", "seconds", "MiB/s"], rows, align="lrr"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
