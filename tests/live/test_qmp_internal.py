"""Internal snapshots of a live VM: snapshot-save / -load / -delete jobs over every disk, the VM
state on one, failures read from the job's error, and the run state put back."""
from __future__ import annotations

import pytest

from qcow2engine.errors import JobError, SnapshotError
from qmp_bridge.errors import LiveSnapshotError
from qmp_bridge.graph import read_graph
from qmp_bridge.internal import delete_vm, list_vm_snapshots, load_vm, save_vm
from tests.helpers.qemu import run
from tests.helpers.qmp import MiB, Model, assert_clean, guest_write, setup_disk

SIZE = 32 * MiB
A = [(0, 4 * MiB, 0x11)]
B = [(8 * MiB, 4 * MiB, 0x22)]


def running(vm) -> bool:
    return vm.qmp.execute("query-status")["running"]


def test_save_load_delete_on_a_running_vm(vm, tmp_path):
    (a,), da = setup_disk(vm, tmp_path, "vda", [A])
    (b,), db = setup_disk(vm, tmp_path, "vdb", [B])
    ma, mb = Model(SIZE, A), Model(SIZE, B)
    vm.qmp.execute("cont")
    res = save_vm(vm.qmp, "s1")
    assert res.devices == ["vda0", "vdb0"] and res.vmstate == "vda0"
    assert res.job.outcome == "completed" and res.run_state == "running"
    assert list_vm_snapshots(vm.qmp) == {"vda": ["s1"], "vdb": ["s1"]}
    guest_write(vm, da, None, 0, 1 * MiB, 0x90)       # undone by the load below
    guest_write(vm, db, None, 8 * MiB, 1 * MiB, 0x91)
    res = load_vm(vm.qmp, "s1")
    assert res.run_state == "running" and running(vm)
    guest_write(vm, da, ma, 10 * MiB, 1 * MiB, 0x92)
    res = delete_vm(vm.qmp, "s1")
    assert res.vmstate is None and list_vm_snapshots(vm.qmp) == {"vda": [], "vdb": []}
    assert vm.qmp.execute("query-jobs") == []
    vm.stop()
    ma.check(a, tmp_path)
    mb.check(b, tmp_path)
    assert run("qemu-img", "snapshot", "-l", a).stdout == ""
    assert_clean(a, b)


def test_failures_come_from_the_job_and_restore_the_run_state(vm, tmp_path):
    setup_disk(vm, tmp_path, "vda", [A])
    vm.qmp.execute("cont")
    with pytest.raises(LiveSnapshotError, match="does not exist") as ei:
        load_vm(vm.qmp, "nope")
    assert isinstance(ei.value, JobError) and isinstance(ei.value, SnapshotError)
    assert ei.value.result.outcome == "failed"
    # QEMU leaves the VM in "restore-vm" after a failed load; we put it back to running
    assert running(vm)
    save_vm(vm.qmp, "s1")
    with pytest.raises(LiveSnapshotError, match="already exists"):
        save_vm(vm.qmp, "s1")
    assert running(vm)
    vm.qmp.execute("stop")
    with pytest.raises(LiveSnapshotError):
        load_vm(vm.qmp, "nope")
    assert not running(vm)
    res = load_vm(vm.qmp, "s1")
    assert not running(vm) and res.run_state != "running"
    with pytest.raises(LiveSnapshotError, match="No block device node 'nonode'"):
        save_vm(vm.qmp, "s2", devices=["nonode"])
    assert not running(vm) and vm.qmp.execute("query-jobs") == []


def test_prelaunch_vm_and_explicit_devices(vm_none, tmp_path):
    setup_disk(vm_none, tmp_path, "d", [A], device=False)
    setup_disk(vm_none, tmp_path, "e", [B], device=False)
    res = save_vm(vm_none.qmp, "only-e", devices=["e0"])
    assert res.devices == ["e0"] and not running(vm_none)
    g = read_graph(vm_none.qmp)
    assert g.nodes["e0"].snapshots == ("only-e",) and g.nodes["d0"].snapshots == ()
    load_vm(vm_none.qmp, "only-e", devices=["e0"])
    delete_vm(vm_none.qmp, "only-e", devices=["e0"])
    assert read_graph(vm_none.qmp).nodes["e0"].snapshots == ()
