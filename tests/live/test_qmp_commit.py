"""Live commit (active and intermediate) and stream against a real QEMU, with guest writes
injected (HMP qemu-io on the virtio-blk device) while the jobs run.  Data is checked after QEMU
has quit, with qemu-img compare and our engine; every file passes qemu-img check."""
from __future__ import annotations

import time

import pytest

import qcow2engine
from qcow2engine.errors import ImageInUseError, JobError
from qmp_bridge import nodes as N
from qmp_bridge.blockjobs import commit, start_commit, start_stream, stream
from qmp_bridge.errors import LiveGraphError, LiveJobError, QMPImageInUseError
from qmp_bridge.graph import read_graph
from tests.helpers.qmp import (MiB, Model, assert_clean, backing_name, guest_write, make_image,
                               setup_disk, written_ok)

SIZE = 32 * MiB
BASE = [(0, 8 * MiB, 0x11), (20 * MiB, 4 * MiB, 0x12)]
# more than one 16 MiB burst of dirty data, so that a job at 1 B/s stays before "ready"
TOP = [(4 * MiB, 10 * MiB, 0x21), (16 * MiB, 8 * MiB, 0x22)]


def chain(vm, disk="vd0"):
    return read_graph(vm.qmp).disk(disk).node_names


def no_jobs(vm):
    return vm.qmp.execute("query-jobs") == []


def test_active_commit_with_writes_before_and_after_ready_then_pivot(vm, tmp_path):
    (base, top), dev = setup_disk(vm, tmp_path, "vd0", [BASE, TOP])
    model = Model(SIZE, BASE + TOP)
    seen = []
    job = start_commit(vm.qmp, "vd0", speed=1)  # 1 B/s: stalls after its first burst
    try:
        guest_write(vm, dev, model, 2 * MiB, 1 * MiB, 0x31)
        guest_write(vm, dev, model, 28 * MiB, 1 * MiB, 0x32)  # a new area
        info = job.info()
        assert info.status == "running" and not info.ready
        g = read_graph(vm.qmp)
        assert [j.id for j in g.jobs] == [job.id] and g.jobs[0].disk == "vd0"
        job.set_speed(0)
        job.wait_ready(progress=lambda cur, tot: seen.append((cur, tot)))
        guest_write(vm, dev, model, 6 * MiB, 1 * MiB, 0x41)   # mirrored while ready
        res = job.finish(pivot=True)
    finally:
        job.close()
    assert res.outcome == "pivoted" and res.error is None
    assert res.removed_nodes == ["vd01"]
    assert seen and seen[-1][0] == seen[-1][1] > 16 * MiB
    assert chain(vm) == ["vd00"] and "vd01" not in read_graph(vm.qmp).nodes
    assert no_jobs(vm)
    guest_write(vm, dev, model, 30 * MiB, 1 * MiB, 0x51)      # lands in base now
    vm.stop()
    written_ok(vm, 4)
    model.check(base, tmp_path)
    assert_clean(base, top)


def test_active_commit_keep_top(vm, tmp_path):
    (base, top), dev = setup_disk(vm, tmp_path, "vd0", [BASE, TOP])
    model = Model(SIZE, BASE + TOP)
    with start_commit(vm.qmp, "vd0") as job:
        job.wait_ready()
        guest_write(vm, dev, model, 1 * MiB, 1 * MiB, 0x61)
        res = job.finish(pivot=False)
    assert res.outcome == "kept-top" and res.removed_nodes == []
    assert chain(vm) == ["vd01", "vd00"]
    vm.stop()
    model.check(top, tmp_path)
    model.check(base, tmp_path)  # the base holds everything too
    assert_clean(base, top)


def test_cancel_before_ready_leaves_the_disk_on_top(vm, tmp_path):
    (base, top), dev = setup_disk(vm, tmp_path, "vd0", [BASE, TOP])
    model = Model(SIZE, BASE + TOP)
    with start_commit(vm.qmp, "vd0", speed=1) as job:
        guest_write(vm, dev, model, 3 * MiB, 1 * MiB, 0x71)
        assert job.info().status == "running"
        res = job.cancel()
    assert res.outcome == "cancelled" and res.error == "Operation canceled"
    assert res.current < res.total
    assert chain(vm) == ["vd01", "vd00"] and no_jobs(vm)
    vm.stop()
    model.check(top, tmp_path)     # the guest view is intact (base may be partly written)
    assert_clean(base, top)


