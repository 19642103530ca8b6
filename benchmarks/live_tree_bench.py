"""Machine snapshot trees on a running machine: how long the guest stops, and how fast a live
merge is next to the offline one.

    python -m benchmarks.live_tree_bench [--repeat N] [--data MiB] [--memory MiB] [--markdown]

The machine: two 1 GiB qcow2 disks, QEMU under TCG (-M pc, KVM when --kvm), booted into the
test guest (tests/helpers/guest.py: a Debian kernel and a busybox initramfs whose writer writes
to every disk the whole time) when it is available, else idle firmware.  Rows (median of N):

- snapshot-create-as --memspec: the time the guest is stopped (pause, memory to a file, one
  transaction over both disks, resume), without and with --live (memory saved while the guest
  runs, stopped only for the last pass and the switch);
- snapshot-revert to that snapshot: the time from the running guest's stop (its memory goes to
  the automatic snapshot of the tip) to the restored guest running again (QEMU restarted with
  the memory as incoming migration);
- revert --commit of DATA MiB written after an external snapshot: live (an active commit job
  while the guest runs, then the pivot) next to the same verb offline (machine shut off) and
  `qemu-img commit` of the same overlay; throughput = DATA / time.
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

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

MiB = 1 << 20


def _guest():
    """The test guest's launch definition (kernel, initrd, append, qemu_args), or None."""
    try:
        from tests.helpers import guest
    except ImportError:
        return None
    try:
        g = guest.launch()
    except Exception as e:                                   # noqa: BLE001
        print("# no test guest (%s): idle firmware instead" % e, file=sys.stderr)
        return None
    return {k: g[k] for k in ("kernel", "initrd", "append", "qemu_args")}


def _machine(root: Path, memory: int, kvm: bool, data_disk_mib: int = 1024):
    from qcow2engine.tree import Tree
    root.mkdir(parents=True, exist_ok=True)
    disks = {}
    for d in ("vda", "vdb"):
        p = root / (d + ".qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p),
                        "%dM" % data_disk_mib], check=True)
        disks[d] = str(p)
    launch = {"memory": "%dM" % memory, "accel": "kvm" if kvm else "tcg"}
    g = _guest()
    if g is not None:
        launch.update(g)
    tree = Tree(str(root / "state"))
    m = tree.define("m", disks, launch)
    return tree, m, g is not None


def _qemu_io_live(m, disk: str, cmd: str) -> None:
    from qmp_bridge.client import QMPSession
    with QMPSession.attach(m.runtime()["qmp"], timeout=600) as s:
        out = s.hmp('qemu-io -d /machine/peripheral/%s/virtio-backend "%s"' % (disk, cmd),
                    timeout=600)
        assert not out.strip(), out


def bench(repeat: int, data: int, memory: int, kvm: bool) -> list:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="qcow2engine-live-bench-", dir="/var/tmp"))
    try:
        # ---- pause times
        tree, m, has_guest = _machine(work / "p", memory, kvm)
        rt = m.start()
        if has_guest:                               # let the guest boot and write
            from tests.helpers.guest import Serial
            ser = Serial(rt["serial"])
            ser.wait_up()
            ser.wait_seqs(("vda", "vdb"), 10)
        else:
            time.sleep(0.5)
        plain, livep, revert = [], [], []
        for i in range(repeat):
            r = m.create_snapshot("p%d" % i, memspec=str(work / "p" / ("p%d.mem" % i)))
            plain.append(r.paused_seconds)
            r = m.create_snapshot("l%d" % i, memspec=str(work / "p" / ("l%d.mem" % i)),
                                  live=True)
            livep.append(r.paused_seconds)
            r = m.revert("p%d" % i, auto_snapshot=False, running=True)
            revert.append(r.paused_seconds)
        m.stop(force=True)
        tree.close()
        what = "the test guest" if has_guest else "idle firmware"
        rows.append(["snapshot --memspec: guest stopped (%s, %d MiB)" % (what, memory),
                     "%.3f s" % statistics.median(plain)])
        rows.append(["snapshot --memspec --live: guest stopped",
                     "%.3f s" % statistics.median(livep)])
        rows.append(["revert to a memory snapshot: guest stopped until it runs again",
                     "%.3f s" % statistics.median(revert)])

        # ---- live commit vs offline commit vs qemu-img commit
        live_t, off_t, q_t = [], [], []
        for i in range(repeat):
            root = work / ("c%d" % i)
            tree, m, _ = _machine(root, memory, kvm)
            m.start()
            m.create_snapshot("s", disk_only=True)
            _qemu_io_live(m, "vda", "write -P 5 0 %dM" % data)
            _qemu_io_live(m, "vda", "flush")
            t = time.monotonic()
            r = m.revert("s", mode="commit")
            live_t.append(time.monotonic() - t)
            assert r.completed
            m.stop(force=True)
            # offline: the same again on the shut-off machine
            m.create_snapshot("s2", disk_only=True)
            active = m.state().disk("vda").active
            subprocess.run(["qemu-io", "-c", "write -P 6 0 %dM" % data, active], check=True,
                           stdout=subprocess.DEVNULL)
            copy = root / "copy"
            copy.mkdir()
            for f in os.listdir(root):
                if f.endswith(".qcow2"):
                    subprocess.run(["cp", "--sparse=always", str(root / f), str(copy / f)],
                                   check=True)
            t = time.monotonic()
            r = m.revert("s2", mode="commit")
            off_t.append(time.monotonic() - t)
            tree.close()
            top = copy / os.path.basename(active)
            t = time.monotonic()
            subprocess.run(["qemu-img", "commit", "-q", str(top)], check=True)
            q_t.append(time.monotonic() - t)
        rows.append(["revert --commit %d MiB, live (guest running)" % data,
                     "%.3f s (%.0f MiB/s)" % (statistics.median(live_t),
                                              data / statistics.median(live_t))])
        rows.append(["revert --commit %d MiB, offline" % data,
                     "%.3f s (%.0f MiB/s)" % (statistics.median(off_t),
                                              data / statistics.median(off_t))])
        rows.append(["qemu-img commit %d MiB (same overlay)" % data,
                     "%.3f s (%.0f MiB/s)" % (statistics.median(q_t),
                                              data / statistics.median(q_t))])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=int, default=256, help="MiB merged by the commit rows")
    ap.add_argument("--memory", type=int, default=256, help="guest memory, MiB")
    ap.add_argument("--kvm", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    rows = bench(a.repeat, a.data, a.memory, a.kvm)
    if a.markdown:
        print("| measurement | median of %d |\n|---|---|" % a.repeat)
        for r in rows:
            print("| %s | %s |" % tuple(r))
    else:
        w = max(len(r[0]) for r in rows)
        for r in rows:
            print("%-*s  %s" % (w, r[0], r[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
