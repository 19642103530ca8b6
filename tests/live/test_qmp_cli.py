"""`qcow2engine live --qmp SOCKET ...` against a real QEMU: output, outcomes, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qcow2engine.cli.main import main as engine_main
from qmp_bridge.graph import read_graph
from tests.helpers.qmp import MiB, Model, assert_clean, guest_write, setup_disk

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32 * MiB
A = [(0, 4 * MiB, 0x11)]
B = [(8 * MiB, 4 * MiB, 0x22)]
TOP = [(4 * MiB, 10 * MiB, 0x21), (16 * MiB, 8 * MiB, 0x22)]


@pytest.fixture
def live(vm, capsys):
    """live(*args) -> (rc, stdout, stderr): runs `qcow2engine live --qmp SOCK args` in-process
    while our own session steps aside (QEMU serves one QMP client at a time)."""
    def call(*args: str):
        vm.disconnect()
        try:
            rc = engine_main(["live", "--qmp", vm.socket_path, *args])
        finally:
            vm.reconnect()
        out, err = capsys.readouterr()
        return rc, out, err
    return call


def one_line_error(rc, out, err, needle):
    assert rc == 1, (rc, out, err)
    assert err.startswith("qcow2engine: ") and err.count("\n") == 1, err
    assert needle in err, err


def test_info_human_and_json(vm, tmp_path, live):
    (a0, a1), _ = setup_disk(vm, tmp_path, "vda", [A, B])
    rc, out, err = live("info")
    assert rc == 0 and err == ""
    assert "vda (/machine/peripheral/vda/virtio-backend)" in out
    assert str(a1) in out and str(a0) in out and "qcow2" in out
    rc, out, _ = live("info", "--output=json")
    doc = json.loads(out)
    (disk,) = doc["disks"]
    assert disk["disk"] == "vda" and disk["root"] == "vda1"
    assert [(n["node-name"], n["filename"], n["driver"]) for n in disk["chain"]] == \
        [("vda1", str(a1), "qcow2"), ("vda0", str(a0), "qcow2")]
    assert disk["chain"][0]["backing-file"] == "vda0.qcow2" and doc["jobs"] == []


def test_snapshot_commit_stream(vm, tmp_path, live):
    (a,), da = setup_disk(vm, tmp_path, "vda", [A])
    (b,), db = setup_disk(vm, tmp_path, "vdb", [B])
    ma, mb = Model(SIZE, A), Model(SIZE, B)
    oa, ob = tmp_path / "a.s1.qcow2", tmp_path / "b.s1.qcow2"
    rc, out, err = live("snapshot", "--overlay", "vda=%s" % oa, "--overlay", "vdb=%s" % ob)
    assert rc == 0, err
    assert "vda: now on %s" % oa in out and "vdb: now on %s" % ob in out
    guest_write(vm, da, ma, 1 * MiB, 1 * MiB, 0x31)
    guest_write(vm, db, mb, 9 * MiB, 1 * MiB, 0x32)
    ov_a = read_graph(vm.qmp).disk("vda").root
    rc, out, err = live("commit", "vda", "--wait", "-p", "--speed", "64M")
    assert rc == 0, err
    assert "outcome" not in out and ": pivoted; removed nodes: %s" % ov_a in out
    assert "commit" in err  # the progress bar
    rc, out, err = live("stream", "vdb", "--wait")
    assert rc == 0 and ": completed; removed nodes: vdb0" in out, (out, err)
    assert read_graph(vm.qmp).disk("vda").node_names == ["vda0"]
    vm.stop()
    ma.check(a, tmp_path)
    mb.check(ob, tmp_path)
    assert_clean(a, b, oa, ob)


def test_background_jobs_complete_cancel_speed(vm, tmp_path, live):
    (a0, a1), da = setup_disk(vm, tmp_path, "vda", [A, TOP])
    (b0, b1), db = setup_disk(vm, tmp_path, "vdb", [A, TOP])
    rc, out, _ = live("commit", "vda")
    job_a = out.strip()
    assert rc == 0 and job_a.startswith("qe-commit-vda")
    rc, out, _ = live("commit", "vdb", "--speed", "1", "--job-id", "slow")
    assert rc == 0 and out == "slow\n"
    rc, out, _ = live("jobs", "--output=json")
    jobs = {j["id"]: j for j in json.loads(out)}
    assert set(jobs) == {job_a, "slow"} and jobs["slow"]["disk"] == "vdb"
    assert jobs["slow"]["speed"] == 1
    assert live("pause", "slow")[0] == 0
    assert read_graph(vm.qmp).job("slow").paused is True   # status follows at a pause point
    assert live("resume", "slow")[0] == 0
    assert live("speed", "slow", "2M")[0] == 0
    assert read_graph(vm.qmp).job("slow").speed == 2 * MiB
    rc, out, _ = live("complete", job_a)
    assert rc == 0 and "%s (commit): pivoted; removed nodes: vda1" % job_a in out
    rc, out, _ = live("cancel", "slow")
    assert rc == 0 and "slow (commit): cancelled" in out
    rc, out, _ = live("jobs")
    assert out == "No jobs.\n"
    g = read_graph(vm.qmp)
    assert g.disk("vda").node_names == ["vda0"] and g.disk("vdb").node_names == ["vdb1", "vdb0"]
    vm.stop()
    model = Model(SIZE, A + TOP)
    model.check(a0, tmp_path)
    model.check(b1, tmp_path)
    assert_clean(a0, a1, b0, b1)


def test_internal_snapshots(vm, tmp_path, live):
    (a,), da = setup_disk(vm, tmp_path, "vda", [A])
    model = Model(SIZE, A)
    assert live("savevm", "t1") == (0, "", "")
    guest_write(vm, da, None, 0, 1 * MiB, 0x99)
    assert live("loadvm", "t1")[0] == 0
    one_line_error(*live("savevm", "t1"), "already exists")
    one_line_error(*live("loadvm", "nope"), "does not exist")
    assert live("delvm", "t1")[0] == 0
    vm.stop()
    model.check(a, tmp_path)


def test_errors_are_one_line(vm, tmp_path, live):
    setup_disk(vm, tmp_path, "vda", [A])
    one_line_error(*live("commit", "nope"), "No disk or node 'nope'")
    one_line_error(*live("commit", "vda"), "nothing to commit")
    one_line_error(*live("cancel", "nojob"), "No job 'nojob'")
    one_line_error(*live("snapshot", "--overlay", "vda"), "expects DISK=PATH")
    one_line_error(*live("snapshot", "--overlay", "vda=%s" % tmp_path), "exists")
    one_line_error(*live("commit"), "required")
    rc = engine_main(["live", "--qmp", str(tmp_path / "no.sock"), "info"])
    assert rc == 1


def test_entry_point_subprocess(vm, tmp_path):
    setup_disk(vm, tmp_path, "vda", [A])
    vm.disconnect()
    p = subprocess.run([sys.executable, "-m", "qcow2engine", "live", "--qmp", vm.socket_path,
                        "info", "--output=json"], capture_output=True, text=True, timeout=30,
                       cwd=str(ROOT))
    vm.reconnect()
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["disks"][0]["disk"] == "vda"
