"""The machine API: `Tree` (one state directory) and `Machine` (one machine's verbs).

Every mutating verb: takes the machine's operation lock ("machine busy" otherwise), finishes
an operation an earlier process left pending (saying so through `notice`), checks the files
against the tree (refusing, naming the file, when one changed under it) and that no running
QEMU holds an image, plans (nothing written), then runs the plan through the journal.
Listing verbs read the database only and work on an inconsistent machine, and while a QEMU
holds its images.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import (ImageInUseError, InvalidImageError, InvalidRequestError, JobCancelled,
                      MachineError, MachineInconsistentError, Qcow2Error)
from ..jobs import Progress
from . import journal
from .model import EXTERNAL, INTERNAL, KINDS, NO, Disk, FileRec, MachineState, check_disk_name, \
    check_name
from .offline import OfflineBackend
from .plan import Planner
from .store import Store

MODES = ("reset", "follow", "commit")


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class Finding:
    disk: str
    path: str
    message: str

    def __str__(self) -> str:
        return "%s: %s: %s" % (self.disk, self.path, self.message)


@dataclass
class TreeResult:
    """What a verb did."""
    op: str
    outcome: str = "completed"              # or "cancelled"
    snapshot: Optional[str] = None          # the snapshot created / reverted to / deleted
    auto_snapshot: Optional[str] = None     # the automatic snapshot of the tip
    created: list = field(default_factory=list)     # files created
    removed: list = field(default_factory=list)     # files removed
    deleted: list = field(default_factory=list)     # snapshots deleted
    messages: list = field(default_factory=list)
    recovered: Optional[str] = None         # a pending operation finished first

    @property
    def completed(self) -> bool:
        return self.outcome == "completed"


def snapshot_doc(m: MachineState, name: str, *, with_counts: bool = False) -> dict:
    """The JSON document of one snapshot (snapshot-list / snapshot-info --output=json)."""
    s = m.snapshots[name]
    doc = {"name": s.name, "parent": s.parent, "created": int(s.created), "state": s.state,
           "current": m.current == s.name, "auto": s.auto, "merging": s.merging,
           "description": s.description, "memory": "no",
           "disks": {d: {"snapshot": ds.kind, "file": ds.file if ds.kind != NO else None}
                     for d, ds in s.disks.items()}}
    if with_counts:
        doc["children"] = len(m.children(name))
        doc["descendants"] = len(m.descendants(name))
    return doc


# ---------------------------------------------------------------- the state directory
class Tree:
    """The machines of one state directory."""

    def __init__(self, state_dir: Optional[str] = None, *, backend=None):
        self.store = Store(state_dir)
        self.backend = backend or OfflineBackend()

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def names(self) -> list:
        return self.store.names()

    def machine(self, name: str) -> "Machine":
        if not self.store.exists(name):
            raise MachineError("machine '%s' not found" % name)
        return Machine(self, name)

    def define(self, name: str, disks) -> "Machine":
        """A machine on existing images: disks is {disk name: image path} (or pairs)."""
        check_name(name, "machine")
        items = list(disks.items()) if isinstance(disks, dict) else list(disks)
        if not items:
            raise InvalidRequestError("a machine needs at least one disk (--disk vda=PATH)")
        if self.store.exists(name):
            raise MachineError("machine '%s' already exists" % name)
        m = MachineState(name, time.time())
        keys = {}
        # every file another machine knows: none may be a disk here, and none of those it
        # may write (all but the ones below its defined images) may be below a disk here
        others, written = {}, {}
        for other in self.store.names():
            om = self.store.load(other)
            for f in om.files.values():
                others[_key(f.path)] = (other, f.disk, f.path)
                if not f.below:
                    written[_key(f.path)] = (other, f.disk, f.path)
        for dname, path in items:
            check_disk_name(dname)
            if any(d.name == dname for d in m.disks):
                raise InvalidRequestError("disk '%s' is given twice" % dname)
            path = os.path.abspath(path)
            if not os.path.exists(path):
                raise MachineError("disk %s: '%s' does not exist" % (dname, path))
            if not os.path.isfile(path):
                raise MachineError("disk %s: '%s' is not an image file" % (dname, path))
            try:
                facts = self.backend.probe(path)
            except (InvalidImageError, Qcow2Error) as e:
                raise MachineError("disk %s: '%s' is not a usable image: %s"
                                   % (dname, path, e)) from None
            k = _key(path)
            if k in keys:
                raise InvalidRequestError("disks %s and %s are the same image '%s'"
                                          % (keys[k], dname, path))
            if k in others:
                raise MachineError("disk %s: '%s' belongs to disk %s of machine '%s'"
                                   % (dname, path, others[k][1], others[k][0]))
            keys[k] = dname
            m.disks.append(Disk(dname, path, facts.fmt, os.path.dirname(path),
                                self.backend.stamp(path)))
            m.files[path] = FileRec(path, dname, facts.fmt, facts.backing, owned=False,
                                    foreign_tags=tuple(facts.tags))
            below, seen = facts.backing, {path}
            while below is not None and below not in seen:
                seen.add(below)
                try:
                    bf = self.backend.probe(below)
                except (OSError, Qcow2Error) as e:
                    raise MachineError("disk %s: backing file '%s': %s" % (dname, below, e)) \
                        from None
                if _key(below) in written:
                    o = written[_key(below)]
                    raise MachineError("disk %s: its backing file '%s' belongs to disk %s of "
                                       "machine '%s', which may change it" % (dname, below,
                                                                               o[1], o[0]))
                m.files.setdefault(below, FileRec(below, dname, bf.fmt, bf.backing, owned=False,
                                                  foreign_tags=tuple(bf.tags), below=True))
                below = bf.backing
        self.store.save(m)
        return Machine(self, name)

    def undefine(self, name: str) -> None:
        """Forget a machine (no file is touched)."""
        mach = self.machine(name)
        self.store.lock(name)
        try:
            if self.store.op(name):
                raise MachineError("machine '%s' has a pending operation: run 'machine recover "
                                   "%s' first" % (name, name))
            self.store.delete(name)
        finally:
            self.store.unlock(name)
        del mach


def _key(path: str):
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return path


# ---------------------------------------------------------------- one machine
class Machine:
    def __init__(self, tree: Tree, name: str):
        self.tree = tree
        self.name = name
        self.notice: Callable[[str], None] = lambda msg: None

    @property
    def store(self) -> Store:
        return self.tree.store

    @property
    def backend(self):
        return self.tree.backend

    def state(self) -> MachineState:
        return self.store.load(self.name)

    # ------------------------------------------------------------ reading
    def info(self) -> dict:
        m = self.state()
        op = self.store.op(self.name)
        return {"name": m.name, "state": "shut off", "current": m.current,
                "disks": [{"name": d.name, "format": d.fmt, "active": d.active,
                           "chain": m.chain(d.active)} for d in m.disks],
                "operation": None if op is None else {
                    "kind": op["kind"], "step": op["done"],
                    "steps": len(op["plan"]["steps"]), "started": int(op["started"])}}

    def snapshots(self, *, roots=False, leaves=False, no_leaves=False, from_=None,
                  descendants=False, internal=False, external=False) -> list:
        """Snapshot documents, filtered as virsh's snapshot-list flags do."""
        m = self.state()
        names = list(m.snapshots)
        if from_ is not None:
            m.snapshot(from_)
            names = [s.name for s in (m.descendants(from_) if descendants
                                      else m.children(from_))]
        if roots:
            names = [n for n in names if m.snapshots[n].parent is None]
        if leaves:
            names = [n for n in names if not m.children(n)]
        if no_leaves:
            names = [n for n in names if m.children(n)]
        if internal:
            names = [n for n in names if INTERNAL in m.snapshots[n].kinds]
        if external:
            names = [n for n in names if EXTERNAL in m.snapshots[n].kinds]
        names.sort(key=lambda n: (m.snapshots[n].created, n))
        return [snapshot_doc(m, n) for n in names]

    def snapshot_info(self, name: Optional[str] = None) -> dict:
        m = self.state()
        if name is None:
            if m.current is None:
                raise MachineError("machine '%s' has no current snapshot" % self.name)
            name = m.current
        m.snapshot(name)
        return snapshot_doc(m, name, with_counts=True)

    def current(self) -> Optional[str]:
        return self.state().current

    def parent(self, name: str) -> Optional[str]:
        return self.state().snapshot(name).parent

    def check(self) -> list:
        """The tree against the files: one Finding per inconsistency."""
        return check_machine(self.state(), self.backend)

    # ------------------------------------------------------------ changing
    def _begin(self, *, need_consistent: bool = True) -> tuple:
        self.store.lock(self.name)
        getattr(self.backend, "begin_verb", lambda: None)()
        try:
            rec = None
            if self.store.op(self.name):
                rec = journal.recover(self.store, self.backend, self.state())
                self.notice("machine '%s': an unfinished operation was %s" % (self.name, rec))
            m = self.state()
            if need_consistent:
                bad = check_machine(m, self.backend)
                if bad:
                    raise MachineInconsistentError(
                        "machine '%s' is inconsistent: %s (see 'machine check %s')"
                        % (self.name, bad[0], self.name))
                for p in sorted(m.files):
                    if self.backend.in_use(p):
                        raise ImageInUseError("image '%s' of machine '%s' is in use (by a "
                                              "running QEMU?)" % (p, self.name))
            return m, rec
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        getattr(self.backend, "end_verb", lambda: None)()
        self.store.unlock(self.name)

    def _run(self, m: MachineState, planner: Planner, rec, op: str, snapshot: str, *,
             progress=None, cancel=None) -> TreeResult:
        plan = planner.plan()
        res = TreeResult(op, snapshot=snapshot, auto_snapshot=plan.auto, created=plan.created,
                         removed=plan.removed, deleted=plan.deleted, messages=plan.messages,
                         recovered=rec)
        try:
            journal.Journal(self.store, self.backend, m).run(plan, progress=progress,
                                                             cancel=cancel)
        except JobCancelled:
            res.outcome = "cancelled"
            res.created, res.removed, res.deleted = [], [], []
        return res

    def recover(self) -> Optional[str]:
        """Finish a pending operation: "rolled back", "rolled forward", or None (none)."""
        self.store.lock(self.name)
        try:
            return journal.recover(self.store, self.backend, self.state())
        finally:
            self.store.unlock(self.name)

    def create_snapshot(self, name: str, *, description: str = "", diskspecs=None,
                        disk_only: bool = False) -> TreeResult:
        """diskspecs: {disk: kind} or {disk: (kind, file)} (kind internal|external|no)."""
        specs = {}
        for d, v in (diskspecs or {}).items():
            kind, file = (v, None) if isinstance(v, str) else v
            if kind not in KINDS:
                raise InvalidRequestError("--diskspec %s: snapshot=%s: use internal, external "
                                          "or no" % (d, kind))
            specs[d] = (kind, file)
        m, rec = self._begin()
        try:
            p = Planner(m, self.backend, "create")
            p.create(name, description, specs, disk_only)
            return self._run(m, p, rec, "create", name)
        finally:
            self._end()

    def set_current(self, name: str) -> None:
        m, rec = self._begin(need_consistent=False)
        try:
            m.snapshot(name)
            m.current = name
            for d in m.disks:           # the tip counts from here
                d.baseline = None
            self.store.save(m)
        finally:
            self._end()

    def revert(self, name: Optional[str] = None, *, mode: str = "reset", discard: bool = False,
               force: bool = False, auto_snapshot: bool = True,
               progress: Optional[Progress] = None,
               cancel: Optional[threading.Event] = None) -> TreeResult:
        if mode not in MODES:
            raise InvalidRequestError("unknown revert mode '%s'" % mode)
        m, rec = self._begin()
        try:
            if name is None:
                if m.current is None:
                    raise MachineError("machine '%s' has no current snapshot" % self.name)
                name = m.current
            m.snapshot(name)
            if mode != "commit":
                p = Planner(m, self.backend, "revert")
                p.revert(name, mode, no_auto=not auto_snapshot)
                if discard:
                    p.delete(name)
                return self._run(m, p, rec, "revert", name)
            # --commit: the disks show S.overlay (follow), what else depends on S.base is
            # refused or (--force) deleted, S is marked merging; a cancel while the overlays
            # are merged leaves that state, and the same command resumes from it
            p = Planner(m, self.backend, "revert-commit")
            p.revert_commit_prepare(name, no_auto=not auto_snapshot, force=force)
            p.mark()
            p.merge(name, discard=discard)
            return self._run(m, p, rec, "revert", name, progress=progress, cancel=cancel)
        finally:
            self._end()

    def delete(self, name: str, *, children: bool = False, children_only: bool = False,
               metadata: bool = False, flatten: bool = False,
               progress: Optional[Progress] = None) -> TreeResult:
        m, rec = self._begin(need_consistent=not metadata)
        try:
            p = Planner(m, self.backend, "delete")
            p.delete(name, children=children, children_only=children_only, metadata=metadata,
                     flatten=flatten)
            return self._run(m, p, rec, "delete", name, progress=progress)
        finally:
            self._end()


