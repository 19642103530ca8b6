"""Internal snapshot benchmarks: qemu-img snapshot vs qcow2engine on the same images.

    python -m benchmarks.snapshots [--quick] [--repeat N]

- create / apply / delete on a copy of the 1 TiB preallocation=metadata image (16.7M
  clusters): each tool gets a fresh sparse copy per run (untimed), runs alternate.
- 200 creates on a small image: whole processes (interpreter start-up included) and, for
  the engine, the same 200 creates through the Python API in one process.
Prints median seconds, the ratio engine/qemu-img and the engine's peak RSS.

The image is ``benchmarks.run``'s ``prealloc-metadata`` artifact (cached under
``WORKDIR/<profile>/``); timing, repetition and the table are ``benchmarks.harness``'s.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):          # python benchmarks/snapshots.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks.harness.artifacts import ensure_artifact, image_check, run_checked, sparse_copy
from benchmarks.harness.compare import engine_ratio
from benchmarks.harness.report import markdown_header, markdown_row
from benchmarks.harness.runner import Runner, RunResult, repeat_alternating
from benchmarks.workloads import ARTIFACTS

ENGINE = [sys.executable, "-m", "qcow2engine"]
TOOLS = ("qemu-img", "engine")
QEMU_IMG = "qemu-img"


def timed(runner: Runner, work: Path, argvs: list[list[str]]) -> RunResult:
    """Whole processes, one after the other; RuntimeError if one fails."""
    r = runner.run(argvs, work / "timed.stdout")
    if r.error:
        raise RuntimeError("%s failed: %s" % (shlex.join(argvs[-1]), r.error))
    return r


def bench_op(runner: Runner, work: Path, base: Path, op: str, repeat: int) -> dict:
    flag = {"create": ["-c", "s1"], "apply": ["-a", "s1"], "delete": ["-d", "s1"]}[op]

    def once(tool: str, i: int) -> RunResult:
        copy = work / ("run-%s.qcow2" % tool)
        sparse_copy(base, copy)
        if op in ("apply", "delete"):
            run_checked([QEMU_IMG, "snapshot", "-c", "s1", copy])
        argv = ([QEMU_IMG] if tool == "qemu-img" else ENGINE) + ["snapshot"] + flag + [str(copy)]
        os.sync()
        r = timed(runner, work, [argv])
        if tool == "engine":
            chk = image_check(QEMU_IMG, copy)
            if chk.returncode != 0:
                raise RuntimeError("engine left %s unclean: %s" % (op, chk.stdout[-300:]))
        copy.unlink()
        return r

    s = repeat_alternating(TOOLS, repeat, once)
    q, e = s["qemu-img"].median, s["engine"].median
    return {"op": op, "qemu": q, "engine": e, "ratio": engine_ratio(e, q),
            "rss": s["engine"].peak_rss_mib}


def _small_image(img: Path) -> None:
    run_checked([QEMU_IMG, "create", "-q", "-f", "qcow2", img, "64M"])
    run_checked(["qemu-io", "-c", "write -P 1 0 8M", img])


def bench_200(runner: Runner, work: Path, n: int) -> list:
    out = []
    for tool in TOOLS:
        img = work / ("small-%s.qcow2" % tool)
        _small_image(img)
        argv0 = [QEMU_IMG] if tool == "qemu-img" else ENGINE
        r = timed(runner, work, [argv0 + ["snapshot", "-c", "s%d" % i, str(img)]
                                 for i in range(n)])
        out.append((tool, r.seconds))
    img = work / "small-api.qcow2"
    _small_image(img)
    # Timed inside the process: the API's cost without the interpreter's start-up.
    code = ("import time,sys; from qcow2engine.image.qcow2 import Qcow2Image;"
            "from qcow2engine.image.snapshots import create_snapshot;"
            "t=time.monotonic()\n"
            "for i in range(%d):\n"
            "    img=Qcow2Image(sys.argv[1], writable=True); create_snapshot(img, 's%%d' %% i); img.close()\n"
            "print(time.monotonic()-t)" % n)
    r = subprocess.run([sys.executable, "-c", code, str(img)], check=True, capture_output=True)
    out.append(("engine (API, one process)", float(r.stdout.decode().strip())))
    for f in work.glob("small-*.qcow2"):
        if image_check(QEMU_IMG, f).returncode != 0:
            raise RuntimeError("%s unclean" % f)
        f.unlink()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp/qcow2engine-bench/snapshots")
    a = ap.parse_args(argv)
    profile = "quick" if a.quick else "full"
    work = Path(a.workdir) / profile
    work.mkdir(parents=True, exist_ok=True)
    # 256 GiB (quick) or 1 TiB, preallocation=metadata
    base = ensure_artifact(ARTIFACTS["prealloc-metadata"], profile, Path(a.workdir),
                           QEMU_IMG)[0]["img"]
    # A small harness: vfork (as before the harness was shared), its RSS is far below the engine's.
    runner = Runner(fork_for_rss=False)
    print(markdown_header(["operation (%s preallocation=metadata)" % ("256 GiB" if a.quick else "1 TiB"),
                           "qemu-img s", "qcow2engine s", "ratio", "target", "engine RSS MiB"]))
    for op in ("create", "apply", "delete"):
        r = bench_op(runner, work, base, op, a.repeat)
        print(markdown_row(["snapshot %s" % op, "%.2f" % r["qemu"], "%.2f" % r["engine"],
                            "%.2f" % r["ratio"], "<= 0.30", "%d" % r["rss"]]))
    n = 50 if a.quick else 200
    res = dict(bench_200(runner, work, n))
    q = res["qemu-img"]
    for tool in ("engine", "engine (API, one process)"):
        print(markdown_row(["%d creates, small image, %s" % (n, tool), "%.2f" % q,
                            "%.2f" % res[tool], "%.2f" % engine_ratio(res[tool], q),
                            "<= 1.00", ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
