"""Crash safety of the machine verbs on a running machine: a simulated crash of our process at
every file write, flush, file removal and database commit it makes (QEMU's own writes are
QEMU's) during a live create (with memory in a file, internal with memory, disk-only), a live
merge (delete, revert --commit) and a revert with memory (QEMU restarted) — then a new
process's `machine recover` (live while QEMU runs, offline when the crash took the machine
down with it) leaves every disk and every snapshot in the old or the new state, judged by
QEMU's tools against the model, QEMU's graph against the tree, no stray memory file."""
from __future__ import annotations

import copy

import pytest

from qcow2engine.tree import Tree
from tests.faults.test_tree_faults import _Clock, _ext_chain as _setup
from tests.helpers.faultinject import SimulatedCrash, inject, injection_points
from tests.live.test_tree_live import LiveEnv, make_live


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    import qcow2engine.tree.plan as plan
    import qcow2engine.tree.manager as manager
    monkeypatch.setattr(plan, "time", _Clock())
    monkeypatch.setattr(manager, "time", _Clock())


SCENARIOS = {
    "create_memspec": ("external", _setup, lambda e: e.create("c")),
    "create_internal_memory": ("internal", _setup, lambda e: e.create("c")),
    "create_disk_only": ("disk-only", _setup, lambda e: e.create("c")),
    "delete_middle": ("disk-only", lambda e: (_setup(e), e.create("c")),
                      lambda e: e.delete("b")),
    "revert_commit": ("disk-only", _setup, lambda e: e.revert("b", "commit")),
    "revert_memory": ("external", _setup, lambda e: e.revert("a")),
}


def _old_or_new(e, old, new):
    errs = []
    for what, model in (("old", old), ("new", new)):
        e.model = copy.deepcopy(model)
        try:
            e.verify()
            return what
        except AssertionError as err:
            errs.append(str(err)[:400])
    raise AssertionError("neither the old state (%s) nor the new (%s)" % tuple(errs))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_live_tree_crash_injection(tmp_path, name):
    kind, setup, op = SCENARIOS[name]
    # the reference run: the new state, and how many calls the verb makes
    ref = make_live(tmp_path / "ref", kind)
    try:
        setup(ref)
        old = copy.deepcopy(ref.model)
        with inject(None, paths=ref.folders) as inj:
            op(ref)
        n = inj.count
        new = copy.deepcopy(ref.model)
    finally:
        ref.m.stop(force=True)
        ref.tree.close()
    assert n > 0 and {c.name for c in inj.calls} >= {"db_commit"}
    outcomes = {"old": 0, "new": 0}
    for point in injection_points(n, first=5, sample=4, seed=len(name)):
        e = make_live(tmp_path / ("p%d" % point), kind)
        try:
            setup(e)
            with inject(point, "crash", paths=e.folders) as inj:
                try:
                    op(e)
                except (SimulatedCrash, Exception):     # noqa: BLE001 - judged below
                    pass
            assert inj.triggered is not None, "the fault at call %d never came" % point
            e.tree.close()
            # the next process
            t = Tree(e.tree.store.dir)
            run = LiveEnv(t, t.machine("m"), None, e.folders, kind)
            assert run.m.recover() in (None, "rolled back", "rolled forward")
            assert run.m.info()["operation"] is None
            try:
                outcomes[_old_or_new(run, old, new)] += 1
            except AssertionError as err:
                raise AssertionError("crash at call %d (%s): %s"
                                     % (point, inj.triggered, err)) from None
            # and the machine goes on: QEMU runs on what the tree says (started if the
            # crash took it down), a write and a snapshot work
            if run.m.runtime() is None:
                run.m.start()
            run.write("vda", 5, 9)
            run.create("after")
        finally:
            t2 = Tree(e.tree.store.dir)
            try:
                m2 = t2.machine("m")
                if m2.runtime() is not None:
                    m2.stop(force=True)
            finally:
                t2.close()
    assert outcomes["old"] + outcomes["new"] > 0
