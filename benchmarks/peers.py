"""The other qcow2 libraries against ours: a full guest read through each one's Python API.

    python -m benchmarks.peers [--quick] [--repeat N] [--markdown]

Peers (PyPI, read through their own APIs): ``dissect.hypervisor`` 3.21
(``QCow2(fh).open()``, a file-like stream) and ``libqcow-python`` (``pyqcow.file`` and
``read_buffer_at_offset``).  Images: ``benchmarks.run``'s ``scattered-4k`` (4 GiB virtual,
1 GiB of data in scattered 4 KiB clusters) and ``compressed-zlib`` (1 GiB, zlib) artifacts.

Each run is a fresh interpreter that imports its library and opens the image untimed, then
reads the whole virtual disk front to back in 4 MiB requests (timed).  Every reader hashes
the same sampled requests (one in eight, CRC-32) and is checked against qemu-img's raw
conversion: the engine must agree (else the run stops); a peer that does not is reported
as reading wrong data.  Runs alternate
between the readers; medians are printed with the ratio engine / peer (below 1: faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import zlib
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks.harness.artifacts import ensure_artifact
from benchmarks.workloads import ARTIFACTS

CHUNK = 4 << 20
SAMPLE = 8
WORKDIR = Path("/var/tmp/qcow2engine-bench")

_LOOP = """
import json, sys, time, zlib
CH, SAMPLE = %d, %d
crcs = {}
t0 = time.perf_counter()
for i, off in enumerate(range(0, size, CH)):
    n = min(CH, size - off)
    data = read(off, n)
    if i %% SAMPLE == 0:
        crcs[off] = zlib.crc32(data)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "crcs": crcs, "size": size}))
""" % (CHUNK, SAMPLE)

READERS = {
    "qcow2engine": """
import numpy as np, qcow2engine
c = qcow2engine.open_chain(sys.argv[1])
size = c.size
buf = np.empty(%d, np.uint8)
def read(off, n):
    c.read_into(buf[:n], off)
    return memoryview(buf)[:n]
""" % CHUNK,
    "dissect.hypervisor": """
from dissect.hypervisor.disk.qcow2 import QCow2
fh = open(sys.argv[1], "rb")
q = QCow2(fh, allow_no_backing_file=True)
s = q.open()
s.seek(0, 2); size = s.tell(); s.seek(0)
def read(off, n):
    s.seek(off)
    return s.read(n)
""",
    "libqcow-python": """
import pyqcow
f = pyqcow.file()
f.open(sys.argv[1])
size = f.get_media_size()
def read(off, n):
    return f.read_buffer_at_offset(n, off)
""",
}


def run_reader(name: str, image: Path) -> dict:
    code = "import sys\n" + READERS[name] + _LOOP
    p = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True,
                       text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError("%s failed on %s: %s" % (name, image, p.stderr[-500:]))
    return json.loads(p.stdout)


def reference_crcs(image: Path, size: int) -> dict:
    """CRC-32 of the sampled requests of qemu-img's raw conversion."""
    raw = image.with_suffix(".peers.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    out = {}
    try:
        with open(raw, "rb") as f:
            for i, off in enumerate(range(0, size, CHUNK)):
                if i % SAMPLE == 0:
                    f.seek(off)
                    out[str(off)] = zlib.crc32(f.read(min(CHUNK, size - off)))
    finally:
        raw.unlink()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    profile = "quick" if args.quick else "full"
    rows = []
    for art_name, key in (("scattered-4k", "img"), ("compressed-zlib", "img")):
        files, _ = ensure_artifact(ARTIFACTS[art_name], profile, WORKDIR, "qemu-img")
        image = files[key]
        times = {n: [] for n in READERS}
        wrong = {}
        ref = None
        for r in range(args.repeat + 1):          # the first round warms the page cache
            for name in READERS:
                got = run_reader(name, image)
                if ref is None:
                    ref = reference_crcs(image, got["size"])
                if got["crcs"] != ref:
                    bad = [int(k) for k in ref if got["crcs"].get(k) != ref[k]]
                    wrong[name] = "%d of %d sampled requests differ from qemu-img's, the " \
                        "first at offset %d" % (len(bad), len(ref), bad[0])
                    if name == "qcow2engine":
                        raise RuntimeError("the engine read %s differently from qemu-img: %s"
                                           % (image, wrong[name]))
                if r:
                    times[name].append(got["seconds"])
        med = {n: statistics.median(v) for n, v in times.items()}
        rows.append((art_name, med, wrong))
    head = "| image | " + " | ".join("%s s" % n for n in READERS) + \
        " | engine / dissect | engine / libqcow |"
    print(head)
    print("|" + "---|" * (len(READERS) + 3))
    notes = []
    for art_name, med, wrong in rows:
        e = med["qcow2engine"]
        cells = ["%.3f%s" % (med[n], " (wrong data)" if n in wrong else "") for n in READERS]
        print("| %s | %s | %.2f | %.2f |" % (
            art_name, " | ".join(cells),
            e / med["dissect.hypervisor"], e / med["libqcow-python"]))
        notes += ["- %s on %s: %s" % (n, art_name, why) for n, why in wrong.items()]
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
