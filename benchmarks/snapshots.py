"""Internal snapshot benchmarks: qemu-img snapshot vs qcow2engine on the same images.

    python -m benchmarks.snapshots [--quick] [--repeat N]

- create / apply / delete on a copy of the 1 TiB preallocation=metadata image (16.7M
  clusters): each tool gets a fresh sparse copy per run (untimed), runs alternate.
- 200 creates on a small image: whole processes (interpreter start-up included) and, for
  the engine, the same 200 creates through the Python API in one process.
Prints median seconds, the ratio engine/qemu-img and the engine's peak RSS.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINE = [sys.executable, "-m", "qcow2engine"]


def run(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, **kw)


def timed(argv) -> tuple[float, int]:
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    el = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("%s failed: %s" % (argv, p.stderr.read().decode()[:200]))
    return el, ru.ru_maxrss // 1024


def build(work: Path, size: str) -> Path:
    img = work / "prealloc.qcow2"
    if not img.exists():
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(img), size])
    return img


def bench_op(work: Path, base: Path, op: str, repeat: int) -> dict:
    times = {"qemu-img": [], "engine": []}
    rss = 0
    for _ in range(repeat):
        for tool in ("qemu-img", "engine"):
            copy = work / ("run-%s.qcow2" % tool)
            run(["cp", "--sparse=always", str(base), str(copy)])
            if op in ("apply", "delete"):
                run(["qemu-img", "snapshot", "-c", "s1", str(copy)])
            flag = {"create": ["-c", "s1"], "apply": ["-a", "s1"], "delete": ["-d", "s1"]}[op]
            argv = (["qemu-img"] if tool == "qemu-img" else ENGINE) + ["snapshot"] + flag + [str(copy)]
            run(["sync"])
            el, r = timed(argv)
            times[tool].append(el)
            if tool == "engine":
                rss = max(rss, r)
                chk = subprocess.run(["qemu-img", "check", str(copy)], capture_output=True)
                if chk.returncode != 0:
                    raise RuntimeError("engine left %s unclean: %s" % (op, chk.stdout[-300:]))
            copy.unlink()
    q, e = statistics.median(times["qemu-img"]), statistics.median(times["engine"])
    return {"op": op, "qemu": q, "engine": e, "ratio": e / q, "rss": rss}


def bench_200(work: Path, n: int) -> list:
    out = []
    for tool in ("qemu-img", "engine"):
        img = work / ("small-%s.qcow2" % tool)
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"])
        run(["qemu-io", "-c", "write -P 1 0 8M", str(img)])
        argv0 = ["qemu-img"] if tool == "qemu-img" else ENGINE
        t0 = time.monotonic()
        for i in range(n):
            run(argv0 + ["snapshot", "-c", "s%d" % i, str(img)])
        out.append((tool, time.monotonic() - t0))
    img = work / "small-api.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"])
    run(["qemu-io", "-c", "write -P 1 0 8M", str(img)])
    code = ("import time,sys; from qcow2engine.image.qcow2 import Qcow2Image;"
            "from qcow2engine.image.snapshots import create_snapshot;"
            "t=time.monotonic()\n"
            "for i in range(%d):\n"
            "    img=Qcow2Image(sys.argv[1], writable=True); create_snapshot(img, 's%%d' %% i); img.close()\n"
            "print(time.monotonic()-t)" % n)
    r = run([sys.executable, "-c", code, str(img)])
    out.append(("engine (API, one process)", float(r.stdout.decode().strip())))
    for f in work.glob("small-*.qcow2"):
        chk = subprocess.run(["qemu-img", "check", str(f)], capture_output=True)
        if chk.returncode != 0:
            raise RuntimeError("%s unclean" % f)
        f.unlink()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp/qcow2engine-bench/snapshots")
    a = ap.parse_args(argv)
    work = Path(a.workdir) / ("quick" if a.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    base = build(work, "256G" if a.quick else "1T")
    print("| operation (%s preallocation=metadata) | qemu-img s | qcow2engine s | ratio | target | engine RSS MiB |"
          % ("256 GiB" if a.quick else "1 TiB"))
    print("|---|---|---|---|---|---|")
    for op in ("create", "apply", "delete"):
        r = bench_op(work, base, op, a.repeat)
        print("| snapshot %s | %.2f | %.2f | %.2f | <= 0.30 | %d |" % (op, r["qemu"], r["engine"], r["ratio"], r["rss"]))
    n = 50 if a.quick else 200
    res = dict(bench_200(work, n))
    q = res["qemu-img"]
    for tool in ("engine", "engine (API, one process)"):
        print("| %d creates, small image, %s | %.2f | %.2f | %.2f | <= 1.00 | |" % (n, tool, q, res[tool], res[tool] / q))
    return 0


if __name__ == "__main__":
    sys.exit(main())
