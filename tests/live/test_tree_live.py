"""Machine snapshot trees on a running machine: the offline scenarios again with the machine's
QEMU running (`machine start`), its disks written through QEMU (qemu-io inside QEMU on the
virtio device, as a guest writes), and after every step every disk and every snapshot checked
against the model by QEMU's tools (each device flushed first, then read with -U; qemu-img
check -U on every file), QEMU's graph against the tree, and the memory files against the
snapshots.  Reverts restart QEMU (with the memory of the snapshot where it has one); merges run
as live commit/stream jobs.  The same scenario offline gives the same tree.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from qcow2engine.errors import MachineError
from qmp_bridge.client import QMPSession
from qmp_bridge.nodes import qemu_io
from qmp_bridge.graph import read_graph
from tests.helpers.machine import SLOT, Env, verify
from tests.interop.test_tree_scenarios import seed

MiB = 1 << 20
SIZE = 4 * MiB
LAUNCH = {"memory": "64M", "accel": "tcg"}


class LiveEnv(Env):
    """Env on a running machine."""

    def session(self):
        rt = self.m.runtime()
        assert rt is not None, "the machine is not running"
        return QMPSession.attach(rt["qmp"])

    def write(self, disk, slot, pattern, length=SLOT):
        with self.session() as s:
            qemu_io(s, "/machine/peripheral/%s/virtio-backend" % disk,
                    "write -P %d %d %d" % (pattern, slot * SLOT, length))
        self.model.wrote(disk, slot, pattern)
        if self.model.live is not None:
            import copy
            self.model.branch[self.model.live] = copy.deepcopy(self.model.tip)

    def create(self, name, kind=None, **kw):
        kind = kind or self.kind
        if kind == "external":
            kw.setdefault("memspec", os.path.join(self.folders[0], "%s.mem" % name))
        elif kind == "disk-only":
            kw.setdefault("disk_only", True)
        r = self.m.create_snapshot(name, **kw)
        assert r.completed
        kinds = {d: ds["snapshot"] for d, ds in
                 next(s for s in self.m.snapshots() if s["name"] == name)["disks"].items()}
        self.model.created(name, kinds)
        self.verify()
        return r

    def revert(self, name, mode="reset", *, expect_auto=None, **kw):
        snap = self.m.state().snapshot(name)
        # losing the running guest is asked for with force, except for --commit, where
        # force also deletes what depends on the base (a refusal then leaves all as it was)
        if (snap.memory == "no" and mode == "reset") or mode == "follow":
            kw.setdefault("force", True)
        if snap.memory == "no" or mode != "reset":
            kw.setdefault("running", True)
        if expect_auto is None:
            stays = mode != "reset" and self.model.live == name
            expect_auto = kw.get("auto_snapshot", True) and not stays and not (
                mode == "reset" and name == self.model.current)
        r = Env.revert(self, name, mode, expect_auto=expect_auto, **kw)
        assert self.m.run_state() == "running"
        return r

    def verify(self):
        m = self.m
        if m.runtime() is not None:
            with self.session() as s:
                for d in self.model.disks:
                    qemu_io(s, "/machine/peripheral/%s/virtio-backend" % d, "flush")
                g = read_graph(s)
            st = m.state()
            for d in st.disks:          # QEMU runs on what the tree says
                assert [n.filename for n in g.disk(d.name).chain] == st.chain(d.active)
            verify(m, self.model, self.folders, force_share=True)
        else:
            verify(m, self.model, self.folders)
        st = m.state()
        mems = {os.path.join(f, x) for f in self.folders for x in os.listdir(f)
                if x.endswith(".mem")}
        want = {s.memfile for s in st.snapshots.values() if s.memory == "external"}
        assert mems == want, ("memory files", sorted(mems), sorted(want))


def make_live(tmp_path, kind, ndisks=2, size=SIZE, start=True):
    from tests.helpers.machine import make_machine
    e = make_machine(tmp_path, ndisks, kind, size, launch=LAUNCH, env=LiveEnv)
    if start:
        e.m.start()
    return e


@pytest.fixture
def live(tmp_path):
    made = []

    def make(kind="internal", **kw):
        e = make_live(tmp_path / ("m%d" % len(made)), kind, **kw)
        made.append(e)
        return e
    yield make
    for e in made:
        if e.m.runtime() is not None:
            e.m.stop(force=True)
        e.tree.close()


def shape(m):
    """The tree without the automatic snapshots' names (their time differs)."""
    docs = m.snapshots()
    auto = {d["name"]: "AUTO" for d in docs if d["auto"]}
    return sorted((auto.get(d["name"], d["name"]), auto.get(d["parent"], d["parent"]),
                   tuple(sorted((k, v["snapshot"]) for k, v in d["disks"].items())))
                  for d in docs)


