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
    paused_seconds: Optional[float] = None  # a running guest was stopped this long
    run_state: Optional[str] = None         # the machine's run state afterwards

    @property
    def completed(self) -> bool:
        return self.outcome == "completed"


def snapshot_doc(m: MachineState, name: str, *, with_counts: bool = False) -> dict:
    """The JSON document of one snapshot (snapshot-list / snapshot-info --output=json)."""
    s = m.snapshots[name]
    doc = {"name": s.name, "parent": s.parent, "created": int(s.created), "state": s.state,
           "current": m.current == s.name, "auto": s.auto, "merging": s.merging,
           "description": s.description, "memory": s.memory,
           "memory_file": s.memfile if s.memory == EXTERNAL else None,
           "disks": {d: {"snapshot": ds.kind, "file": ds.file if ds.kind != NO else None}
                     for d, ds in s.disks.items()}}
    if with_counts:
        doc["children"] = len(m.children(name))
        doc["descendants"] = len(m.descendants(name))
    return doc


# ---------------------------------------------------------------- the state directory
class Tree:
    """The machines of one state directory."""

    def __init__(self, state_dir: Optional[str] = None, *, backend=None, live=None):
        """backend: the offline steps (default OfflineBackend); live: what runs machines
        (default qmp_bridge.tree_backend, imported the first time a machine runs)."""
        self.store = Store(state_dir)
        self.backend = backend or OfflineBackend()
        self._live = live

    @property
    def live(self):
        if self._live is None:
            # the live layer sits beside this package (it imports us, never the reverse at
            # import time): loaded only when a machine is started, attached or running
            import qmp_bridge.tree_backend as live
            self._live = live
        return self._live

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

    def define(self, name: str, disks, launch: Optional[dict] = None) -> "Machine":
        """A machine on existing images: disks is {disk name: image path} (or pairs);
        launch: how to start it (tree.launch: memory, cpus, machine_type, kernel, initrd,
        append, qemu_args, accel), None: it is only ever shut off (or attached)."""
        check_name(name, "machine")
        if launch is not None:
            from .launch import check_launch
            launch = check_launch(launch)
        items = list(disks.items()) if isinstance(disks, dict) else list(disks)
        if not items:
            raise InvalidRequestError("a machine needs at least one disk (--disk vda=PATH)")
        if self.store.exists(name):
            raise MachineError("machine '%s' already exists" % name)
        m = MachineState(name, time.time(), launch=launch)
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
            if mach.runtime() is not None:
                raise MachineError("machine '%s' is running: stop it first (machine stop %s)"
                                   % (name, name))
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
        self._live_backend = None           # while a verb runs on a running machine
        self._session = None
        self._rt: Optional[dict] = None
        self._speed: Optional[int] = None     # bytes/s of live merge jobs (this verb)
        self._keep_memory: Optional[str] = None   # saved for the revert under way

    @property
    def store(self) -> Store:
        return self.tree.store

    @property
    def backend(self):
        return self._live_backend or self.tree.backend

    # ------------------------------------------------------------ running or not
    def runtime(self) -> Optional[dict]:
        """How to reach the machine's QEMU, or None when it is shut off.  A QEMU that died is
        noticed here (and forgotten)."""
        rt = self.store.runtime(self.name)
        if rt is None:
            return None
        if not self.tree.live.alive(rt):
            self.store.set_runtime(self.name, None)
            self.notice("machine '%s': its QEMU (pid %s) has gone away; the machine is shut off"
                        % (self.name, rt.get("pid")))
            return None
        return rt

    def run_state(self) -> str:
        """"running", "paused" or "shut off"."""
        rt = self.runtime()
        if rt is None:
            return "shut off"
        with self.tree.live.connect(rt, which="mon") as s:
            return self.tree.live.run_state(s)

    def state(self) -> MachineState:
        return self.store.load(self.name)

    # ------------------------------------------------------------ reading
    def info(self) -> dict:
        m = self.state()
        op = self.store.op(self.name)
        state = self.run_state()
        rt = self.store.runtime(self.name) if state != "shut off" else None
        return {"name": m.name, "state": state, "current": m.current,
                "qmp": rt["qmp"] if rt else None, "pid": rt.get("pid") if rt else None,
                "serial": rt.get("serial") if rt else None,
                "launch": m.launch,
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
        """The tree against the files (and, while the machine runs, against the chains its
        QEMU runs on): one Finding per inconsistency."""
        m = self.state()
        rt = self.runtime()
        if rt is None:
            return check_machine(m, self.backend)
        live = self.tree.live
        with live.connect(rt, which="mon") as s:
            self._live_backend = live.LiveBackend(self.tree.backend, s)
            try:
                return check_machine(m, self._live_backend) + self._check_live(m)
            finally:
                self._live_backend = None

    # ------------------------------------------------------------ changing
    def _begin(self, *, need_consistent: bool = True, offline: bool = False,
               say: bool = True) -> tuple:
        """Lock, connect to the QEMU if the machine runs (its steps then go live), finish a
        pending operation, check the tree against the files (and against what QEMU runs on).
        offline: refuse a running machine."""
        self.store.lock(self.name)
        try:
            self._rt = self.runtime()
            if self._rt is not None:
                if offline:
                    raise MachineError("machine '%s' is running: stop it first (machine stop "
                                       "%s)" % (self.name, self.name))
                self._session = self.tree.live.connect(self._rt)
                self._live_backend = self.tree.live.LiveBackend(self.tree.backend,
                                                                self._session)
                self._live_backend.speed = self._speed
                self._resume_interrupted(self._rt)
            getattr(self.backend, "begin_verb", lambda: None)()
            rec = None
            if self.store.op(self.name):
                rec = journal.recover(self.store, self.backend, self.state())
                if say:
                    self.notice("machine '%s': an unfinished operation was %s"
                                % (self.name, rec))
            m = self.state()
            _drop_stray_memory(m, self._keep_memory)
            if need_consistent:
                bad = check_machine(m, self.backend)
                if self._rt is not None:
                    bad += self._check_live(m)
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

    def _check_live(self, m: MachineState) -> list:
        """What QEMU runs on against the tree."""
        chains = self._live_backend.disk_chains()
        out = []
        for d in m.disks:
            want = m.chain(d.active)
            have = chains.get(d.name)
            if have is None:
                out.append(Finding(d.name, d.active, "the running QEMU has no disk '%s'"
                                   % d.name))
            elif have != want:
                out.append(Finding(d.name, d.active, "the running QEMU runs on %s"
                                   % " -> ".join(have)))
        return out

    def _end(self) -> None:
        getattr(self.backend, "end_verb", lambda: None)()
        if self._session is not None:
            self._session.close()
        self._session = self._live_backend = self._rt = None
        self.store.unlock(self.name)

    def _run(self, m: MachineState, planner: Planner, rec, op: str, snapshot: str, *,
             progress=None, cancel=None) -> TreeResult:
        planner.running = self._rt is not None
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

    # ------------------------------------------------------------ starting and stopping
    def start(self, *, paused: bool = False) -> dict:
        """Start the machine's QEMU on its disks as the tree has them; its runtime doc."""
        m, rec = self._begin()
        try:
            if self._rt is not None:
                raise MachineError("machine '%s' is already running" % self.name)
            return self._launch(m, paused=paused)
        finally:
            self._end()

    def stop(self, *, force: bool = False, timeout: float = 60.0) -> str:
        """ACPI power-down (quit after timeout seconds; at once with force)."""
        self.store.lock(self.name)
        try:
            rt = self.runtime()
            if rt is None:
                raise MachineError("machine '%s' is not running" % self.name)
            how = self.tree.live.stop_machine(rt, force=force, timeout=timeout)
            self.store.set_runtime(self.name, None)
            return how
        finally:
            self.store.unlock(self.name)

    def suspend(self) -> None:
        """Pause the running guest (QMP stop)."""
        self._pause(True)

    def resume(self) -> None:
        """Let a paused guest run again (QMP cont)."""
        self._pause(False)

    def _pause(self, stop: bool) -> None:
        self.store.lock(self.name)
        try:
            rt = self.runtime()
            if rt is None:
                raise MachineError("machine '%s' is not running" % self.name)
            with self.tree.live.connect(rt) as s:
                st = s.execute("query-status")
                if st["status"] == "inmigrate":
                    raise self._waiting_for_memory()
                if stop and not st["running"]:
                    raise MachineError("machine '%s' is already paused" % self.name)
                if not stop and st["running"]:
                    raise MachineError("machine '%s' is not paused" % self.name)
                s.execute("stop" if stop else "cont")
        finally:
            self.store.unlock(self.name)

    def attach(self, qmp: str) -> dict:
        """Adopt a QEMU started elsewhere (its QMP socket), which must run on the disks as
        the tree has them (device ids = disk names)."""
        live = self.tree.live
        m, rec = self._begin(need_consistent=False)
        try:
            if self._rt is not None:
                raise MachineError("machine '%s' is already running" % self.name)
            qmp = os.path.abspath(qmp)
            rt = {"pid": live.peer_pid(qmp), "qmp": qmp, "serial": None, "launched": False,
                  "started": time.time()}
            self._rt = rt
            self._session = live.connect(rt)
            self._live_backend = live.LiveBackend(self.tree.backend, self._session)
            bad = check_machine(m, self.backend) + self._check_live(m)
            if bad:
                raise MachineInconsistentError("cannot attach machine '%s': %s"
                                               % (self.name, bad[0]))
            self.store.set_runtime(self.name, rt)
            return rt
        finally:
            self._end()

    def _launch(self, m: MachineState, *, paused: bool = False, incoming=None,
                resume: Optional[str] = None) -> dict:
        """Start the QEMU, recording where it will be before it exists (a crash right after
        the start leaves no QEMU the tree does not know); resume: the run state the machine
        is to reach (a later verb finishes the way there if we die before)."""
        live = self.tree.live
        paths = live.run_paths(self.store.dir, m.name)
        pre = {"pid": None, "qmp": paths["qmp"], "ctl": paths["ctl"], "mon": paths["mon"],
               "serial": paths["serial"], "pidfile": paths["pidfile"], "launched": True}
        if resume:
            pre["resume"] = resume
        self.store.set_runtime(self.name, pre)
        try:
            rt = live.launch_machine(m, self.store.dir, paused=paused, incoming=incoming)
        except BaseException:
            if not live.alive(pre):
                self.store.set_runtime(self.name, None)
            raise
        rt["pidfile"] = paths["pidfile"]
        if resume:
            rt["resume"] = resume
        self.store.set_runtime(self.name, rt)
        return rt

    def _settled(self, rt: dict) -> None:
        """The machine reached its run state: nothing left to resume."""
        if rt.pop("resume", None) is not None:
            self.store.set_runtime(self.name, rt)

    def _resume_interrupted(self, rt: dict) -> None:
        """An earlier verb stopped the guest (to save its memory, or while restoring it) and
        died before it ran again: bring it to the run state that verb was going to leave."""
        want = rt.get("resume")
        if want is None:
            return
        st = self._session.execute("query-status")
        if st["status"] in ("inmigrate",):
            raise self._waiting_for_memory()
        if want == "running" and not st["running"]:
            self._session.execute("cont")
            self.notice("machine '%s': an interrupted operation had stopped the guest: it runs "
                        "again" % self.name)
        self._settled(rt)

    def _waiting_for_memory(self) -> MachineError:
        return MachineError("machine '%s' is waiting for its memory (an interrupted revert): "
                            "'machine stop %s --force', then revert again"
                            % (self.name, self.name))

    def _need_launch(self, m: MachineState, what: str) -> None:
        if not m.launch:
            raise MachineError("machine '%s' has no launch definition (it was attached): %s "
                               "needs to restart its QEMU; define the machine with --memory/"
                               "--kernel... to allow it" % (self.name, what))

    def _relaunch(self, m: MachineState, s, *, running: Optional[bool]) -> None:
        """Start the QEMU on the tree's disks with snapshot s's memory (None: boot fresh);
        running: the run state afterwards (None: as it was at s)."""
        live = self.tree.live
        want = running if running is not None else \
            (s is None or s.memory == NO or s.vm_state == "running")
        if s is not None and s.memory == EXTERNAL:
            rt = self._launch(m, incoming=s.memfile, resume="running" if want else "paused")
        else:
            rt = self._launch(m, paused=True, resume="running" if want else "paused")
        with live.connect(rt) as sess:
            if s is not None and s.memory == INTERNAL:
                from qmp_bridge.internal import load_vm
                devs = [live.node_name(m.disk(d).active) for d, ds in s.disks.items()
                        if ds.kind == INTERNAL]
                load_vm(sess, s.name, devices=devs,
                        vmstate=live.node_name(m.disk(s.memfile).active))
            if want:
                sess.execute("cont")
        self._settled(rt)

    def recover(self) -> Optional[str]:
        """Finish a pending operation: "rolled back", "rolled forward", or None (none)."""
        m, rec = self._begin(need_consistent=False, say=False)
        self._end()
        return rec

    def create_snapshot(self, name: str, *, description: str = "", diskspecs=None,
                        disk_only: bool = False, memspec: Optional[str] = None,
                        live: bool = False, halt: bool = False) -> TreeResult:
        """diskspecs: {disk: kind} or {disk: (kind, file)} (kind internal|external|no).
        A running machine: internal with its memory by default (snapshot-save), external
        disk-only with disk_only (one transaction), external with the memory in the file
        memspec (paused while it is saved; live: saved while the guest runs, paused only for
        the switch); halt stops the machine afterwards."""
        specs = {}
        for d, v in (diskspecs or {}).items():
            kind, file = (v, None) if isinstance(v, str) else v
            if kind not in KINDS:
                raise InvalidRequestError("--diskspec %s: snapshot=%s: use internal, external "
                                          "or no" % (d, kind))
            specs[d] = (kind, file)
        if memspec and disk_only:
            raise InvalidRequestError("--memspec and --disk-only exclude each other")
        if live and not memspec:
            raise InvalidRequestError("--live needs --memspec (the memory saved while the guest "
                                      "runs)")
        m, rec = self._begin()
        try:
            p = Planner(m, self.backend, "create")
            if self._rt is not None:
                with_state = self.tree.live.run_state(self._session)
                p.live = {"state": with_state, "memfile": memspec, "live": live}
            elif memspec or halt:
                raise InvalidRequestError("machine '%s' is shut off: --memspec and --halt apply "
                                          "to a running machine" % self.name)
            p.create(name, description, specs, disk_only)
            res = self._run(m, p, rec, "create", name)
            pause = getattr(self._live_backend, "pause_seconds", None)
            if pause is not None:
                res.paused_seconds = pause
            if halt and res.completed:
                self.tree.live.stop_machine(self._rt, force=True, session=self._session)
                self.store.set_runtime(self.name, None)
            return res
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
               running: Optional[bool] = None, speed: Optional[int] = None,
               progress: Optional[Progress] = None,
               cancel: Optional[threading.Event] = None) -> TreeResult:
        """running: True/False the machine runs/is paused afterwards (default: as it was at
        the snapshot if it has memory; a disk-only target leaves the machine shut off unless
        running=True boots it).  speed: bytes/s for the merge jobs of a running machine."""
        if mode not in MODES:
            raise InvalidRequestError("unknown revert mode '%s'" % mode)
        self._speed = speed
        if self.runtime() is not None:
            return self._revert_running(name, mode, discard, force, auto_snapshot, running,
                                        progress, cancel)
        m = self.state()
        target = name or m.current
        s = m.snapshots.get(target) if target else None
        # the memory at S goes with S's disks: a reset (follow and commit show the branch as
        # it is now, whose memory is not S's)
        start = running is not None or (s is not None and s.memory != NO and mode == "reset")
        if start:
            self._need_launch(m, "restoring the machine's state" if running is None
                              else "starting it")
        later = discard and start and s is not None and s.memory != NO
        res = self._revert(name, mode, discard and not later, force, auto_snapshot, None,
                           progress, cancel)
        if res.completed and start:
            res.run_state = self._start_after_revert(res, running, mode)
            if later:
                self._discard_after(res)
        return res

    def _discard_after(self, res: TreeResult) -> None:
        """--discard of a snapshot whose memory was just loaded: deleted once it is."""
        d = self.delete(res.snapshot)
        res.deleted += d.deleted
        res.removed += d.removed

    def _start_after_revert(self, res: TreeResult, running: Optional[bool],
                            mode: str) -> str:
        m = self.state()
        s = m.snapshots.get(res.snapshot)
        mem = s if s is not None and s.memory != NO and mode == "reset" else None
        if mem is None and running is None:
            return "shut off"
        self.store.lock(self.name)
        try:
            self._relaunch(m, mem, running=running)
        finally:
            self.store.unlock(self.name)
        return self.run_state()

    def _revert(self, name, mode, discard, force, auto_snapshot, auto_memory, progress,
                cancel) -> TreeResult:
        now = auto_memory.get("now") if auto_memory else None
        m, rec = self._begin()
        try:
            if name is None:
                if m.current is None:
                    raise MachineError("machine '%s' has no current snapshot" % self.name)
                name = m.current
            m.snapshot(name)
            if mode != "commit":
                p = Planner(m, self.backend, "revert", now=now)
                p.auto_memory = auto_memory
                p.revert(name, mode, no_auto=not auto_snapshot)
                if discard:
                    p.delete(name)
                return self._run(m, p, rec, "revert", name)
            # --commit: the disks show S.overlay (follow), what else depends on S.base is
            # refused or (--force) deleted, S is marked merging; a cancel while the overlays
            # are merged leaves that state, and the same command resumes from it
            p = Planner(m, self.backend, "revert-commit", now=now)
            p.auto_memory = auto_memory
            p.revert_commit_prepare(name, no_auto=not auto_snapshot, force=force)
            p.mark()
            p.merge(name, discard=discard)
            return self._run(m, p, rec, "revert", name, progress=progress, cancel=cancel)
        finally:
            self._end()

    def _revert_running(self, name, mode, discard, force, auto_snapshot, running, progress,
                        cancel) -> TreeResult:
        m = self.state()
        if name is None:
            if m.current is None:
                raise MachineError("machine '%s' has no current snapshot" % self.name)
            name = m.current
        s = m.snapshot(name)
        # --commit of the snapshot the running disks are on: live commit jobs, no restart
        if mode == "commit" and all(ds.kind != EXTERNAL or ds.overlay == m.disk(d).active
                                    for d, ds in s.disks.items()) and INTERNAL not in s.kinds:
            res = self._revert(name, mode, discard, force, auto_snapshot, None, progress,
                               cancel)
            res.run_state = self.run_state()
            return res
        # nothing leaves the tip (a follow onto the branch the disks are on): no restart
        if mode != "reset" and not Planner(m, self.tree.backend, "revert")._leaves_tip(s, mode):
            res = self._revert(name, mode, discard, force, auto_snapshot, None, progress,
                               cancel)
            res.run_state = self.run_state()
            return res
        if (s.memory == NO or mode != "reset") and not force:
            raise MachineError("machine '%s' is running and %s: reverting loses the running "
                               "guest (use --force)" % (self.name, "snapshot '%s' has no memory "
                                                        "state" % name if s.memory == NO else
                                                        "--%s shows the branch as it is now, "
                                                        "without memory" % mode))
        self._need_launch(m, "reverting a running machine")
        if s.memory == INTERNAL:
            for d, ds in s.disks.items():
                if ds.kind == INTERNAL and (ds.file != m.disk(d).active or
                                            m.frozen_needed(ds.file)):
                    raise MachineError(
                        "snapshot '%s' keeps its memory inside '%s', which an external "
                        "snapshot has frozen since: its memory cannot be restored (shut the "
                        "machine off and revert to its disks, or revert to a snapshot taken "
                        "after)" % (name, ds.file))
        live = self.tree.live
        auto_memory = None
        t_stop = None           # when the running guest stopped
        self.store.lock(self.name)
        try:
            rt = self.runtime()
            with live.connect(rt) as sess:
                state = live.run_state(sess)
                rt["resume"] = state            # if we die before QEMU is gone
                self.store.set_runtime(self.name, rt)
                if auto_snapshot:
                    # the tip keeps its memory: saved (the guest stopped) before QEMU goes,
                    # named after the automatic snapshot the revert will make of the tip
                    now = time.time()
                    auto = Planner(m, self.tree.backend, "revert", now=now).unique_snapshot_name(
                        time.strftime("auto-%Y%m%d-%H%M%S", time.localtime(now)))
                    mf = os.path.join(m.disks[0].folder, "%s.%s.mem" % (self.name, auto))
                    if os.path.exists(mf):
                        os.unlink(mf)       # a stray of an earlier revert that failed
                    if state == "running":
                        sess.execute("stop")
                        t_stop = time.monotonic()
                    live.migrate_out(sess, mf)
                    auto_memory = {"memory": EXTERNAL, "memfile": mf, "vm_state": state,
                                   "now": now}
            if t_stop is None:
                t_stop = time.monotonic()
            live.stop_machine(rt, force=True)
            self.store.set_runtime(self.name, None)
        finally:
            self.store.unlock(self.name)
        later = discard and s.memory != NO
        self._keep_memory = auto_memory["memfile"] if auto_memory else None
        try:
            res = self._revert(name, mode, discard and not later, force, auto_snapshot,
                               auto_memory, progress, cancel)
        finally:
            self._keep_memory = None
            if auto_memory is not None:
                after = self.state()
                if not any(x.memfile == auto_memory["memfile"] for x in after.snapshots.values()):
                    try:
                        os.unlink(auto_memory["memfile"])
                    except FileNotFoundError:
                        pass
        if res.completed:
            res.run_state = self._start_after_revert(res, running, mode)
            res.paused_seconds = time.monotonic() - t_stop     # until it runs (or not) again
            if later:
                self._discard_after(res)
        return res

    def delete(self, name: str, *, children: bool = False, children_only: bool = False,
               metadata: bool = False, flatten: bool = False, speed: Optional[int] = None,
               progress: Optional[Progress] = None) -> TreeResult:
        self._speed = speed
        m, rec = self._begin(need_consistent=not metadata)
        try:
            p = Planner(m, self.backend, "delete")
            p.delete(name, children=children, children_only=children_only, metadata=metadata,
                     flatten=flatten)
            return self._run(m, p, rec, "delete", name, progress=progress)
        finally:
            self._end()


def _drop_stray_memory(m: MachineState, keep=None) -> None:
    """The memory a revert saved for the automatic snapshot of a running tip, left behind
    when the revert died before the snapshot was recorded: nothing refers to it."""
    if not m.disks:
        return
    folder = m.disks[0].folder
    prefix = m.name + ".auto-"
    known = {s.memfile for s in m.snapshots.values() if s.memory == EXTERNAL}
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for f in names:
        if f.startswith(prefix) and (f.endswith(".mem") or f.endswith(".mem.part")):
            p = os.path.join(folder, f)
            if p not in known and p != keep:
                try:
                    os.unlink(p)
                except OSError:
                    pass


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
