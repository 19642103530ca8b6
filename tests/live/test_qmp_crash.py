"""The process driving a job dies (SIGKILL) mid-job: QEMU is left in a known state (the job,
started with auto-finalize/auto-dismiss off, is listed by query-jobs) that the next attach can
read and finish (pivot) or cancel."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qmp_bridge.blockjobs import ChainJob
from qmp_bridge.cli import main as live_main
from qmp_bridge.graph import read_graph
from tests.helpers.qmp import MiB, Model, assert_clean, guest_write, setup_disk, written_ok

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32 * MiB
BASE = [(0, 8 * MiB, 0x11)]
TOP = [(4 * MiB, 10 * MiB, 0x21), (16 * MiB, 8 * MiB, 0x22)]

_DRIVER = """
import sys
sys.path.insert(0, %r)
from qmp_bridge.client import QMPSession
from qmp_bridge.blockjobs import start_commit
q = QMPSession.attach(sys.argv[1])
job = start_commit(q, "vd0", speed=1)
if sys.argv[2] == "ready":
    job.set_speed(0)
    job.wait_ready()
print(job.id, flush=True)
sys.stdin.readline()        # wait here until killed
"""


@pytest.mark.parametrize("when", ["running", "ready"])
def test_driver_killed_mid_job(vm, tmp_path, capsys, when):
    (base, top), dev = setup_disk(vm, tmp_path, "vd0", [BASE, TOP])
    model = Model(SIZE, BASE + TOP)
    vm.disconnect()                                   # the monitor serves one client
    child = subprocess.Popen([sys.executable, "-c", _DRIVER % str(ROOT), vm.socket_path, when],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        job_id = child.stdout.readline().strip()
        assert job_id.startswith("qe-commit-vd0"), job_id
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    # the next client (our CLI) sees the job
    rc = live_main(["--qmp", vm.socket_path, "jobs"])
    out = capsys.readouterr().out
    assert rc == 0 and job_id in out and when in out and "vd0" in out

    q = vm.reconnect()
    g = read_graph(q)
    (info,) = g.jobs
    assert (info.id, info.status, info.disk) == (job_id, when, "vd0")
    assert info.auto_finalize is False and info.auto_dismiss is False
    guest_write(vm, dev, model, 1 * MiB, 1 * MiB, 0x61)   # the guest runs on meanwhile
    with ChainJob.adopt_on(q, job_id) as job:
        if when == "running":
            job.set_speed(0)
            res = job.finish(pivot=True)
            assert res.outcome == "pivoted" and res.removed_nodes == ["vd01"]
            expect_chain, final = ["vd00"], base
        else:
            res = job.cancel()
            assert res.outcome == "cancelled" and res.removed_nodes == []
            expect_chain, final = ["vd01", "vd00"], top
    assert read_graph(q).disk("vd0").node_names == expect_chain
    assert q.execute("query-jobs") == []
    vm.stop()
    written_ok(vm, 1)
    model.check(final, tmp_path)
    assert_clean(base, top)
