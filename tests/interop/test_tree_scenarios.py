"""Machine snapshot trees offline: scenarios on 2- and 3-disk machines, every step checked
against a model by QEMU's tools (tests/helpers/machine.py: every disk's tip and every
snapshot's state, qemu-img check on every file, no file left that nothing needs)."""
from __future__ import annotations

import os

import pytest

from qcow2engine.errors import InvalidRequestError, MachineError, SnapshotError
from tests.helpers.machine import make_machine
from tests.helpers.qemu import qemu_img

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture
def env(tmp_path):
    yield lambda ndisks=2, kind="internal": make_machine(tmp_path, ndisks, kind)


def seed(e):
    """The seed's tree: a, b, c, d (each after writes), revert to b, create e."""
    e.write("vda", 0, 1); e.write("vdb", 0, 11); e.create("a")
    e.write("vda", 1, 2); e.create("b")
    e.write("vda", 2, 3); e.write("vdb", 1, 12); e.create("c")
    e.write("vda", 3, 4); e.create("d")
    e.write("vda", 4, 5)
    e.revert("b")
    e.write("vdb", 5, 15)
    e.create("e")


TREE_AFTER_SEED = """\
a
  |
  +- b
      |
      +- c
      |   |
      |   +- d
      |       |
      |       +- AUTO
      |         
      +- e
        

"""


@pytest.mark.parametrize("kind", ["internal", "external"])
def test_seed_tree(env, kind, capsys):
    e = env(2, kind)
    seed(e)
    auto = [s["name"] for s in e.m.snapshots() if s["auto"]]
    assert len(auto) == 1 and auto[0].startswith("auto-")
    from qcow2engine.cli.main import main
    assert main(["--state-dir", e.tree.store.dir, "snapshot-list", "m", "--tree"]) == 0
    assert capsys.readouterr().out == TREE_AFTER_SEED.replace("AUTO", auto[0])
    # the branch that was left stays valid: reset to d, then to c and back to e
    e.revert("d")
    e.revert("c")
    e.write("vda", 9, 99)
    e.revert("e", expect_auto=True)


def test_three_disks_mixed_kinds(env):
    e = env(3, "internal")
    e.write("vda", 0, 1); e.write("vdb", 0, 2); e.write("vdc", 0, 3)
    e.create("a", diskspecs={"vda": "internal", "vdb": "external", "vdc": "no"})
    e.write("vda", 1, 4); e.write("vdb", 1, 5); e.write("vdc", 1, 6)
    e.create("b", disk_only=True, diskspecs={"vdc": "no"}, kind="internal")
    e.write("vda", 2, 7); e.write("vdb", 2, 8); e.write("vdc", 2, 9)
    e.revert("a")            # vdc is not part of a: it keeps its state
    e.revert("b")


def test_follow_between_branches(env):
    e = env(2, "external")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.create("b")
    e.write("vda", 2, 3)                      # b's branch goes on
    e.revert("a")                             # the tip of b's branch: an automatic snapshot
    e.write("vdb", 3, 4); e.create("x")
    e.write("vdb", 4, 5)
    e.revert("b", "follow")                   # back where b's branch was left
    e.write("vda", 5, 6)
    e.revert("x", "follow")                   # and to x's branch
    e.revert("b", "follow")


def test_revert_to_non_leaf_then_branch(env):
    e = env(2, "external")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.create("b")
    e.write("vda", 2, 3); e.create("c")
    e.revert("a")
    e.write("vdb", 0, 7); e.create("b2")      # a second branch off a
    e.revert("c")
    e.revert("b2")


def test_internal_under_overlay(env):
    """Reset to an internal snapshot whose image is frozen under an external overlay: a new
    overlay gets the differences; no byte of the frozen image changes."""
    e = env(2, "internal")
    e.write("vda", 0, 1); e.write("vda", 1, 2); e.create("a")
    e.write("vda", 0, 3); e.write("vda", 5, 4); e.write("vdb", 2, 9)
    e.create("b", kind="external")
    base = e.m.state().snapshots["b"].disks["vda"].file
    before = open(base, "rb").read()
    e.write("vda", 6, 5)
    e.revert("a")
    assert open(base, "rb").read() == before


@pytest.mark.parametrize("discard", [False, True])
def test_commit(env, discard):
    e = env(2, "external")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.write("vdb", 1, 3); e.create("b")
    e.write("vda", 2, 4)
    n_before = len(e.m.state().files)
    e.revert("b", "commit", discard=discard)
    # the chain is as short as before b
    assert len(e.m.state().files) <= n_before
    e.write("vda", 3, 5)
    e.create("c")
    e.revert("a")


def test_commit_refused_on_shared_base_then_forced(env):
    e = env(2, "external")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.create("b")
    e.revert("a")
    e.write("vdb", 1, 3); e.create("b2")      # a's base is shared by b and b2
    before = e.m.state()
    with pytest.raises(MachineError, match="shared with"):
        e.m.revert("a", mode="commit")
    assert e.m.state() == before
    e.verify()
    r = e.m.revert("a", mode="commit", force=True)
    assert r.completed and any("--force" in x for x in r.messages)
    assert {s["name"] for s in e.m.snapshots()} == {"a", "b2"}      # b went with --force
    # a's branch was left where b2 froze it: that is what a names once merged
    merged = {d: dict(c) for d, c in e.model.snaps["b2"].items()}
    e.model._forget("b")
    e.model.snaps["a"] = merged
    e.model.tip = {d: dict(c) for d, c in merged.items()}
    e.model.current, e.model.live = "a", "a"
    e.verify()


