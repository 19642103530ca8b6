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

Prints one table per part (medians, plus min/max for the latency).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from qmp_bridge import nodes as N
from qmp_bridge.blockjobs import start_commit
from qmp_bridge.launch import QemuProcess
from qmp_bridge.snapshot import snapshot_disks

MiB = 1 << 20


def _run(*argv: object) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=600)


def _qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                         text=True).stdout
    return out.split("\n")[0].replace("QEMU emulator version ", "")


# ---------------------------------------------------------------------- snapshot latency
def bench_snapshot(work: Path, disks: int, repeat: int) -> dict[str, float]:
    """Median/min/max transaction seconds and median whole-snapshot seconds."""
    d = work / ("snap%d" % disks)
    d.mkdir()
    switch: list[float] = []
    whole: list[float] = []
    with QemuProcess(machine="pc", log_path=str(d / "qemu.log")) as vm:
        for i in range(disks):
            img = d / ("d%d.qcow2" % i)
            _run("qemu-img", "create", "-q", "-f", "qcow2", img, "1G")
            N.add_image(vm.qmp, str(img), "d%d" % i, backing=None)
            N.attach_device(vm.qmp, "d%d" % i, "vd%d" % i)
        for r in range(repeat + 1):
            res = snapshot_disks(vm.qmp, {"vd%d" % i: str(d / ("d%d.s%d.qcow2" % (i, r)))
                                          for i in range(disks)})
            if r:  # the first run warms up (imports, page cache)
                switch.append(res.transaction_seconds)
                whole.append(res.total_seconds)
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
        _run("cp", "--sparse=always", p, run_dir / p.name)
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


def _offline(argv: list[object]) -> float:
    t = time.perf_counter()
    _run(*argv)
    return time.perf_counter() - t


def bench_commit(work: Path, data_mib: int, repeat: int) -> list[tuple[str, float]]:
    """(method, median seconds) for each way of committing the same data."""
    tpl = _images(work, data_mib)
    run_dir = work / "run"
    methods: list[tuple[str, Callable[[Path, Path], float]]] = [
        ("live active commit (QMP, pivot)", lambda b, t: _live_commit(b, t, False)),
        ("live intermediate commit (QMP)", lambda b, t: _live_commit(b, t, True)),
        ("qemu-img commit (offline)", lambda b, t: _offline(["qemu-img", "commit", "-q", t])),
        ("qcow2engine commit (offline)",
         lambda b, t: _offline([sys.executable, "-m", "qcow2engine", "commit", "-q", t])),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    for r in range(repeat + 1):
        for name, fn in methods:  # interleaved, so drift hits every method alike
            base, top = _fresh(tpl, run_dir)
            secs = fn(base, top)
            if r:
                times[name].append(secs)
    shutil.rmtree(run_dir, ignore_errors=True)
    return [(name, statistics.median(times[name])) for name, _ in methods]


# ---------------------------------------------------------------------- main
def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
        rows = [["disks", "switch median", "switch min", "switch max", "whole snapshot"]]
        for n in args.disks:
            r = bench_snapshot(work, n, repeat)
            rows.append([str(n)] + ["%.2f ms" % (r[k] * 1e3)
                                    for k in ("median", "min", "max", "whole")])
        print("External snapshot, one transaction over all disks")
        print(_table(rows) + "\n")
        res = bench_commit(work, data, repeat)
        rows = [["method", "seconds", "MiB/s"]]
        for name, secs in res:
            rows.append([name, "%.3f" % secs, "%.0f" % (data / secs)])
        print("Commit %d MiB of overlay data into its base (fresh copies each run)" % data)
        print(_table(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
