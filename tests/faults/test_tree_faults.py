"""Crash safety of the machine verbs: an error and a simulated crash at every file write,
flush, file removal and database commit (a deterministic sample past the first ones) of
create, revert (reset, follow, commit, with discard), delete (merging files away) — then
`machine recover` — leave every disk and every snapshot exactly in the old or the new state,
judged by QEMU's tools against the model (tests/helpers/machine.verify).  And a real kill -9
of a long `snapshot-revert --commit` process, then recover."""
from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from qcow2engine.tree import Tree
from tests.helpers.faultinject import SimulatedCrash, inject, injection_points
from tests.helpers.machine import Env, make_machine, verify

FIXED_NOW = 1796230000.0


class _Clock:
    """plan.py's clock, fixed: automatic snapshot names are the same in every run."""
    def time(self):
        return FIXED_NOW

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    import qcow2engine.tree.plan as plan
    monkeypatch.setattr(plan, "time", _Clock())


def _ext_chain(e):
    e.write("vda", 0, 1); e.write("vdb", 0, 2); e.create("a")
    e.write("vda", 1, 3); e.create("b")
    e.write("vda", 2, 4); e.write("vdb", 2, 5)


def _int_chain(e):
    e.write("vda", 0, 1); e.write("vdb", 0, 2); e.create("a")
    e.write("vda", 1, 3); e.create("b")
    e.write("vda", 2, 4); e.write("vdb", 2, 5)


# name -> (kind of snapshots, setup(env), op(env) that runs the verb and updates the model)
SCENARIOS = {
    "create_internal": ("internal", _int_chain, lambda e: e.create("c")),
    "create_external": ("external", _ext_chain, lambda e: e.create("c")),
    "reset_internal_auto": ("internal", _int_chain, lambda e: e.revert("a")),
    "reset_external_auto": ("external", _ext_chain, lambda e: e.revert("a")),
    "follow_external": ("external", lambda e: (_ext_chain(e), e.revert("a")),
                        lambda e: e.revert("b", "follow")),
    "commit_discard": ("external", _ext_chain, lambda e: e.revert("b", "commit", discard=True)),
    "commit": ("external", _ext_chain, lambda e: e.revert("b", "commit")),
    "delete_external_middle": ("external", lambda e: (_ext_chain(e), e.create("c")),
                               lambda e: e.delete("b")),
    "delete_internal": ("internal", _int_chain, lambda e: e.delete("a")),
    # b's base (a's overlay) is shared by b's branch and b2's: flattened into both
    "delete_flatten": ("external", lambda e: (_ext_chain(e), e.revert("b"), e.write("vdb", 3, 6),
                                              e.create("b2")),
                       lambda e: e.delete("b", flatten=True)),
    "delete_children": ("external", lambda e: (_ext_chain(e), e.create("c")),
                        lambda e: e.delete("a", children=True)),
    "reset_discard_internal": ("internal", _int_chain,
                               lambda e: e.revert("a", discard=True)),
    "internal_under_overlay": ("internal", lambda e: (_int_chain(e), e.create("x", "external"),
                                                      e.write("vda", 4, 9)),
                               lambda e: e.revert("a")),
}


def _restore(src, dst):
    shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)


def _old_or_new(m, folders, old, new):
    try:
        verify(m, old, folders)
        return "old"
    except AssertionError as e1:
        try:
            verify(m, new, folders)
            return "new"
        except AssertionError as e2:
            raise AssertionError("neither the old state (%s) nor the new (%s)" % (e1, e2))


