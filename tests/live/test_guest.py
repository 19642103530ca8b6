"""The machine snapshot tree on a real Linux guest (Debian's kernel, a busybox initramfs, under
TCG) whose writers put a sequence-numbered, self-checking record on every disk the whole time
(tests/helpers/guest.py).  Every snapshot's data is read by qemu-img and must hold the records
of exactly 1..m for an m between the last sequence printed before the snapshot and the first
printed after it; a revert with memory brings the writers back to exactly that m (their
counters continue from there, no reboot); a disk-only revert booted fresh continues from what
its disks hold; a live --commit and live deletes run while the writers keep writing.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import pytest

from qcow2engine.errors import MachineError
from qcow2engine.tree import Tree
from tests.helpers import guest
from tests.helpers.qemu import assert_clean, qemu_img
from tests.live.test_tree_live import _cli

MiB = 1 << 20
SIZE = 4 * MiB
DISKS = ("vda", "vdb")


class GuestMachine:
    def __init__(self, tmp_path, ndisks=2):
        self.disks = {}
        for d in DISKS[:ndisks]:
            folder = os.path.join(str(tmp_path), d)
            os.makedirs(folder)
            p = os.path.join(folder, d + ".qcow2")
            qemu_img("create", "-q", "-f", "qcow2", p, SIZE, check=True)
            self.disks[d] = p
        self.tree = Tree(os.path.join(str(tmp_path), "state"))
        self.m = self.tree.define("g", self.disks, guest.launch())
        self.serial = None

    def start(self, **kw):
        rt = self.m.start(**kw)
        self.serial = guest.Serial(rt["serial"])
        return rt

    def last(self):
        """The last sequence each disk's writer printed (after at least one more write)."""
        return self.serial.wait_seqs(self.disks, 1, since=self.serial.mark())

    def snap(self, name, **kw):
        """Create a snapshot while the writers run; per disk the bounds of its m."""
        low = self.last()
        r = self.m.create_snapshot(name, **kw)
        assert r.completed
        # the first line printed once it is done: the writer was at most LAG writes past it
        # when the snapshot completed (a mark taken before would let a slow snapshot's writes
        # run past the bound)
        mark = self.serial.mark()
        self.serial.wait_seqs(self.disks, 1, since=mark)
        high = {d: v[0] + guest.LAG for d, v in self.serial.seqs(mark).items()}
        return low, high

    def at(self, name):
        """Per disk, where the snapshot's data is: (image, internal tag or None)."""
        s = self.m.state().snapshot(name)
        return {d: (ds.file, ds.tag) for d, ds in s.disks.items()}

    def verify_snapshot(self, name, low, high):
        out = {}
        for d, (img, tag) in self.at(name).items():
            out[d] = guest.verify(img, d, low[d], high[d], snapshot=tag)
        return out

    def tip(self, d):
        return self.m.state().disk(d).active

    def files(self):
        st = self.m.state()
        return sorted(st.files)

    def check_files(self):
        assert_clean(*self.files(), force_share=True)     # no corruption, no leak

    def close(self):
        if self.m.runtime() is not None:
            self.m.stop(force=True)
        self.tree.close()


def quiet(g):
    """Pause the guest (what the old guest prints no longer mixes with what the machine
    prints after a revert restarted it); the serial mark."""
    g.m.suspend()
    return g.serial.mark()


def stopped(text):
    """Per disk, the sequence its writer stopped at (printed at the power-off)."""
    return {d: int(s) for d, s in re.findall(r"qe-writer (vd\w) stopped seq=(\d+)", text)}


@pytest.fixture
def gm(tmp_path):
    made = []

    def make(**kw):
        g = GuestMachine(tmp_path / ("g%d" % len(made)), **kw)
        made.append(g)
        return g
    yield make
    for g in made:
        g.close()


def test_guest_writes_powers_off_and_continues(gm):
    g = gm()
    g.start()
    g.serial.wait_up()
    g.serial.wait_seqs(g.disks, 10)
    assert g.m.run_state() == "running"
    with pytest.raises(MachineError, match="not paused"):
        g.m.resume()
    g.m.suspend()                               # virsh suspend / resume
    assert g.m.run_state() == "paused"
    with pytest.raises(MachineError, match="already paused"):
        g.m.suspend()
    mark = g.serial.mark()
    time.sleep(1)
    assert g.serial.seqs(mark) == {}            # a paused guest writes nothing
    g.m.resume()
    g.serial.wait_seqs(g.disks, 2, since=mark)
    mark = g.serial.mark()
    assert g.m.stop(timeout=60) == "powered down"      # the guest's own power-off
    text = g.serial.text(mark)
    assert "qe-guest power button" in text and "qe-guest poweroff" in text
    done = stopped(g.serial.text())
    assert set(done) == set(g.disks)
    for d in g.disks:                           # every write the guest finished is there
        assert guest.verify(g.tip(d), d, done[d], done[d]) == done[d]
    g.check_files()
    mark = g.serial.mark()
    g.start()
    g.serial.wait_seqs(g.disks, 3, since=mark)
    assert g.serial.starts(mark) == {d: [done[d]] for d in g.disks}
    seqs = g.serial.seqs(mark)
    assert all(seqs[d][:3] == [done[d] + 1, done[d] + 2, done[d] + 3] for d in g.disks)


