"""A model of a machine's snapshot tree, and the checks run against it after every step.

The model knows, per disk, the guest contents of the tip and of every snapshot as a map
slot -> pattern byte (a slot is SLOT bytes; unwritten slots read as zeros).  For external
snapshots it also knows the state of each snapshot's branch where it was left (what
`--follow` shows), or None where the spec leaves it open (after a delete merged files).

`verify(machine, model)` reads every disk's active image and every snapshot's state with
QEMU's tools (qemu-img convert, and -l for internal snapshots), compares each with the model,
runs `qemu-img check` on every file, and checks that no file is left that nothing needs and
that no file the tree knows is missing.
"""
from __future__ import annotations

import copy
import os

from .qemu import assert_clean, guest_bytes, par, qemu_img, qemu_io

SLOT = 64 << 10


class MachineModel:
    def __init__(self, disks: dict, size: int):
        self.disks = list(disks)            # names, in order
        self.size = size
        self.tip = {d: {} for d in disks}
        self.snaps: dict = {}               # name -> {disk: {slot: pattern}} (covered disks)
        self.kinds: dict = {}               # name -> {disk: kind}
        self.branch: dict = {}              # name -> follow state {disk: {...}} or None
        self.live = None                    # the external snapshot whose overlay the tip is
        self.deps: set = set()              # snapshots whose overlay something depends on
        self.parent: dict = {}
        self.current = None
        self.changed = False                # the tip changed since the current snapshot

    # ---- guest writes
    def write(self, m, disk: str, slot: int, pattern: int) -> None:
        active = m.info()["disks"][self.disks.index(disk)]["active"]
        qemu_io(active, "write -P %d %d %d" % (pattern, slot * SLOT, SLOT), fmt=None)
        self.wrote(disk, slot, pattern)

    def wrote(self, disk: str, slot: int, pattern: int) -> None:
        """The guest wrote pattern to slot of disk (by whatever means)."""
        self.tip[disk][slot] = pattern
        self.changed = True
        if self.live is not None:
            self.branch[self.live] = copy.deepcopy(self.tip)

    # ---- verbs (call after the engine did them)
    def created(self, name: str, kinds: dict) -> None:
        self.snaps[name] = {d: dict(self.tip[d]) for d in self.disks if kinds[d] != "no"}
        self.kinds[name] = dict(kinds)
        self.parent[name] = self.current
        if all(k == "external" for k in kinds.values()):
            if self.live is not None:
                self.deps.add(self.live)
            self.live = name
            self.branch[name] = copy.deepcopy(self.tip)
        else:
            self.live = None
        self.current = name
        self.changed = False

    def left_tip(self, auto: str | None) -> None:
        """The tip was left: kept as the automatic snapshot auto (a label), or dropped."""
        if auto is not None:
            kinds = {d: ("internal" if self.kinds.get(self.current, {}).get(d) == "internal"
                          else "external") for d in self.disks}
            self.snaps[auto] = {d: dict(self.tip[d]) for d in self.disks}
            self.kinds[auto] = kinds
            self.parent[auto] = self.current
            self.branch[auto] = None
            if self.live is not None:
                self.deps.add(self.live)
        elif self.live is not None and self.live not in self.deps:
            self.branch[self.live] = copy.deepcopy(self.snaps[self.live])   # overlay dropped

    def reverted(self, name: str, mode: str, auto: str | None) -> None:
        if mode == "follow" and self.branch.get(name) is not None and self.live == name:
            pass                                    # already there: nothing left
        else:
            self.left_tip(auto)
        if mode == "reset" or self.branch.get(name) is None:
            self.tip = {d: dict(self.snaps[name][d]) if d in self.snaps[name] else self.tip[d]
                        for d in self.disks}
            if all(k in ("external", "no") for k in self.kinds[name].values()):
                self.live = name
                self.deps.discard(name)
                self.branch[name] = copy.deepcopy(self.tip)
            else:
                self.live = None
        else:
            self.tip = copy.deepcopy(self.branch[name])
            self.live = name if name not in self.deps else None
        self.current = name
        self.changed = False

    def committed(self, name: str, discard: bool, auto: str | None) -> None:
        self.reverted(name, "follow", auto)
        merged = copy.deepcopy(self.tip)
        if discard:
            self._forget(name)
            self.live = None
        else:
            self.snaps[name] = merged
            self.branch[name] = copy.deepcopy(merged)
            self.live = name
            self.deps.discard(name)
        self.changed = False

    def _forget(self, name: str) -> None:
        p = self.parent.pop(name)
        for c, cp in self.parent.items():
            if cp == name:
                self.parent[c] = p
        self.snaps.pop(name)
        self.kinds.pop(name)
        self.branch.pop(name, None)
        if self.current == name:
            self.current = p
        if self.live == name:
            self.live = None

    def deleted(self, names) -> None:
        for n in names:
            self._forget(n)
        for n in self.branch:                       # left open by the spec after merges
            self.branch[n] = None
        self.deps = set(self.snaps)

    # ---- expectations
    def expect(self, content: dict) -> bytes:
        buf = bytearray(self.size)
        for slot, pat in content.items():
            buf[slot * SLOT:(slot + 1) * SLOT] = bytes([pat]) * SLOT
        return bytes(buf)