@pytest.mark.parametrize("kind", ["internal", "external", "disk-only"])
def test_live_seed_tree_matches_offline(live, tmp_path, kind):
    e = live(kind)
    seed(e)
    docs = {d["name"]: d for d in e.m.snapshots()}
    want_mem = {"internal": "internal", "external": "external", "disk-only": "no"}[kind]
    for n in "abcde":
        assert docs[n]["memory"] == want_mem
        assert docs[n]["state"] == ("disk-snapshot" if kind == "disk-only" else "running")
    # the same sequence offline: the same tree
    from tests.helpers.machine import make_machine
    off = make_machine(tmp_path / "offline", 2, "internal" if kind == "internal" else "external")
    seed(off)
    assert shape(off.m) == shape(e.m)
    # and the machine can be stopped and the tree checks clean with QEMU gone
    e.m.stop(force=True)
    e.verify()


def test_live_delete_merges_with_jobs(live):
    e = live("disk-only")
    e.write("vda", 0, 1); e.create("s1")
    e.write("vda", 1, 2); e.write("vdb", 1, 22); e.create("s2")
    e.write("vda", 2, 3); e.create("s3")
    e.write("vdb", 3, 24)
    before = {d.name: e.m.state().chain(d.active) for d in e.m.state().disks}
    assert all(len(c) == 4 for c in before.values())
    e.delete("s2")          # a middle file merges (stream or intermediate commit, live)
    e.write("vda", 3, 4)
    e.delete("s3")          # the active image merges down (active commit + pivot)
    e.write("vda", 4, 5)
    e.delete("s1")
    after = {d.name: e.m.state().chain(d.active) for d in e.m.state().disks}
    assert all(len(c) < 4 for c in after.values()), after
    assert e.m.run_state() == "running"


def test_live_internal_snapshot_delete_and_revert(live):
    e = live("internal")
    e.write("vda", 0, 1); e.create("i1")
    e.write("vda", 1, 2); e.write("vdb", 2, 3); e.create("i2")
    e.write("vda", 3, 4)
    e.delete("i1")                  # a tag deleted live in the running image
    e.revert("i2")                  # memory restored with snapshot-load
    e.write("vdb", 4, 5)
    r = e.revert("i2")              # again: an undo (the current snapshot), no tip kept
    assert r.auto_snapshot is None
    e.write("vdb", 4, 6); e.create("i3")
    e.write("vda", 5, 7)
    r = e.revert("i2")              # the running tip is kept, with its memory
    auto = e.m.state().snapshot(r.auto_snapshot)
    assert auto.memory == "external" and os.path.isfile(auto.memfile)
    assert auto.vm_state == "running"
    e.revert(r.auto_snapshot)       # and comes back with it
    assert e.m.run_state() == "running"