def test_guest_snapshot_tree(gm):
    g = gm()
    g.start()
    g.serial.wait_up()

    # snapshots of each kind while the writers run
    lo, hi = g.snap("a")                                    # internal with memory (default)
    ma = g.verify_snapshot("a", lo, hi)
    g.last()

    def back_at(name, m_at, mark):
        """After a revert with memory: no boot, each writer continues from exactly m_at."""
        g.serial.wait_seqs(g.disks, 3, since=mark)
        text = g.serial.text(mark)
        assert "qe-guest up" not in text and "start=" not in text, text[-2000:]
        for d, seqs in g.serial.seqs(mark).items():
            # the lines still in the guest's tty at S come first, then m_at + 1, m_at + 2...
            assert m_at[d] - guest.LAG <= seqs[0] <= m_at[d] + 1, (name, d, m_at[d], seqs[:8])
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (name, d, seqs[:8])

    # revert to the internal snapshot with memory (snapshot-load), as it was: running
    mark = quiet(g)
    g.m.revert("a")
    assert g.m.run_state() == "running"
    back_at("a", ma, mark)

    lo, hi = g.snap("b", disk_only=True)                    # external, disks only
    mb = g.verify_snapshot("b", lo, hi)
    assert all(mb[d] > ma[d] for d in g.disks)
    folder = os.path.dirname(g.disks["vda"])
    lo, hi = g.snap("c", memspec=os.path.join(folder, "c.mem"))    # external with memory
    mc = g.verify_snapshot("c", lo, hi)
    lo, hi = g.snap("d", memspec=os.path.join(folder, "d.mem"), live=True)
    md = g.verify_snapshot("d", lo, hi)
    docs = {s["name"]: s for s in g.m.snapshots()}
    assert [docs[n]["memory"] for n in "abcd"] == ["internal", "no", "external", "external"]
    assert [docs[n]["state"] for n in "abcd"] == ["running", "disk-snapshot", "running",
                                                   "running"]
    g.last()

    # revert with memory, paused: the disks are exactly at c, the guest does not run
    mark = quiet(g)
    r = g.m.revert("c", running=False)
    assert r.auto_snapshot and g.m.run_state() == "paused"
    tip_auto = r.auto_snapshot
    for d in g.disks:
        assert guest.verify(g.tip(d), d, mc[d], mc[d]) == mc[d]
    assert g.serial.seqs(mark) == {}
    g.m.resume()
    back_at("c", mc, mark)

    # a disk-only snapshot: shut off, unless booted fresh; the writers go on from b's data
    with pytest.raises(Exception, match="force"):
        g.m.revert("b")
    mark = quiet(g)
    g.m.revert("b", force=True, running=True)
    g.serial.wait_seqs(g.disks, 2, since=mark)
    assert "qe-guest up" in g.serial.text(mark)
    assert g.serial.starts(mark) == {d: [mb[d]] for d in g.disks}
    assert all(v[0] == mb[d] + 1 for d, v in g.serial.seqs(mark).items())

    # follow d: its overlay as it was left when we reverted to c (the automatic snapshot of
    # that tip is a label on it), booted fresh
    left = {d: guest.verify(g.at(tip_auto)[d][0], d) for d in g.disks}
    assert all(left[d] > md[d] for d in g.disks)
    mark = quiet(g)
    g.m.revert("d", mode="follow", force=True, running=True)
    g.serial.wait_seqs(g.disks, 2, since=mark)
    assert g.serial.starts(mark) == {d: [left[d]] for d in g.disks}

    # a disk-only snapshot e of that branch, then a live commit of e's overlay into e's base
    # while the writers keep writing: no restart
    chains = {d: g.m.state().chain(g.tip(d)) for d in g.disks}
    lo, hi = g.snap("e", disk_only=True)
    me = g.verify_snapshot("e", lo, hi)
    assert all(me[d] > left[d] for d in g.disks)
    g.last()
    mark = g.serial.mark()
    files_before = set(g.files())
    r = g.m.revert("e", mode="commit")
    assert r.completed and g.m.run_state() == "running"
    g.serial.wait_seqs(g.disks, 3, since=mark)
    assert "qe-guest up" not in g.serial.text(mark)
    st = g.m.state()
    for d in g.disks:
        # as short as right after e was taken: e's base (now the merged state) and a fresh
        # overlay on it
        ch = st.chain(st.disk(d).active)
        assert ch[1:] == chains[d] and st.snapshot("e").disks[d].file == ch[1], (ch, chains[d])
    assert len(g.files()) == len(files_before)      # the merged overlay went, a fresh one came

    # a live delete of c (a merge of files the guest's chain goes through)
    mark = g.serial.mark()
    g.m.delete("c")
    g.serial.wait_seqs(g.disks, 2, since=mark)
    assert "qe-guest up" not in g.serial.text(mark)
    assert not os.path.exists(os.path.join(folder, "c.mem"))
    assert g.m.check() == []

    # stop; every disk holds exactly what its writer finished; every snapshot still reads
    mark = g.serial.mark()
    assert g.m.stop() == "powered down"
    done = stopped(g.serial.text(mark))
    for d in g.disks:
        assert guest.verify(g.tip(d), d, done[d], done[d]) == done[d]
    for name, want in (("a", ma), ("b", mb), ("d", md)):
        for d, (img, tag) in g.at(name).items():
            assert guest.verify(img, d, snapshot=tag) == want[d], (name, d)
    for d, (img, _) in g.at("e").items():          # e now holds what its overlay had
        assert guest.verify(img, d) > me[d]
    g.check_files()