def verify(m, model: MachineModel, folders, *, force_share: bool = False) -> None:
    """Every disk's tip and every snapshot's state against the model, by QEMU's tools.
    force_share: the machine runs (its QEMU flushed every disk just before): read with -U."""
    info = m.info()
    assert info["operation"] is None, info["operation"]
    docs = {d["name"]: d for d in m.snapshots()}
    assert set(docs) == set(model.snaps), (sorted(docs), sorted(model.snaps))
    assert info["current"] == model.current
    for n, d in docs.items():
        assert d["parent"] == model.parent[n], (n, d["parent"], model.parent[n])
    jobs, want = [], []
    for i, d in enumerate(model.disks):
        disk = info["disks"][i]
        jobs.append(lambda p=disk["active"]: guest_bytes(p, force_share=force_share))
        want.append(("tip", d, model.expect(model.tip[d])))
        for n, doc in docs.items():
            ds = doc["disks"][d]
            if ds["snapshot"] == "no":
                continue
            assert d in model.snaps[n], (n, d)
            if ds["snapshot"] == "internal":
                jobs.append(lambda p=ds["file"], t=n: guest_bytes(
                    p, snapshot="snapshot.name=" + t, force_share=force_share))
            else:
                jobs.append(lambda p=ds["file"]: guest_bytes(p, force_share=force_share))
            want.append((n, d, model.expect(model.snaps[n][d])))
    for got, (what, d, exp) in zip(par(jobs), want):
        assert got == exp, "disk %s, %s: contents differ from the model (%s)" % (
            d, what, _diff(got, exp))
    # files: every file the tree knows exists and is clean; none on disk that nothing needs
    st = m.state()
    needed = set()
    for dsk in st.disks:
        needed |= set(st.chain(dsk.active))
    for s in st.snapshots.values():
        for ds in s.disks.values():
            if ds.kind != "no":
                needed |= set(st.chain(ds.file))
    assert set(st.files) == needed, ("files the tree keeps that nothing needs",
                                      sorted(set(st.files) - needed))
    on_disk = set()
    for folder in folders:
        for f in os.listdir(folder):
            if f.endswith(".qcow2") or f.endswith(".raw") or f.endswith(".tmp"):
                on_disk.add(os.path.join(folder, f))
    assert on_disk == set(st.files), ("stray", sorted(on_disk - set(st.files)),
                                      "missing", sorted(set(st.files) - on_disk))
    qc = [p for p in st.files if st.files[p].fmt == "qcow2"]
    par([lambda p=p: assert_clean(p, force_share=force_share) for p in qc])
    assert m.check() == []


def _diff(got: bytes, exp: bytes) -> str:
    if len(got) != len(exp):
        return "size %d, model %d" % (len(got), len(exp))
    for i in range(0, len(got), SLOT):
        if got[i:i + SLOT] != exp[i:i + SLOT]:
            return "first at slot %d: %r vs model %r" % (i // SLOT, got[i:i + 4], exp[i:i + 4])
    return "?"


def make_machine(tmp_path, ndisks: int = 2, kind: str = "internal", size: int = 4 << 20,
                 name: str = "m", launch=None, env=None) -> "Env":
    """A machine on ndisks fresh qcow2 images (one folder per disk) in a state directory
    under tmp_path, with its model; launch: its launch definition; env: the Env class."""
    from qcow2engine.tree import Tree
    disks = {}
    for i in range(ndisks):
        d = "vd" + "abcdefgh"[i]
        folder = os.path.join(str(tmp_path), d)
        os.makedirs(folder, exist_ok=True)
        p = os.path.join(folder, d + ".qcow2")
        qemu_img("create", "-q", "-f", "qcow2", p, size, check=True)
        disks[d] = p
    tree = Tree(os.path.join(str(tmp_path), "state"))
    m = tree.define(name, disks, launch)
    return (env or Env)(tree, m, MachineModel(disks, size),
                        [os.path.dirname(p) for p in disks.values()], kind)


class Env:
    def __init__(self, tree, m, model, folders, kind):
        self.tree, self.m, self.model, self.folders, self.kind = tree, m, model, folders, kind

    def write(self, disk, slot, pattern):
        self.model.write(self.m, disk, slot, pattern)

    def create(self, name, kind=None, **kw):
        kind = kind or self.kind
        if kind == "external":
            kw.setdefault("disk_only", True)
        self.m.create_snapshot(name, **kw)
        kinds = {d: ds["snapshot"] for d, ds in
                 next(s for s in self.m.snapshots() if s["name"] == name)["disks"].items()}
        self.model.created(name, kinds)
        self.verify()

    def revert(self, name, mode="reset", *, expect_auto=None, **kw):
        changed = self.model.changed
        r = self.m.revert(name, mode=mode, **kw)
        assert r.completed
        if expect_auto is None:
            stays = mode != "reset" and self.model.live == name      # follow onto the tip
            expect_auto = changed and kw.get("auto_snapshot", True) and not stays and not (
                mode == "reset" and name == self.model.current)
        assert (r.auto_snapshot is not None) == expect_auto, r
        if mode == "commit":
            self.model.committed(name, kw.get("discard", False), r.auto_snapshot)
        else:
            self.model.reverted(name, mode, r.auto_snapshot)
            if kw.get("discard"):
                self.model.deleted([name])
        self.verify()
        return r

    def delete(self, name, **kw):
        st = self.m.state()
        if kw.get("children_only"):
            names = [s.name for s in st.descendants(name)]
        elif kw.get("children"):
            names = [name] + [s.name for s in st.descendants(name)]
        else:
            names = [name]
        r = self.m.delete(name, **kw)
        self.model.deleted(names)
        self.verify()
        return r

    def verify(self):
        verify(self.m, self.model, self.folders)