def test_revert_of_a_running_machine_to_disk_only_needs_force(live):
    e = live("disk-only")
    e.write("vda", 0, 1); e.create("s1")
    e.write("vda", 1, 2)
    with pytest.raises(MachineError, match="use --force"):
        e.m.revert("s1")
    e.verify()                      # nothing changed
    r = e.m.revert("s1", force=True)
    assert r.run_state == "shut off" and e.m.runtime() is None
    e.model.reverted("s1", "reset", r.auto_snapshot)
    e.verify()
    e.m.start()
    e.write("vdb", 2, 3)
    e.verify()


def _fill(e, disk, mib):
    with e.session() as s:
        qemu_io(s, "/machine/peripheral/%s/virtio-backend" % disk,
                "write -P 7 0 %dM" % mib)
    for slot in range(mib * MiB // SLOT):
        e.model.wrote(disk, slot, 7)


def test_live_commit_cancelled_then_resumed(live):
    e = live("disk-only", ndisks=1, size=64 * MiB)
    e.write("vda", 0, 1); e.create("s")
    _fill(e, "vda", 48)
    e.model.branch["s"] = {d: dict(v) for d, v in e.model.tip.items()}
    ev = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        ev.set()                        # cancel at the first report
    r = e.m.revert("s", mode="commit", progress=progress, cancel=ev, speed=8 * MiB)
    assert r.outcome == "cancelled" and seen
    st = e.m.state()
    assert st.snapshots["s"].merging
    assert e.m.run_state() == "running"     # the guest never stopped
    with e.session() as s:                  # still on the overlay, intact
        g = read_graph(s)
        assert [n.filename for n in g.disk("vda").chain] == st.chain(st.disk("vda").active)
    e.write("vda", 60 * MiB // SLOT, 9)     # the guest goes on writing
    e.model.branch["s"] = {d: dict(v) for d, v in e.model.tip.items()}
    r = e.m.revert("s", mode="commit")
    assert r.completed and r.run_state == "running"
    e.model.committed("s", False, r.auto_snapshot)
    e.verify()
    st = e.m.state()
    ch = st.chain(st.disk("vda").active)    # s's merged base and a fresh overlay on it
    assert len(ch) == 2 and ch[1] == st.snapshots["s"].disks["vda"].file, ch
    e.write("vda", 2, 3)
    e.verify()


def _cli(e, *args):
    return [sys.executable, "-m", "qcow2engine", "--state-dir", e.tree.store.dir] + list(args)


def test_kill_during_a_live_commit_then_recover(live):
    """kill -9 of our process while QEMU runs the merge job: `machine recover` finds the job
    in QEMU (its id comes from the journal's step) and finishes it; nothing is lost."""
    e = live("disk-only", ndisks=1, size=64 * MiB)
    e.write("vda", 0, 1); e.create("s")
    _fill(e, "vda", 32)
    p = subprocess.Popen(_cli(e, "snapshot-revert", "m", "s", "--commit", "--bandwidth",
                              str(2 * MiB)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:         # wait until QEMU runs the job
            with e.session() as s:
                if s.execute("query-jobs"):
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("no job started: %r" % (p.communicate(),))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert e.m.info()["operation"] is not None      # pending
    with e.session() as s:
        assert s.execute("query-jobs")              # QEMU still runs it
        s.execute("block-job-set-speed", {"device": s.execute("query-jobs")[0]["id"],
                                          "speed": 0})
    assert e.m.recover() == "rolled forward"
    e.model.committed("s", False, None)
    e.verify()
    with e.session() as s:
        assert s.execute("query-jobs") == []


def test_qemu_killed_mid_commit_is_recovered_offline(live):
    e = live("disk-only", ndisks=1, size=64 * MiB)
    e.write("vda", 0, 1); e.create("s")
    _fill(e, "vda", 32)
    p = subprocess.Popen(_cli(e, "snapshot-revert", "m", "s", "--commit", "--bandwidth",
                              str(2 * MiB)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pid = e.m.runtime()["pid"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with e.session() as s:
            if s.execute("query-jobs"):
                break
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)                    # QEMU dies mid-job
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and b"pending" in err, err
    notes = []
    e.m.notice = notes.append
    assert e.m.run_state() == "shut off" and notes   # noticed
    assert e.m.recover() == "rolled forward"          # offline: the commit done again
    e.model.committed("s", False, None)
    e.verify()


def test_attach_and_launch_errors(live, tmp_path):
    e = live("disk-only", start=False)
    with pytest.raises(MachineError, match="not running"):
        e.m.stop()
    e.m.start(paused=True)
    assert e.m.run_state() == "paused"
    with pytest.raises(MachineError, match="already running"):
        e.m.start()
    rt = e.m.runtime()
    # forget the runtime, then attach to the same QEMU as if it had been started elsewhere
    e.tree.store.set_runtime("m", None)
    e.m.attach(rt["qmp"])
    assert e.m.runtime()["launched"] is False and e.m.runtime()["pid"] == rt["pid"]
    e.write("vda", 0, 1)
    e.create("s1")
    # an attached machine without a launch definition cannot be restarted by a revert
    st = e.m.state()
    st.launch = None
    e.tree.store.save(st)
    with pytest.raises(MachineError, match="no launch definition"):
        e.m.revert("s1", force=True)
    e.verify()


@pytest.mark.parametrize("seed,kind", [(1, "external"), (2, "internal"), (3, "disk-only")])
def test_live_random_sequences(live, seed, kind):
    """tests/interop/test_tree_random.py's sequences on a running machine: every step checked
    against the model; a refused verb changes nothing."""
    from tests.interop.test_tree_random import run_sequence
    e = live(kind, size=1 << 20)

    def running():
        assert e.m.run_state() == "running"
    run_sequence(e, seed, 24, running)


def test_qemu_changed_behind_the_tree_is_found(live):
    """Another client switches a disk onto its own overlay: machine check names it and the
    verbs refuse (nothing touched) until the tree and QEMU agree."""
    from qcow2engine.errors import MachineInconsistentError
    from qmp_bridge.snapshot import snapshot_disks
    e = live("disk-only")
    e.write("vda", 0, 1); e.create("s1")
    other = os.path.join(e.folders[0], "other.qcow2")
    with e.session() as s:
        snapshot_disks(s, {"vda": other})
    found = e.m.check()
    assert len(found) == 1 and found[0].disk == "vda" and "runs on" in found[0].message, found
    before = e.m.state()
    with pytest.raises(MachineInconsistentError, match="runs on"):
        e.m.create_snapshot("s2", disk_only=True)
    assert e.m.state() == before


def test_qemu_dies_while_saving_memory(live, monkeypatch):
    """QEMU dies after the disks switched, while the memory goes to its file: the next
    command finds the machine shut off, finishes the snapshot offline and keeps it without
    memory (the disks' state at S is all there is)."""
    import qmp_bridge.tree_backend as tb
    e = live("external")
    e.write("vda", 0, 1); e.create("a")
    e.write("vdb", 1, 2)
    pid = e.m.runtime()["pid"]
    real = tb.migrate_out

    def dying(s, path, *a, **kw):
        os.kill(pid, signal.SIGKILL)
        return real(s, path, *a, **kw)
    monkeypatch.setattr(tb, "migrate_out", dying)
    with pytest.raises(Exception):
        e.m.create_snapshot("b", memspec=os.path.join(e.folders[0], "b.mem"))
    monkeypatch.setattr(tb, "migrate_out", real)
    assert e.m.recover() == "rolled forward"
    assert e.m.run_state() == "shut off"
    b = e.m.state().snapshot("b")
    assert b.memory == "no" and b.memfile is None
    e.model.created("b", {"vda": "external", "vdb": "external"})
    e.verify()                                  # no stray memory file either
    e.m.start()
    e.write("vda", 2, 3)
    e.revert("a")                               # a keeps its memory