@pytest.mark.parametrize("mode", ["reset", "follow", "commit"])
def test_discard_with_each_mode(env, mode):
    e = env(2, "external")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.create("b")
    e.write("vda", 2, 3); e.create("c")
    e.write("vdb", 3, 4)
    e.revert("b", mode, discard=True)
    assert "b" not in {s["name"] for s in e.m.snapshots()}


@pytest.mark.parametrize("kind", ["internal", "external"])
def test_delete_leaf_middle_current_children(env, kind):
    e = env(2, kind)
    seed(e)
    e.delete("d")                               # a leaf with an automatic child
    e.delete("c")                               # a middle one
    e.delete("b", children_only=True)
    e.write("vda", 7, 8)
    e.delete(e.model.current)                   # the current one: its parent is current
    e.create("f")
    e.delete("a", children=True)
    assert e.m.snapshots() == []


def test_delete_shared_base_and_flatten(env):
    e = env(2, "external")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.create("b")
    e.revert("a")
    e.write("vda", 2, 3); e.create("b2")
    e.delete("a")                               # its base stays: b and b2 share it
    e.create("z")
    e.delete("b", flatten=True)


def test_libvirt_734_external_child_of_internal(env):
    """Deleting an external snapshot whose parent is internal keeps the parent's image."""
    e = env(2, "internal")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.create("b", kind="external")
    base = e.m.state().snapshots["b"].disks["vda"].file
    e.write("vda", 2, 3)
    e.delete("b")
    assert os.path.exists(base)
    e.revert("a")


def test_bad_input_changes_nothing(env, tmp_path):
    e = env(2, "internal")
    e.write("vda", 0, 1); e.create("a")
    st = e.m.state()
    files = {p: open(p, "rb").read() for p in st.files}
    db = e.m.state()
    bad = [
        (lambda: e.tree.machine("nope"), MachineError),
        (lambda: e.m.revert("nope"), SnapshotError),
        (lambda: e.m.create_snapshot("a"), SnapshotError),
        (lambda: e.m.create_snapshot(""), InvalidRequestError),
        (lambda: e.m.create_snapshot("x/y"), InvalidRequestError),
        (lambda: e.m.create_snapshot("x" * 256), InvalidRequestError),
        (lambda: e.m.revert("a", mode="follow"), InvalidRequestError),
        (lambda: e.m.revert("a", mode="commit"), InvalidRequestError),
        (lambda: e.m.delete("nope"), SnapshotError),
        (lambda: e.m.create_snapshot("q", diskspecs={"vdz": "internal"}), InvalidRequestError),
        (lambda: e.tree.define("m", {"vda": st.disks[0].active}), MachineError),
        (lambda: e.tree.define("m2", {"vda": str(tmp_path / "missing")}), MachineError),
        (lambda: e.tree.define("m2", {"vda": st.disks[0].active}), MachineError),
    ]
    other = tmp_path / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(other), SIZE, check=True)
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"QFI\xfb" + b"\xff" * 200)          # qcow2 magic, garbage header
    bad.append((lambda: e.tree.define("m3", {"vda": str(junk)}), MachineError))
    bad.append((lambda: e.tree.define("m3", {"vda": str(tmp_path)}), MachineError))
    bad.append((lambda: e.tree.define("m/3", {"vda": str(other)}), InvalidRequestError))
    bad.append((lambda: e.tree.define("m4", {"vda": str(other), "vdb": str(other)}),
                InvalidRequestError))
    for fn, exc in bad:
        with pytest.raises(exc):
            fn()
        assert e.m.state() == db
        assert {p: open(p, "rb").read() for p in st.files} == files
    assert e.tree.names() == ["m"]
    e.verify()


def test_revert_current_is_undo(env):
    e = env(2, "internal")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2)
    e.revert("a")                     # undo since a: no automatic snapshot
    e.write("vda", 2, 3)
    e.revert("a", auto_snapshot=False)


def test_commit_cancel_then_resume(env, monkeypatch):
    """A cancel while --commit merges: the disks still show the tip, S is marked merging
    (reset to it refused), and the same command resumes and completes."""
    import threading
    import copy
    import qcow2engine.chain.copy as chain_copy
    monkeypatch.setattr(chain_copy, "WINDOW", 64 << 10)      # many windows to stop between
    e = env(2, "external")
    e.write("vda", 0, 1); e.create("a")
    for slot in range(12):
        e.write("vda", slot, 20 + slot)
    e.write("vdb", 3, 9)
    tip = copy.deepcopy(e.model.tip)
    cancel = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        if len(seen) == 2:
            cancel.set()
    r = e.m.revert("a", mode="commit", progress=progress, cancel=cancel)
    assert r.outcome == "cancelled" and seen
    assert e.m.info()["operation"] is None
    assert [s["merging"] for s in e.m.snapshots()] == [True]
    from tests.helpers.qemu import guest_bytes
    for i, d in enumerate(e.model.disks):
        assert guest_bytes(e.m.info()["disks"][i]["active"]) == e.model.expect(tip[d])
    with pytest.raises(SnapshotError, match="half merged"):
        e.m.revert("a")
    assert e.m.check() == []
    r = e.m.revert("a", mode="commit")
    assert r.completed
    e.model.committed("a", False, None)
    e.verify()