def test_cancel_after_ready(vm, tmp_path):
    (base, top), dev = setup_disk(vm, tmp_path, "vd0", [BASE, TOP])
    model = Model(SIZE, BASE + TOP)
    with start_commit(vm.qmp, "vd0") as job:
        job.wait_ready()
        res = job.cancel()
    assert res.outcome == "cancelled"
    assert chain(vm) == ["vd01", "vd00"] and no_jobs(vm)
    guest_write(vm, dev, model, 9 * MiB, 1 * MiB, 0x72)
    vm.stop()
    model.check(top, tmp_path)
    assert_clean(base, top)


def test_intermediate_commit_keeps_relative_backing_name(vm, tmp_path):
    mid_w = [(10 * MiB, 6 * MiB, 0x33)]
    (base, mid, top), dev = setup_disk(vm, tmp_path, "vd0", [BASE, mid_w, TOP[:1]])
    model = Model(SIZE, BASE + mid_w + TOP[:1])
    job = start_commit(vm.qmp, "vd0", top="vd01", base="vd00", speed=1)
    try:
        guest_write(vm, dev, model, 12 * MiB, 1 * MiB, 0x34)   # into top, over mid's data
        assert job.info().status == "running"
        job.set_speed(0)
        res = job.finish()
    finally:
        job.close()
    assert res.outcome == "completed" and res.removed_nodes == ["vd01"]
    assert chain(vm) == ["vd02", "vd00"]
    vm.stop()
    assert backing_name(top) == "vd00.qcow2"
    model.check(top, tmp_path)
    assert_clean(base, mid, top)


@pytest.mark.parametrize("partial", [True, False], ids=["to-base", "full"])
def test_stream(vm, tmp_path, partial):
    mid_w = [(10 * MiB, 6 * MiB, 0x33)]
    (base, mid, top), dev = setup_disk(vm, tmp_path, "vd0", [BASE, mid_w, TOP[:1]])
    model = Model(SIZE, BASE + mid_w + TOP[:1])
    with start_stream(vm.qmp, "vd0", base="vd00" if partial else None, speed=1) as job:
        guest_write(vm, dev, model, 11 * MiB, 1 * MiB, 0x35)
        job.set_speed(0)
        res = job.run()
    assert res.outcome == "completed"
    if partial:
        assert res.removed_nodes == ["vd01"] and chain(vm) == ["vd02", "vd00"]
    else:
        assert res.removed_nodes == ["vd01", "vd00"] and chain(vm) == ["vd02"]
    vm.stop()
    assert backing_name(top) == ("vd00.qcow2" if partial else None)
    model.check(top, tmp_path)
    assert_clean(base, mid, top)


def test_speed_pause_resume_and_progress(vm, tmp_path):
    setup_disk(vm, tmp_path, "vd0", [BASE, TOP])
    with start_commit(vm.qmp, "vd0", speed=1) as job:
        job.pause()
        assert job.wait_for(("paused",), timeout=5).status == "paused"
        p1 = job.progress()
        time.sleep(0.2)
        assert job.progress() == p1
        assert job.info().paused is True
        job.resume()
        assert job.wait_for(("running", "ready"), timeout=5).status in ("running", "ready")
        job.set_speed(0)
        assert job.info().speed == 0
        job.wait_ready(timeout=10)
        assert job.finish(pivot=True).outcome == "pivoted"