# ---------------------------------------------------------------- machine check
def check_machine(m: MachineState, backend) -> list:
    out = []
    tracked: dict = {}
    for s in m.snapshots.values():
        for d, ds in s.disks.items():
            if ds.kind == INTERNAL:
                tracked.setdefault(ds.file, {})[ds.tag] = (s.name, d)
    for path in sorted(m.files):
        rec = m.files[path]
        if not backend.exists(path):
            out.append(Finding(rec.disk, path, "missing file"))
            continue
        try:
            facts = backend.probe(path)
        except (OSError, Qcow2Error) as e:
            out.append(Finding(rec.disk, path, "unreadable: %s" % e))
            continue
        if facts.fmt != rec.fmt:
            out.append(Finding(rec.disk, path, "format changed (%s, now %s)"
                               % (rec.fmt, facts.fmt)))
            continue
        if facts.backing != rec.backing:
            out.append(Finding(rec.disk, path, "backing file changed (%s, now %s)"
                               % (rec.backing or "none", facts.backing or "none")))
        if rec.frozen is not None and backend.stamp(path) != rec.frozen:
            out.append(Finding(rec.disk, path, "frozen image changed since it froze"))
        want = tracked.get(path, {})
        for tag, (sn, d) in sorted(want.items()):
            if tag not in facts.tags:
                out.append(Finding(d, path, "internal snapshot '%s' (of snapshot '%s') is "
                                   "missing" % (tag, sn)))
        for tag in facts.tags:
            if tag not in want and tag not in rec.foreign_tags:
                out.append(Finding(rec.disk, path, "untracked internal snapshot '%s'" % tag))
    return out
