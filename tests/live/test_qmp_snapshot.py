"""Online external snapshots: one disk, several disks atomically, and failures that must leave
every disk as it was with no stray overlay file or node."""
from __future__ import annotations

import os

import pytest

from qmp_bridge.blockjobs import commit, start_commit
from qmp_bridge.errors import LiveGraphError, QMPCommandError, QMPTimeoutError
from qmp_bridge.graph import read_graph
from qmp_bridge.snapshot import snapshot_disks
from tests.helpers.qmp import (MiB, Model, assert_clean, backing_name, guest_write, setup_disk,
                               written_ok)

SIZE = 32 * MiB
A = [(0, 4 * MiB, 0x11)]
B = [(8 * MiB, 4 * MiB, 0x22)]


def two_disks(vm, tmp_path):
    (a,), da = setup_disk(vm, tmp_path, "vda", [A])
    (b,), db = setup_disk(vm, tmp_path, "vdb", [B])
    return a, b, da, db


def state(vm):
    """Everything a failed snapshot must not change: chains, node set, files."""
    g = read_graph(vm.qmp)
    return ({d.name: d.node_names for d in g.disks}, sorted(g.nodes))


def test_snapshot_then_writes_then_commit_roundtrip(vm, tmp_path):
    """snapshot + guest writes + live commit: the data read offline (qemu-img, our engine)
    is what was written; qemu-img check is clean on every file."""
    (base,), dev = setup_disk(vm, tmp_path, "vd0", [A])
    model = Model(SIZE, A)
    old = model.copy()
    ov = tmp_path / "vd0.s1.qcow2"
    res = snapshot_disks(vm.qmp, {"vd0": str(ov)})
    (info,) = res.overlays
    assert info.disk == "vd0" and info.backing_node == "vd00" and info.path == str(ov)
    assert read_graph(vm.qmp).disk("vd0").node_names == [info.node, "vd00"]
    assert res.transaction_seconds < 1.0
    guest_write(vm, dev, model, 1 * MiB, 2 * MiB, 0x55)
    guest_write(vm, dev, model, 20 * MiB, 1 * MiB, 0x56)
    # QEMU now holds the base read-only, so it can be read (with locks) while the guest runs
    old.check(base, tmp_path)
    res2 = commit(vm.qmp, "vd0")
    assert res2.outcome == "pivoted" and res2.removed_nodes == [info.node]
    guest_write(vm, dev, model, 30 * MiB, 1 * MiB, 0x57)
    vm.stop()
    written_ok(vm, 3)
    model.check(base, tmp_path)
    assert backing_name(ov) == str(base)
    assert_clean(base, ov)


def test_snapshot_keeps_old_data_in_backing(vm, tmp_path):
    (base,), dev = setup_disk(vm, tmp_path, "vd0", [A])
    model = Model(SIZE, A)
    old = model.copy()
    ov = tmp_path / "sub" / "ov.qcow2"
    ov.parent.mkdir()
    snapshot_disks(vm.qmp, {"vd0": str(ov)}, relative_backing=True)
    guest_write(vm, dev, model, 0, 1 * MiB, 0x66)
    vm.stop()
    assert backing_name(ov) == "../vd00.qcow2"
    old.check(base, tmp_path)
    model.check(ov, tmp_path)
    assert_clean(base, ov)


def test_multi_disk_snapshot_is_one_transaction(vm, tmp_path):
    a, b, da, db = two_disks(vm, tmp_path)
    ma, mb = Model(SIZE, A), Model(SIZE, B)
    oa, ob = tmp_path / "a.s1.qcow2", tmp_path / "b.s1.qcow2"
    res = snapshot_disks(vm.qmp, {"vda": str(oa), "vdb": str(ob)})
    assert [o.disk for o in res.overlays] == ["vda", "vdb"]
    g = read_graph(vm.qmp)
    assert g.disk("vda").node_names[1:] == ["vda0"] and g.disk("vdb").node_names[1:] == ["vdb0"]
    guest_write(vm, da, ma, 2 * MiB, 1 * MiB, 0x77)
    guest_write(vm, db, mb, 9 * MiB, 1 * MiB, 0x78)
    vm.stop()
    Model(SIZE, A).check(a, tmp_path)
    Model(SIZE, B).check(b, tmp_path)
    ma.check(oa, tmp_path)
    mb.check(ob, tmp_path)
    assert_clean(a, b, oa, ob)


def test_failing_action_leaves_both_disks_as_they_were(vm, tmp_path):
    """vdb's top is busy (a commit job runs on it): QEMU refuses that action and rolls back
    the whole transaction; our overlay nodes and files are removed."""
    a, b, da, db = two_disks(vm, tmp_path)
    (c0, c1), dc = setup_disk(vm, tmp_path, "vdc", [A, B])
    files = sorted(os.listdir(tmp_path))
    with start_commit(vm.qmp, "vdc", speed=1) as job:
        before = state(vm)   # with the job's filter node
        with pytest.raises(QMPCommandError, match="is busy"):
            snapshot_disks(vm.qmp, {"vda": str(tmp_path / "a.ov.qcow2"),
                                    "vdc": str(tmp_path / "c.ov.qcow2")})
        assert state(vm) == before
        assert sorted(os.listdir(tmp_path)) == files
        job.cancel()
    ma = Model(SIZE, A)
    guest_write(vm, da, ma, 3 * MiB, 1 * MiB, 0x79)  # still writes vda's original image
    vm.stop()
    ma.check(a, tmp_path)
    assert_clean(a, b, c0, c1)