@pytest.mark.parametrize("kind", ["error", "crash"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_tree_fault_injection(tmp_path, name, kind):
    snap_kind, setup, op = SCENARIOS[name]
    work = tmp_path / "w"
    work.mkdir()
    e = make_machine(work, 2, snap_kind)
    setup(e)
    e.tree.close()
    orig = tmp_path / "orig"
    shutil.copytree(work, orig, symlinks=True)
    old = copy.deepcopy(e.model)
    # the reference run: the new state, and how many calls it makes
    e2 = Env(Tree(str(work / "state")), None, copy.deepcopy(old), e.folders, snap_kind)
    e2.m = e2.tree.machine("m")
    with inject(None, paths=e.folders) as inj:
        op(e2)
    n = inj.count
    assert {c.name for c in inj.calls} >= {"db_commit"}, "database commits are not counted"
    new = e2.model
    e2.tree.close()
    outcomes = {"old": 0, "new": 0}
    for point in injection_points(n, first=6, sample=8, seed=hash(name) & 0xffff):
        _restore(orig, work)
        t = Tree(str(work / "state"))
        try:
            run = Env(t, t.machine("m"), copy.deepcopy(old), e.folders, snap_kind)
            # the image folders are dropped at a crash as a dead process's fds would be; the
            # database connection is closed instead (SQLite keeps what was committed, drops
            # the rest: as at a process death) and the machine lock goes with it
            with inject(point, kind, paths=e.folders) as inj:
                try:
                    op(run)
                except (SimulatedCrash, Exception):      # noqa: BLE001 - judged below
                    pass
            assert inj.triggered is not None, "the fault at call %d never came" % point
        finally:
            t.close()
        # the next process: recover, then old or new
        with Tree(str(work / "state")) as t2:
            m2 = t2.machine("m")
            m2.recover()
            assert m2.info()["operation"] is None
            try:
                outcomes[_old_or_new(m2, e.folders, old, new)] += 1
            except AssertionError as err:
                raise AssertionError("fault %s at call %d (%s): %s"
                                     % (kind, point, inj.triggered, err)) from None
    assert sum(outcomes.values()) > 0


def test_kill_9_during_commit_then_recover(tmp_path):
    """A real process killed (SIGKILL) while `snapshot-revert --commit -p` copies."""
    e = make_machine(tmp_path, 2, "external", size=128 << 20)
    e.write("vda", 0, 1); e.create("a")
    from tests.helpers.machine import SLOT
    from tests.helpers.qemu import qemu_io
    active = e.m.info()["disks"][0]["active"]
    qemu_io(active, "write -P 7 0 96M", fmt=None)            # much to merge
    for slot in range((96 << 20) // SLOT):
        e.model.tip["vda"][slot] = 7
    e.model.changed = True
    e.model.branch["a"] = copy.deepcopy(e.model.tip)        # (as MachineModel.write does)
    old = copy.deepcopy(e.model)
    new = copy.deepcopy(e.model)
    new.committed("a", False, None)
    state = e.tree.store.dir
    e.tree.close()
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.Popen([sys.executable, "-m", "qcow2engine", "--state-dir", state,
                          "snapshot-revert", "m", "a", "--commit", "-p"],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    buf = b""
    while b"/100%" not in buf and p.poll() is None:     # the merge is copying
        buf += os.read(p.stderr.fileno(), 64)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, (p.returncode, buf)
    with Tree(state) as t:
        m = t.machine("m")
        assert m.info()["operation"] is not None         # the journal shows the operation
        r = m.recover()
        assert r in (None, "rolled back", "rolled forward")
        got = _old_or_new(m, e.folders, old, new) if not _merging(m) else "merging"
        if got == "merging":
            # rolled back to "as after a cancel": the same command resumes and completes
            res = m.revert("a", mode="commit")
            assert res.completed
            verify(m, new, e.folders)


def _merging(m):
    return any(s["merging"] for s in m.snapshots())


def test_verb_after_a_crash_finishes_the_pending_operation_first(tmp_path, capsys):
    """A crash leaves the operation pending: `machine info` shows it, the listing verbs work,
    and the next mutating verb finishes it (saying so on stderr) before doing its own."""
    import json
    from qcow2engine.cli.main import main
    from tests.helpers.faultinject import count_calls
    work = tmp_path / "w"
    work.mkdir()
    e = make_machine(work, 2, "external")
    _ext_chain(e)
    e.tree.close()
    orig = tmp_path / "orig"
    shutil.copytree(work, orig, symlinks=True)
    sd = str(work / "state")
    with Tree(sd) as t:
        n = count_calls(lambda: t.machine("m").revert("a"), paths=e.folders)
    _restore(orig, work)
    t = Tree(sd)
    with inject(n - 2, "crash", paths=e.folders) as inj:   # its steps done, not yet saved
        try:
            t.machine("m").revert("a")
        except SimulatedCrash:
            pass
    assert inj.crashed
    t.close()
    assert main(["--state-dir", sd, "machine", "info", "m", "--output=json"]) == 0
    assert json.loads(capsys.readouterr().out)["operation"]["kind"] == "revert"
    assert main(["--state-dir", sd, "snapshot-list", "m", "--tree"]) == 0
    capsys.readouterr()
    assert main(["--state-dir", sd, "snapshot-create-as", "m", "z", "--disk-only"]) == 0
    err = capsys.readouterr().err
    assert "unfinished operation was rolled" in err, err
    with Tree(sd) as t2:
        m2 = t2.machine("m")
        assert m2.info()["operation"] is None
        assert {"a", "b", "z"} <= {s["name"] for s in m2.snapshots()}
        assert m2.check() == []


@pytest.mark.parametrize("kind", ["error", "crash"])
def test_database_only_verbs(tmp_path, kind):
    """define, snapshot-current NAME, delete --metadata and undefine are one database
    transaction each: a fault at it leaves the old state or the new one, nothing between."""
    e = make_machine(tmp_path, 2, "external")
    _ext_chain(e)
    sd = str(tmp_path / "state")
    e.tree.close()
    other = tmp_path / "o"
    other.mkdir()
    from tests.helpers.qemu import qemu_img
    qemu_img("create", "-q", "-f", "qcow2", str(other / "x.qcow2"), 1 << 20, check=True)
    verbs = {
        "define": (lambda t: t.define("m2", {"vda": str(other / "x.qcow2")}),
                   lambda t: "m2" in t.names()),
        "set_current": (lambda t: t.machine("m").set_current("a"),
                        lambda t: t.machine("m").current() == "a"),
        "delete_metadata": (lambda t: t.machine("m").delete("b", metadata=True),
                            lambda t: "b" not in {s["name"] for s in t.machine("m").snapshots()}),
        "undefine": (lambda t: t.undefine("m"), lambda t: "m" not in t.names()),
    }
    for name, (verb, done) in verbs.items():
        with Tree(sd) as t:
            before = {n: t.machine(n).state() for n in t.names()}
        t = Tree(sd)
        with inject(0, kind, paths=[str(tmp_path)]) as inj:
            try:
                verb(t)
            except (SimulatedCrash, Exception):       # noqa: BLE001 - judged below
                pass
        assert inj.triggered is not None and inj.triggered.name == "db_commit", (name, inj.calls)
        t.store.conn.close()
        with Tree(sd) as t2:
            after = {n: t2.machine(n).state() for n in t2.names()}
            assert after == before, name           # the commit never happened: the old state
            verb(t2)                               # and done again, it is the new state
            assert done(t2), name
            for n in t2.names():
                assert t2.machine(n).check() == []


def test_sigint_cancels_commit_and_the_same_command_resumes(tmp_path):
    """Ctrl-C (SIGINT) during `snapshot-revert --commit -p`: exit 1 with one line, the tip
    intact, the snapshot marked merging; the same command then completes."""
    e = make_machine(tmp_path, 2, "external", size=128 << 20)
    e.write("vda", 0, 1); e.create("a")
    from tests.helpers.machine import SLOT
    from tests.helpers.qemu import qemu_io, guest_bytes
    active = e.m.info()["disks"][0]["active"]
    qemu_io(active, "write -P 7 0 96M", fmt=None)
    for slot in range((96 << 20) // SLOT):
        e.model.tip["vda"][slot] = 7
    e.model.changed = True
    e.model.branch["a"] = copy.deepcopy(e.model.tip)
    tip = {d: e.model.expect(e.model.tip[d]) for d in e.model.disks}
    state = e.tree.store.dir
    e.tree.close()
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    argv = [sys.executable, "-m", "qcow2engine", "--state-dir", state, "snapshot-revert", "m",
            "a", "--commit", "-p"]
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    buf = b""
    while b"/100%" not in buf and p.poll() is None:
        buf += os.read(p.stderr.fileno(), 64)
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    p.wait()
    err = (buf + rest).decode()
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("qcow2engine:")]
    with Tree(state) as t:
        m = t.machine("m")
        if p.returncode == 0:           # it finished before the signal came: nothing to see
            pytest.fail("the merge finished before SIGINT; make it longer: " + err)
        assert p.returncode == 1 and len(lines) == 1 and "cancelled" in lines[0], err
        assert "Traceback" not in err
        assert m.info()["operation"] is None
        assert [s["merging"] for s in m.snapshots()] == [True]
        for i, d in enumerate(e.model.disks):
            assert guest_bytes(m.info()["disks"][i]["active"]) == tip[d]
    r = subprocess.run(argv[:-1], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    with Tree(state) as t:
        m = t.machine("m")
        new = copy.deepcopy(e.model)
        new.committed("a", False, None)
        verify(m, new, e.folders)