@pytest.mark.parametrize("discard", [False, True])
def test_commit_into_base_with_internal_tags(env, discard):
    """The base of an external snapshot holds internal snapshots: --commit writes the base's
    active state only; every internal snapshot in it stays as it was."""
    e = env(2, "internal")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.create("b")
    e.write("vdb", 2, 3); e.create("x", kind="external")
    e.write("vda", 3, 4); e.write("vda", 0, 5)
    e.revert("x", "commit", discard=discard)
    e.revert("a")
    e.revert("b")


def test_raw_disk_external_only(tmp_path):
    """A raw disk takes external snapshots only; reset, follow and commit into the raw base."""
    from tests.helpers.machine import Env, MachineModel
    from qcow2engine.tree import Tree
    d = tmp_path / "vm"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(d / "vda.qcow2"), SIZE, check=True)
    qemu_img("create", "-q", "-f", "raw", str(d / "vdb.raw"), SIZE, check=True)
    disks = {"vda": str(d / "vda.qcow2"), "vdb": str(d / "vdb.raw")}
    tree = Tree(str(tmp_path / "state"))
    m = tree.define("m", disks)
    e = Env(tree, m, MachineModel(disks, SIZE), [str(d)], "external")
    with pytest.raises(InvalidRequestError, match="raw"):
        m.create_snapshot("i")                       # internal by default: not on raw
    e.write("vdb", 0, 1); e.create("a")
    e.write("vdb", 1, 2); e.write("vda", 1, 3)
    e.revert("a")
    e.write("vdb", 2, 4)
    e.revert("a", "commit")                          # merged into the raw image itself
    e.revert(e.model.current)


@pytest.mark.parametrize("kind", ["internal", "external"])
def test_virtual_size_is_part_of_the_state(env, kind):
    from tests.helpers.qemu import qemu_img_info
    e = env(2, kind)
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.create("b")
    active = e.m.info()["disks"][0]["active"]
    qemu_img("resize", "-q", active, 2 * SIZE, check=True)
    e.model.changed = True
    assert qemu_img_info(active)["virtual-size"] == 2 * SIZE
    r = e.m.revert("a")                                  # a reset restores the size at a
    assert r.auto_snapshot is not None
    active = e.m.info()["disks"][0]["active"]
    assert qemu_img_info(active)["virtual-size"] == SIZE
    auto = e.m.state().snapshots[r.auto_snapshot].disks["vda"]
    assert auto.size == 2 * SIZE
    if kind == "external":
        # follow the grown branch, then commit it: the base grows first
        e.m.revert(r.auto_snapshot, mode="follow")
        e.m.create_snapshot("g", disk_only=True)
        base = e.m.state().snapshots["g"].disks["vda"].file
        e.m.revert("g", mode="commit")
        assert qemu_img_info(base)["virtual-size"] == 2 * SIZE
    assert e.m.check() == []


def test_commit_refused_when_the_overlay_holds_internal_snapshots(env):
    """Merging S.overlay away would lose internal snapshots taken inside it: refused, naming
    them; --force deletes them first."""
    e = env(2, "external")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.create("i", kind="internal")       # a tag inside a's overlay
    e.write("vda", 2, 3)
    before = e.m.state()
    with pytest.raises(MachineError, match="snapshot 'i'"):
        e.m.revert("a", mode="commit")
    assert e.m.state() == before
    e.verify()
    r = e.m.revert("a", mode="commit", force=True)
    assert r.completed and "i" not in {s["name"] for s in e.m.snapshots()}
    assert e.m.check() == []


def test_automatic_snapshot_names_in_one_second(env, monkeypatch):
    """auto-YYYYmmdd-HHMMSS (local time), then -2, -3 within the same second."""
    import time as _time
    import qcow2engine.tree.plan as plan

    class Clock:
        def time(self):
            return 1796230000.0

        def __getattr__(self, name):
            return getattr(_time, name)
    monkeypatch.setattr(plan, "time", Clock())
    stamp = _time.strftime("auto-%Y%m%d-%H%M%S", _time.localtime(1796230000.0))
    e = env(2, "external")
    e.write("vda", 0, 1); e.create("a")
    e.write("vda", 1, 2); e.create("b")
    names = []
    for i in range(3):
        e.write("vda", 2 + i, 3 + i)
        r = e.revert("a" if i % 2 == 0 else "b")
        names.append(r.auto_snapshot)
    assert names == [stamp, stamp + "-2", stamp + "-3"]
    assert all(s["auto"] for s in e.m.snapshots() if s["name"] in names)