def _job_running(g, timeout=60.0):
    from qmp_bridge.client import QMPSession
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with QMPSession.attach(g.m.runtime()["qmp"]) as s:
            jobs = s.execute("query-jobs")
            if jobs:
                return jobs[0]["id"]
        time.sleep(0.05)
    raise AssertionError("no job started")


def test_guest_live_commit_cancel_kill_and_qemu_death(gm):
    """A live --commit while the writers write: cancelled half-way (the guest runs on an
    intact chain) and resumed; our process killed -9 mid-job, then machine recover; QEMU killed
    mid-job, recovered offline and booted again: nothing any writer finished is lost."""
    from qmp_bridge.client import QMPSession
    g = gm()
    g.start()
    g.serial.wait_up()
    g.snap("s", disk_only=True)
    g.serial.wait_seqs(g.disks, guest.N + 5, since=g.serial.mark())   # every block rewritten

    # cancelled at the first progress report, then the same command again
    ev = threading.Event()
    mark = g.serial.mark()
    r = g.m.revert("s", mode="commit", speed=256 << 10,
                   progress=lambda done, total: ev.set(), cancel=ev)
    assert r.outcome == "cancelled" and g.m.state().snapshots["s"].merging
    assert g.m.run_state() == "running" and g.m.check() == []
    g.serial.wait_seqs(g.disks, 3, since=mark)
    for d in g.disks:                           # the chain QEMU runs on is intact
        guest.verify(g.tip(d), d, g.serial.last()[d])
    r = g.m.revert("s", mode="commit")
    assert r.completed and not g.m.state().snapshots["s"].merging
    assert "qe-guest up" not in g.serial.text(mark)

    # kill -9 of our process while QEMU runs the merge, then machine recover
    g.snap("t", disk_only=True)
    g.serial.wait_seqs(g.disks, guest.N + 5, since=g.serial.mark())
    p = subprocess.Popen(_cli(g, "snapshot-revert", "g", "t", "--commit", "--bandwidth",
                              str(64 << 10)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        job = _job_running(g)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert g.m.info()["operation"] is not None
    with QMPSession.attach(g.m.runtime()["qmp"]) as s:
        s.execute("block-job-set-speed", {"device": job, "speed": 0})
    assert g.m.recover() == "rolled forward"
    assert g.m.run_state() == "running" and g.m.check() == []
    st = g.m.state()
    for d in g.disks:
        assert st.chain(st.disk(d).active)[1] == st.snapshots["t"].disks[d].file

    # QEMU killed mid-job: recovered offline; booted again, each writer goes on from its disk
    g.snap("u", disk_only=True)
    g.serial.wait_seqs(g.disks, guest.N + 5, since=g.serial.mark())
    p = subprocess.Popen(_cli(g, "snapshot-revert", "g", "u", "--commit", "--bandwidth",
                              str(64 << 10)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pid = g.m.runtime()["pid"]
    _job_running(g)
    last = g.serial.last()
    os.kill(pid, signal.SIGKILL)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and b"pending" in err, err
    assert g.m.run_state() == "shut off"
    assert g.m.recover() == "rolled forward"
    assert g.m.check() == []
    held = {d: guest.verify(g.tip(d), d, last[d]) for d in g.disks}
    g.check_files()
    mark = g.serial.mark()
    g.start()
    g.serial.wait_seqs(g.disks, 2, since=mark)
    assert g.serial.starts(mark) == {d: [held[d]] for d in g.disks}
    mark = g.serial.mark()
    assert g.m.stop() == "powered down"
    done = stopped(g.serial.text(mark))
    for d in g.disks:
        assert guest.verify(g.tip(d), d, done[d], done[d]) == done[d]
    g.check_files()