def test_failure_before_the_transaction_removes_what_was_made(vm, tmp_path):
    a, b, da, db = two_disks(vm, tmp_path)
    before = state(vm)
    files = sorted(os.listdir(tmp_path))
    with pytest.raises(FileNotFoundError):   # the second overlay's directory is missing
        snapshot_disks(vm.qmp, {"vda": str(tmp_path / "a.ov.qcow2"),
                                "vdb": str(tmp_path / "missing" / "b.ov.qcow2")})
    assert state(vm) == before and sorted(os.listdir(tmp_path)) == files


class FailingSession:
    """A session that fails one chosen command (fault injection); everything else is real.
    after=True runs the command first and then raises (a reply lost after QEMU acted)."""

    def __init__(self, real, command: str, nth: int = 1, exc: Exception | None = None,
                 after: bool = False):
        self.real, self.command, self.nth, self.after = real, command, nth, after
        self.exc = exc or QMPCommandError("injected failure", command=command)
        self.calls = 0

    def execute(self, command, arguments=None, **kw):
        if command == self.command:
            self.calls += 1
            if self.calls == self.nth:
                if self.after:
                    self.real.execute(command, arguments, **kw)
                raise self.exc
        return self.real.execute(command, arguments, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_blockdev_add_failure_is_rolled_back(vm, tmp_path):
    """The second overlay's blockdev-add fails: the first overlay's node and both files go."""
    a, b, da, db = two_disks(vm, tmp_path)
    before = state(vm)
    files = sorted(os.listdir(tmp_path))
    flaky = FailingSession(vm.qmp, "blockdev-add", nth=2)
    with pytest.raises(QMPCommandError, match="injected"):
        snapshot_disks(flaky, {"vda": str(tmp_path / "a.ov.qcow2"),
                               "vdb": str(tmp_path / "b.ov.qcow2")})
    assert flaky.calls == 2
    assert state(vm) == before and sorted(os.listdir(tmp_path)) == files
    with pytest.raises(LiveGraphError, match="used node name"):
        snapshot_disks(vm.qmp, {"vda": str(tmp_path / "a.ov.qcow2"),
                                "vdb": str(tmp_path / "b.ov.qcow2")},
                       node_names={"vda": "ov1", "vdb": "vda0"})
    assert state(vm) == before and sorted(os.listdir(tmp_path)) == files


def test_lost_transaction_reply(vm, tmp_path):
    """The transaction's reply is lost: if QEMU did not apply it, everything is rolled back;
    if it did, the snapshot stands (and the overlay files are kept, QEMU writes them)."""
    a, b, da, db = two_disks(vm, tmp_path)
    before = state(vm)
    files = sorted(os.listdir(tmp_path))
    lost = FailingSession(vm.qmp, "transaction", exc=QMPTimeoutError("injected timeout"))
    with pytest.raises(QMPTimeoutError):
        snapshot_disks(lost, {"vda": str(tmp_path / "a.ov.qcow2"),
                              "vdb": str(tmp_path / "b.ov.qcow2")})
    assert state(vm) == before and sorted(os.listdir(tmp_path)) == files
    late = FailingSession(vm.qmp, "transaction", exc=QMPTimeoutError("injected timeout"),
                          after=True)
    res = snapshot_disks(late, {"vda": str(tmp_path / "a.ov.qcow2"),
                                "vdb": str(tmp_path / "b.ov.qcow2")})
    g = read_graph(vm.qmp)
    assert [g.disk(o.disk).root for o in res.overlays] == [o.node for o in res.overlays]
    assert (tmp_path / "a.ov.qcow2").exists() and (tmp_path / "b.ov.qcow2").exists()


def test_refusals(vm_none, tmp_path):
    setup_disk(vm_none, tmp_path, "d", [A, B], device=False)
    existing = tmp_path / "exists.qcow2"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        snapshot_disks(vm_none.qmp, {"d0": str(existing)})
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(LiveGraphError, match="No disk"):
        snapshot_disks(vm_none.qmp, {"nope": str(tmp_path / "x.qcow2")})
    with pytest.raises(LiveGraphError, match="named twice"):   # d0 is in d1's chain
        snapshot_disks(vm_none.qmp, {"d1": str(tmp_path / "x.qcow2"),
                                     "d0": str(tmp_path / "y.qcow2")})
    with pytest.raises(LiveGraphError, match="given for two disks"):
        setup_disk(vm_none, tmp_path, "e", [A], device=False)
        snapshot_disks(vm_none.qmp, {"d1": str(tmp_path / "x.qcow2"),
                                     "e0": str(tmp_path / "x.qcow2")})
    assert not (tmp_path / "x.qcow2").exists() and not (tmp_path / "y.qcow2").exists()


def test_deviceless_snapshot(vm_none, tmp_path):
    (base,), node = setup_disk(vm_none, tmp_path, "d", [A], device=False)
    model = Model(SIZE, A)
    ov = tmp_path / "d.s1.qcow2"
    res = snapshot_disks(vm_none.qmp, {"d0": str(ov)})
    new_root = res.overlays[0].node
    assert read_graph(vm_none.qmp).disk("d0").node_names == [new_root, "d0"]
    guest_write(vm_none, new_root, model, 0, 1 * MiB, 0x5a)
    vm_none.stop()
    Model(SIZE, A).check(base, tmp_path)
    model.check(ov, tmp_path)
    assert_clean(base, ov)
