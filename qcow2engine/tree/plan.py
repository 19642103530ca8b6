"""Planning: a verb and its flags, on a machine's state, become a list of steps and the state
the machine has once they are done.  Nothing here writes: it reads image facts through the
backend (sizes, allocation) and edits a copy of the model.

A Plan is what the journal records before the first file is touched.  Steps are dicts
{"op": ..., arguments}; `irreversible` is the index of the first step after which the old
state can no longer be restored (the journal rolls back before it, forward from it).  Plans
put every reversible step first: new overlays, new internal tags, copies into new overlays;
then what changes existing state: applying a tag, committing into a base, deleting a tag,
removing a file.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from ..errors import InvalidRequestError, MachineError, SnapshotError
from .model import EXTERNAL, INTERNAL, NO, DiskState, FileRec, MachineState, Snapshot, check_name

# steps that destroy old state (the point of no return)
# (a running machine's switch onto new overlays and its snapshot-save are points of no
# return too: the guest writes the new state from then on)
IRREVERSIBLE = {"internal_apply", "internal_delete", "remove_file", "commit", "live_switch",
                "live_save"}
# the file each step writes (its stamp is taken again afterwards)
WRITES = {"create_overlay": "path", "internal_create": "path", "internal_apply": "path",
          "internal_delete": "path", "internal_to_overlay": "overlay", "commit": "base",
          "stream": "path", "rebase": "path", "resize": "path"}


def written(st: dict) -> set:
    """The files step st writes."""
    op = st["op"]
    if op in WRITES:
        return {st[WRITES[op]]}
    if op == "live_switch":
        return {p for p, _ in (st.get("internal") or {}).values()} | \
            {ov for _, ov in (st.get("overlays") or {}).values()}
    if op == "live_save":
        return set(st["paths"].values())
    return set()


@dataclass
class Plan:
    kind: str                       # "create", "revert", "revert-commit", "merge", "delete"
    steps: list
    after: MachineState
    irreversible: int               # index of the first irreversible step (len: none)
    sets_current: bool
    tip_clean: dict                 # disk -> the tip was unchanged since the current snapshot
    messages: list = field(default_factory=list)
    auto: Optional[str] = None      # the automatic snapshot taken of the tip
    created: list = field(default_factory=list)     # files created
    removed: list = field(default_factory=list)     # files removed
    deleted: list = field(default_factory=list)     # snapshots deleted
    cancellable: bool = False       # its long steps stop at a cancel ...
    on_cancel: Optional[MachineState] = None    # ... leaving this state (all steps before done)


class Planner:
    """Builds one plan: `m` is the state before, `after` the state being built."""

    def __init__(self, m: MachineState, backend, kind: str, *, now: Optional[float] = None):
        self.before = m
        self.after = m.clone()
        self.b = backend
        self.kind = kind
        self.steps: list = []
        self.now = time.time() if now is None else now
        self.messages: list = []
        self.created: list = []
        self.removed: list = []
        self.deleted: list = []
        self.auto: Optional[str] = None
        self.sets_current = False
        self._sizes: dict = {}
        self._tip_clean: Optional[dict] = None
        self._mark: Optional[int] = None
        self._mid: Optional[MachineState] = None
        # a running machine: {"state": run state, "memory": kind, "memfile": path, "live": bool}
        self.live: Optional[dict] = None
        # what the automatic snapshot of a running tip keeps of the memory
        self.auto_memory: Optional[dict] = None
        self.running = False            # the machine runs: its disks switch live

    def mark(self) -> None:
        """The state so far is where a cancel of the steps that follow leaves the machine."""
        self._mark = len(self.steps)
        self._mid = self.after.clone()

    # ------------------------------------------------------------ facts
    def vsize(self, path: str) -> int:
        if path not in self._sizes:
            self._sizes[path] = self.b.probe(path).vsize
        return self._sizes[path]

    def allocated(self, path: str) -> int:
        return 0 if path in self.created else self.b.allocated(path)

    def tip_clean(self) -> dict:
        """disk -> True when its active image is unchanged since the current position."""
        if self._tip_clean is None:
            self._tip_clean = {}
            for d in self.before.disks:
                self._tip_clean[d.name] = d.baseline is not None and \
                    self.b.stamp(d.active) == d.baseline
        return self._tip_clean

    def tip_changed(self) -> bool:
        # a running machine's tip always changed: its memory did
        return bool(self.auto_memory) or not all(self.tip_clean().values())

    # ------------------------------------------------------------ building blocks
    def step(self, op: str, **args) -> None:
        self.steps.append(dict(op=op, **args))

    def new_file(self, disk: str, label: str, explicit: Optional[str] = None) -> str:
        """The path of a new overlay for disk: explicit, or
        <folder>/<machine>-<disk>.<label>[-N].qcow2, not used by anything."""
        m = self.after
        if explicit is not None:
            p = os.path.abspath(explicit)
            if p in m.files or p in self.created or self.b.exists(p):
                raise MachineError("file '%s' for disk %s already exists" % (p, disk))
            return p
        folder = m.disk(disk).folder
        base = "%s-%s.%s" % (m.name, disk, label)
        n = 1
        while True:
            p = os.path.join(folder, base + ("" if n == 1 else "-%d" % n) + ".qcow2")
            if p not in m.files and p not in self.created and not self.b.exists(p):
                return p
            n += 1

    def add_overlay(self, disk: str, backing: str, size: int, label: str,
                    explicit: Optional[str] = None) -> str:
        m = self.after
        p = self.new_file(disk, label, explicit)
        self.step("create_overlay", path=p, backing=backing, backing_fmt=m.files[backing].fmt,
                  size=size)
        m.files[p] = FileRec(p, disk, "qcow2", backing, owned=True)
        self._sizes[p] = size
        self.created.append(p)
        return p

    def unique_snapshot_name(self, base: str) -> str:
        names = {n.lower() for n in self.after.snapshots}
        if base.lower() not in names:
            return base
        n = 2
        while "%s-%d" % (base, n) in names:
            n += 1
        return "%s-%d" % (base, n)

    # ------------------------------------------------------------ create
    def create(self, name: str, description: str = "", specs: Optional[dict] = None,
               disk_only: bool = False, auto: bool = False,
               internal_in: Optional[set] = None, covered: Optional[set] = None) -> Snapshot:
        """Snapshot every disk: specs {disk: (kind, file)} override the default (internal on
        qcow2 disks offline; external with disk_only)."""
        m = self.after
        check_name(name)
        if name in m.snapshots:
            raise SnapshotError("snapshot '%s' already exists on machine '%s'" % (name, m.name))
        specs = dict(specs or {})
        for d in specs:
            m.disk(d)
        snap = Snapshot(name, m.current, self.now, description, auto)
        live = None if auto else self.live
        memory = NO
        if live is not None:
            memory = EXTERNAL if live.get("memfile") else NO if disk_only else INTERNAL
            snap.vm_state = live["state"]
        switch: dict = {"overlays": {}, "internal": {}}
        for d in m.disks:
            kind, file = specs.get(d.name, (None, None))
            if auto and d.name not in covered:
                kind = NO
            if kind is None:
                if auto:
                    kind = INTERNAL if internal_in and d.name in internal_in else EXTERNAL
                elif disk_only or memory == EXTERNAL:
                    kind = EXTERNAL
                else:
                    kind = INTERNAL
            if memory == INTERNAL and kind == EXTERNAL:
                raise InvalidRequestError("disk %s: an external disk snapshot of a running "
                                          "machine needs --disk-only or --memspec (the memory "
                                          "goes to a file then)" % d.name)
            if disk_only and kind == INTERNAL:
                raise InvalidRequestError("--disk-only snapshots are external: disk %s asks for "
                                          "an internal one" % d.name)
            if kind == INTERNAL and m.files[d.active].fmt != "qcow2":
                raise InvalidRequestError("disk %s is raw ('%s'): internal snapshots need qcow2; "
                                          "use --diskspec %s,snapshot=external"
                                          % (d.name, d.active, d.name))
            if kind != EXTERNAL and file is not None:
                raise InvalidRequestError("--diskspec %s: file= applies to external snapshots"
                                          % d.name)
            size = self.vsize(d.active)
            if kind == NO:
                snap.disks[d.name] = DiskState(NO, size=size)
            elif kind == INTERNAL:
                tags = self.b.probe(d.active).tags
                if name in tags:
                    raise SnapshotError("image '%s' of disk %s already has an internal snapshot "
                                        "named '%s'" % (d.active, d.name, name))
                if live is None:
                    self.step("internal_create", path=d.active, tag=name)
                else:
                    switch["internal"][d.name] = [d.active, name]
                snap.disks[d.name] = DiskState(INTERNAL, d.active, None, size, name)
            else:
                base = d.active
                ov = None
                if not auto:            # an automatic snapshot is a label on the tip
                    ov = self.add_overlay(d.name, base, size, name, file)
                    d.active = ov
                    switch["overlays"][d.name] = [base, ov]
                snap.disks[d.name] = DiskState(EXTERNAL, base, ov, size)
        if all(ds.kind == NO for ds in snap.disks.values()):
            raise InvalidRequestError("snapshot '%s' would cover no disk" % name)
        if live is not None:
            if memory == INTERNAL:
                paths = {d: p for d, (p, _) in switch["internal"].items()}
                vm = next(iter(paths))
                self.step("live_save", tag=name, paths=paths, vmstate=vm)
                snap.memory, snap.memfile = INTERNAL, vm
            else:
                if memory == EXTERNAL:
                    mf = os.path.abspath(live["memfile"])
                    if self.b.exists(mf) or any(x.memfile == mf for x in m.snapshots.values()):
                        raise MachineError("memory file '%s' already exists" % mf)
                    snap.memory, snap.memfile = EXTERNAL, mf
                self.step("live_switch", overlays=switch["overlays"],
                          internal=switch["internal"], memfile=snap.memfile,
                          live=bool(live.get("live")), resume=live["state"])
        if auto and self.auto_memory:
            snap.memory = self.auto_memory["memory"]
            snap.memfile = self.auto_memory.get("memfile")
            snap.vm_state = self.auto_memory.get("vm_state")
        m.snapshots[name] = snap
        if not auto:
            m.current = name
            self.sets_current = True
        return snap

    # ------------------------------------------------------------ revert
    def revert(self, target: str, mode: str = "reset", *, no_auto: bool = False) -> None:
        m = self.after
        s = m.snapshot(target)
        if s.merging and mode != "commit":
            raise SnapshotError("snapshot '%s' is half merged (an interrupted --commit revert): "
                                "run snapshot-revert %s --commit to finish it" % (target, target))
        if mode in ("follow", "commit") and INTERNAL in s.kinds:
            raise InvalidRequestError("--%s applies to external snapshots: '%s' has internal "
                                      "disks (%s)" % (mode, target, ", ".join(
                                          d for d, ds in s.disks.items() if ds.kind == INTERNAL)))
        # what each disk shows afterwards; None: it stays as it is
        leaving = self._leaves_tip(s, mode)
        if leaving:
            undo = mode == "reset" and target == m.current
            if not undo and not no_auto and self.tip_changed():
                inplace = {d for d, ds in s.disks.items()
                           if ds.kind == INTERNAL and ds.file == m.disk(d).active}
                name = self.unique_snapshot_name(time.strftime("auto-%Y%m%d-%H%M%S",
                                                               time.localtime(self.now)))
                self.create(name, "automatic snapshot of the tip before reverting to '%s'"
                            % target, auto=True, internal_in=inplace, covered=leaving)
                self.auto = name
        applies = []
        for d in m.disks:
            ds = s.disks.get(d.name)
            if ds is None or ds.kind == NO:
                continue
            if ds.kind == INTERNAL:
                if ds.file == d.active and not m.frozen_needed(ds.file):
                    applies.append((ds.file, ds.tag))
                else:
                    ov = self.add_overlay(d.name, ds.file, ds.size, target)
                    self.step("internal_to_overlay", overlay=ov, path=ds.file, tag=ds.tag)
                    d.active = ov
            elif mode == "reset" or ds.overlay is None:
                d.active = self.add_overlay(d.name, ds.file, ds.size, target)
                ds.overlay = d.active       # S's branch now goes on from here
            else:
                o = ds.overlay
                if d.active == o:
                    continue
                d.active = o
                if m.file_children(o) or m.state_users(o):
                    d.active = self.add_overlay(d.name, o, self.vsize(o), target)
        for path, tag in applies:
            self.step("internal_apply", path=path, tag=tag)
        m.current = target
        self.sets_current = True
        self.gc()

    def _leaves_tip(self, s: Snapshot, mode: str) -> set:
        """The disks that reverting to s switches away from their current state."""
        m = self.after
        out = set()
        for d in m.disks:
            ds = s.disks.get(d.name)
            if ds is None or ds.kind == NO:
                continue
            if ds.kind == INTERNAL or mode == "reset" or ds.overlay != d.active:
                out.add(d.name)
        return out

    # ------------------------------------------------------------ revert --commit
    def commit_dependents(self, s: Snapshot) -> tuple:
        """What else depends on the state S.base holds, per disk: (snapshots, files)."""
        m = self.after
        snaps, files = set(), set()
        for d, ds in s.disks.items():
            if ds.kind != EXTERNAL:
                continue
            base = ds.file
            for name, disk in m.state_users(base):
                # internal tags inside the base keep their own tables: only the states that
                # are the base's active state (external snapshots of it) change
                if name != s.name and m.snapshots[name].disks[disk].kind == EXTERNAL:
                    snaps.add(name)
            # internal snapshots inside the overlay would go with it
            for name, disk in m.state_users(ds.overlay) if ds.overlay else ():
                if m.snapshots[name].disks[disk].kind == INTERNAL:
                    snaps.add(name)
            for child in m.file_children(base):
                if child == ds.overlay:
                    continue
                sub = self._subtree(child)
                files |= sub
                for p in sub:
                    snaps |= {n for n, _ in m.state_users(p) if n != s.name}
        return sorted(snaps), sorted(files)

    def _subtree(self, path: str) -> set:
        out, todo = set(), [path]
        while todo:
            p = todo.pop()
            out.add(p)
            todo.extend(self.after.file_children(p))
        return out

    def revert_commit_prepare(self, target: str, *, no_auto: bool = False,
                              force: bool = False) -> None:
        """Phase 1 of --commit: the disks show S.overlay (follow), dependents of S.base are
        refused or (force) deleted, S is marked merging."""
        m = self.after
        s = m.snapshot(target)
        if not s.merging:
            self.revert(target, "follow", no_auto=no_auto)
            s = m.snapshot(target)
            for d, ds in s.disks.items():
                if ds.kind != EXTERNAL:
                    continue
                rec = m.files[ds.file]
                if rec.below:
                    raise MachineError("cannot merge into '%s' (disk %s): it is below the image "
                                       "the machine was defined with" % (ds.file, d))
                if ds.overlay is None:
                    raise MachineError("snapshot '%s' has no overlay on disk %s to merge"
                                       % (target, d))
                foreign = m.files[ds.overlay].foreign_tags
                if foreign:
                    raise MachineError("cannot commit '%s': its overlay '%s' holds internal "
                                       "snapshots the tree does not know (%s)"
                                       % (target, ds.overlay, ", ".join(foreign)))
            snaps, files = self.commit_dependents(s)
            if snaps or files:
                what = ", ".join(["snapshot '%s'" % n for n in snaps] +
                                 ["file '%s'" % f for f in files if not m.state_users(f)])
                if not force:
                    raise MachineError("cannot commit '%s': its base is shared with %s (use "
                                       "--force to delete them)" % (target, what))
                self.messages.append("deleted, as --force asks: %s" % what)
                for n in snaps:
                    if n in m.snapshots:
                        self.drop_label(n)
                for f in files:
                    if m.is_active(f):
                        raise MachineError("cannot commit '%s': disk active on '%s'"
                                           % (target, f))
                self.gc(protect={ds.file for ds in s.disks.values() if ds.kind == EXTERNAL})
            s.merging = True
        self.sets_current = True
        m.current = target

    def merge(self, target: str, *, discard: bool = False) -> None:
        """Phase 2 of --commit: S.overlay into S.base on every disk, then S re-created on the
        merged state (or, with discard, gone and S.base active again)."""
        m = self.after
        s = m.snapshot(target)
        for d, ds in s.disks.items():
            if ds.kind == EXTERNAL:
                self.step("commit", top=ds.overlay, base=ds.file)
                self._sizes[ds.file] = max(self.vsize(ds.file), self.vsize(ds.overlay))
        for d, ds in s.disks.items():
            if ds.kind != EXTERNAL:
                continue
            base, o = ds.file, ds.overlay
            disk = m.disk(d)
            for child in m.file_children(o):
                self.step("rebase", path=child, backing=base, backing_fmt=m.files[base].fmt,
                          prev=o, prev_fmt="qcow2")
                m.files[child].backing = base
            for other in m.snapshots.values():
                ods = other.disks.get(d)
                if ods is not None and ods.kind != NO and other.name != target:
                    if ods.file == o:
                        ods.file = base
                    if ods.overlay == o:
                        ods.overlay = None
            if disk.active == o:
                disk.active = base
            self.forget_file(o)
        s.merging = False
        if discard:
            self.drop_label(target)
            m.current = s.parent
            for d in m.disks:
                if m.frozen_needed(d.active) or m.state_users(d.active):
                    d.active = self.add_overlay(d.name, d.active, self.vsize(d.active), "tip")
        else:
            s.created = self.now
            for d, ds in s.disks.items():
                if ds.kind != EXTERNAL:
                    continue
                disk = m.disk(d)
                if disk.active == ds.file:
                    disk.active = self.add_overlay(d, ds.file, self.vsize(ds.file), target)
                ds.overlay = disk.active if m.files[disk.active].backing == ds.file else None
            m.current = target
        self.sets_current = True
        self.gc()

    # ------------------------------------------------------------ delete
    def _unlink(self, name: str) -> Snapshot:
        """Take snapshot name out of the tree: its children move to its parent, and so does
        the current position."""
        m = self.after
        s = m.snapshots.pop(name)
        if s.memory == EXTERNAL and s.memfile:
            self.step("remove_file", path=s.memfile)
        for c in m.snapshots.values():
            if c.parent == name:
                c.parent = s.parent
        if m.current == name:
            m.current = s.parent
        self.deleted.append(name)
        return s

    def drop_label(self, name: str) -> None:
        """Forget snapshot name; the internal tags it holds are deleted from their images."""
        for ds in self._unlink(name).disks.values():
            if ds.kind == INTERNAL:
                self.step("internal_delete", path=ds.file, tag=ds.tag)

    def delete(self, name: str, *, children: bool = False, children_only: bool = False,
               metadata: bool = False, flatten: bool = False) -> None:
        m = self.after
        s = m.snapshot(name)
        targets = [] if children_only else [s.name]
        if children or children_only:
            targets = [c.name for c in reversed(m.descendants(s.name))] + targets
        if not targets:
            raise SnapshotError("snapshot '%s' has no children to delete" % name)
        if metadata:            # forget only: the tags stay in their images, untracked
            for t in targets:
                for ds in self._unlink(t).disks.values():
                    if ds.kind == INTERNAL:
                        rec = m.files[ds.file]
                        rec.foreign_tags = tuple(sorted(set(rec.foreign_tags) | {ds.tag}))
            return
        for t in targets:
            self.drop_label(t)
        self.gc(flatten=flatten)

    # ------------------------------------------------------------ garbage collection
    def _removable(self, path: str, protect) -> bool:
        m = self.after
        rec = m.files[path]
        return (path not in protect and not rec.below and not m.needed(path)
                and not rec.foreign_tags and not self._tags_left(path))

    def _tags_left(self, path: str) -> bool:
        """Internal tags that stay in the file (referenced by a snapshot still there)."""
        m = self.after
        return any(ds.kind == INTERNAL and ds.file == path
                   for s in m.snapshots.values() for ds in s.disks.values())

    def gc(self, *, flatten: bool = False, protect=frozenset()) -> None:
        """Merge away every file nothing needs: removed with no child, merged with its only
        child, kept as a common base of several (or, flatten, streamed into each)."""
        m = self.after
        while True:
            leaves = [p for p, f in m.files.items() if f.owned and not m.file_children(p)
                      and self._removable(p, protect)]
            if leaves:
                for p in sorted(leaves):
                    self.forget_file(p)
                continue
            cands = sorted(p for p in m.files if self._removable(p, protect)
                           and m.file_children(p))
            done = False
            for p in cands:
                kids = m.file_children(p)
                if len(kids) == 1 and self._merge(p, kids[0]):
                    done = True
                    break
                if len(kids) > 1 and flatten and m.files[p].owned:
                    for k in kids:
                        self._stream_into(p, k)
                    self.forget_file(p)
                    done = True
                    break
            if not done:
                return

    def forget_file(self, path: str) -> None:
        """The file is removed by the plan: no snapshot keeps it as its overlay."""
        m = self.after
        self.step("remove_file", path=path)
        del m.files[path]
        self.removed.append(path)
        for s in m.snapshots.values():
            for ds in s.disks.values():
                if ds.overlay == path:
                    ds.overlay = None

    def _stream_into(self, f: str, child: str) -> None:
        m = self.after
        rec = m.files[f]
        below = rec.backing
        self.step("stream", path=child, base=below,
                  base_fmt=m.files[below].fmt if below else None, prev=f, prev_fmt=rec.fmt)
        m.files[child].backing = below

    def _merge(self, f: str, c: str) -> bool:
        """Merge unneeded file f with its only child c: commit c down into f, or stream f into
        c, whichever copies fewer bytes (and is allowed).  False: neither is."""
        m = self.after
        frec, crec = m.files[f], m.files[c]
        can_stream = frec.owned and crec.fmt == "qcow2"
        c_tags = crec.foreign_tags or self._tags_left(c) or self._tags_physically(c)
        can_commit = crec.owned and not c_tags and not frec.below
        if not can_stream and not can_commit:
            return False
        if can_stream and (not can_commit or self.allocated(f) <= self.allocated(c)):
            self._stream_into(f, c)
            self.forget_file(f)
            return True
        # commit c into f: f takes c's place everywhere
        if self.vsize(c) > self.vsize(f):
            self._sizes[f] = self.vsize(c)
        self.step("commit", top=c, base=f)
        for k in m.file_children(c):
            self.step("rebase", path=k, backing=f, backing_fmt=frec.fmt, prev=c, prev_fmt="qcow2")
            m.files[k].backing = f
        for s in m.snapshots.values():
            for ds in s.disks.values():
                if ds.file == c:
                    ds.file = f
                if ds.overlay == c:
                    ds.overlay = f
        for d in m.disks:
            if d.active == c:
                d.active = f
        self.forget_file(c)
        return True

    def _tags_physically(self, path: str) -> bool:
        """Tags in a file that this plan does not delete (before its deletions run)."""
        if path in self.created:
            return False
        gone = {st["tag"] for st in self.steps if st["op"] == "internal_delete"
                and st["path"] == path}
        return bool(set(self.b.probe(path).tags) - gone)

    # ------------------------------------------------------------ result
    def plan(self) -> Plan:
        self.tip_clean()
        k = len(self.steps) if self._mark is None else self._mark
        steps = _order(self.steps[:k]) + _order(self.steps[k:])
        if self.running:
            # a running disk whose active image is a new overlay goes onto it at the end
            # (a merge's active commit leaves QEMU on the base: the new overlay goes on it)
            done = {d for st in steps if st["op"] == "live_switch" for d in st["overlays"]}
            sw = {d.name: [self.after.files[d.active].backing, d.active]
                  for d in self.after.disks if d.active in self.created and d.name not in done}
            if sw:
                steps.append({"op": "live_switch", "overlays": sw, "internal": {},
                              "memfile": None, "live": False})
        # on a running machine a stream is not undone either: QEMU drops the layers it
        # streamed from out of the disk's chain (the pointer cannot simply be put back)
        stops = IRREVERSIBLE | ({"stream"} if self.running else set())
        irr = next((i for i, st in enumerate(steps) if st["op"] in stops), len(steps))
        return Plan(self.kind, steps, self.after, irr, self.sets_current,
                    dict(self._tip_clean or {}), self.messages, self.auto, self.created,
                    self.removed, self.deleted, self._mid is not None, self._mid)


def _order(steps: list) -> list:
    """Deleting tags and removing files go last (in their order): nothing after them reads
    what they destroy, and the steps before them can still be undone."""
    last = ("internal_delete", "remove_file")
    return ([st for st in steps if st["op"] not in last] +
            [st for st in steps if st["op"] == last[0]] +
            [st for st in steps if st["op"] == last[1]])