def test_io_error_during_commit_raises_job_error(vm, tmp_path):
    """The base's writes fail (blkdebug injects EIO): JobError with QEMU's error text; the job
    is gone, the disk unchanged."""
    base = make_image(tmp_path / "b.qcow2", SIZE, writes=BASE)
    top = make_image(tmp_path / "t.qcow2", SIZE, backing=base, writes=TOP)
    q = vm.qmp
    q.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "base",
        "file": {"driver": "blkdebug", "node-name": "base-dbg",
                 "inject-error": [{"event": "write_aio", "errno": 5}],
                 "image": {"driver": "file", "filename": str(base)}}})
    N.add_image(q, str(top), "top", backing="base")
    N.attach_device(q, "top", "vd0")
    with pytest.raises(JobError, match="Input/output error") as ei:
        commit(q, "vd0")
    err = ei.value
    assert isinstance(err, LiveJobError) and err.error == "Input/output error"
    assert err.result.outcome == "failed"
    assert chain(vm) == ["top", "base"] and no_jobs(vm)
    # the chain's own view of the base file names the leaf file under blkdebug
    assert read_graph(q).nodes["base"].filename == str(base)
    vm.stop()
    Model(SIZE, BASE + TOP).check(top, tmp_path)
    assert_clean(top)


def test_stop_on_error_then_cancel(vm, tmp_path):
    base = make_image(tmp_path / "b.qcow2", SIZE, writes=BASE)
    top = make_image(tmp_path / "t.qcow2", SIZE, backing=base, writes=TOP)
    q = vm.qmp
    q.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "base",
        "file": {"driver": "blkdebug", "inject-error": [{"event": "write_aio", "errno": 28}],
                 "image": {"driver": "file", "filename": str(base)}}})
    N.add_image(q, str(top), "top", backing="base")
    with start_commit(q, "top", on_error="stop") as job:
        with pytest.raises(LiveJobError, match="stopped on an I/O error"):
            job.finish(timeout=10, pivot=True)
        assert job.info().status == "paused"
        assert job.cancel(timeout=10).outcome == "cancelled"
    assert no_jobs(vm)


def test_base_that_cannot_be_written(vm, tmp_path):
    """Another process (our engine) reads the base with QEMU's locks: QEMU cannot take the
    base's write permission, the commit is refused up front, nothing is left behind."""
    (base, top), dev = setup_disk(vm, tmp_path, "vd0", [BASE, TOP], read_only_backing=True)
    img = qcow2engine.open_image(str(base))
    try:
        with pytest.raises(QMPImageInUseError, match='"write" lock') as ei:
            start_commit(vm.qmp, "vd0")
        assert isinstance(ei.value, ImageInUseError)
    finally:
        img.close()
    assert no_jobs(vm) and chain(vm) == ["vd01", "vd00"]
    assert vm.qmp.listener_count == 0  # the job's listener was unregistered


def test_bad_arguments(vm_none, tmp_path):
    setup_disk(vm_none, tmp_path, "d", [BASE, TOP], device=False)
    q = vm_none.qmp
    with pytest.raises(LiveGraphError, match="No disk or node"):
        start_commit(q, "nope")
    with pytest.raises(LiveGraphError, match="must be below"):
        start_commit(q, "d1", top="d0", base="d1")
    with pytest.raises(LiveGraphError, match="nothing to commit"):
        start_commit(q, "d1", top="d0")
    with pytest.raises(LiveGraphError, match="active layer"):
        start_stream(q, "d1", base="d1")


def test_deviceless_commit_and_stream(vm_none, tmp_path):
    """-machine none: no device to switch.  Active commit completes with the root unchanged
    (nothing removed); stream works on the root node."""
    (base, top), target = setup_disk(vm_none, tmp_path, "d", [BASE, TOP], device=False)
    model = Model(SIZE, BASE + TOP)
    guest_write(vm_none, target, model, 5 * MiB, 1 * MiB, 0x44)
    res = commit(vm_none.qmp, "d1")
    assert res.outcome == "completed" and res.removed_nodes == []
    assert chain(vm_none, "d1") == ["d1", "d0"]
    res = stream(vm_none.qmp, "d1")
    assert res.removed_nodes == ["d0"] and chain(vm_none, "d1") == ["d1"]
    vm_none.stop()
    model.check(top, tmp_path)
    model.check(base, tmp_path)
    assert_clean(base, top)
