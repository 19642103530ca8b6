"""Machine snapshot trees on a running QEMU: launching a machine's QEMU, and the tree's steps
(tree.backend.Backend) done live over QMP.

Launch (`launch_machine`): `qemu-system-x86_64 -daemonize` with every layer of every disk's
chain as its own `-blockdev` node (node names derived from the file's path, so a later process
finds them again), each disk a virtio-blk device whose id is the disk's name
(`/machine/peripheral/<disk>`), the QMP monitor on a unix socket in the state directory
(`run/<machine>.qmp`; QEMU serves one client at a time and we only connect for a command), the
serial console appended to `run/<machine>.serial`.  QEMU is never our child: it outlives the
command that started it, and a QEMU that died is noticed from its pid (and its command line,
against pid reuse).

LiveBackend: a step whose files are not open in the QEMU runs offline (the offline backend it
wraps); a step on an open file runs as QMP: internal tags with blockdev-snapshot-internal-sync
and blockdev-snapshot-delete-internal-sync, merges as block-commit (active commit + pivot when
the top is the disk's active image) and block-stream jobs, files QEMU still holds are
blockdev-del'd before they are removed.  The two steps only a running machine has:
`live_switch` (one transaction over every disk: new overlays, internal tags; with a memory
file the guest is paused, its state migrated to the file, then switched and resumed; `live`:
migrated while it runs, paused only for the switch) and `live_save` (a snapshot-save job: tags
on every disk and the memory in one of them).  Job ids are derived from the step, so after a
crash the journal's next run of the step finds the job QEMU still has and finishes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import signal
import socket
import struct
import subprocess
import time
from typing import Any, Optional

from qcow2engine.errors import JobCancelled, MachineError
from qcow2engine.tree.launch import check_launch
from qcow2engine.tree.model import Stamp

from .client import QMPSession
from .errors import LiveJobError, QMPCommandError, QMPError
from .graph import read_graph

log = logging.getLogger(__name__)

QEMU_SYSTEM = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")
RUNNING_STATES = ("running",)
MIGRATION_SPEED = 64 << 30          # bytes/s: a file is not a network (7.2's default: 32 MiB/s)

# ---------------------------------------------------------------- launching
def node_name(path: str) -> str:
    """The node name of the image at path in our QEMU (stable across processes)."""
    return "q" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:20]


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def run_paths(state_dir: str, name: str) -> dict:
    d = os.path.join(state_dir, "run")
    os.makedirs(d, exist_ok=True)
    paths = {"qmp": os.path.join(d, name + ".qmp"), "ctl": os.path.join(d, name + ".ctl"),
             "mon": os.path.join(d, name + ".mon"),
             "serial": os.path.join(d, name + ".serial"),
             "pidfile": os.path.join(d, name + ".pid"), "log": os.path.join(d, name + ".log")}
    for k in ("qmp", "ctl", "mon"):
        if len(paths[k].encode()) > 107:
            raise MachineError("the QMP socket path '%s' is longer than a unix socket allows "
                               "(107 bytes): use a shorter --state-dir" % paths[k])
    return paths


def qemu_command(m, launch: dict, paths: dict, *, paused: bool, incoming: bool) -> list:
    """The command line that starts machine m (a MachineState) as its tree says it is now."""
    accel = launch["accel"]
    if accel == "auto":
        accel = "kvm" if _kvm_usable() else "tcg"
    cmd = [QEMU_SYSTEM, "-name", m.name, "-machine", launch["machine_type"], "-accel", accel,
           "-m", "%dM" % (launch["memory"] >> 20), "-smp", str(launch["cpus"]),
           "-nodefaults", "-no-user-config", "-display", "none",
           # three monitors (QEMU serves one client on each): the public one for other
           # tools, ours for the verbs (under the machine's lock), ours for quick queries
           "-chardev", "socket,id=qmp,path=%s,server=on,wait=off" % paths["qmp"],
           "-mon", "chardev=qmp,mode=control",
           "-chardev", "socket,id=ctl,path=%s,server=on,wait=off" % paths["ctl"],
           "-mon", "chardev=ctl,mode=control",
           "-chardev", "socket,id=mon,path=%s,server=on,wait=off" % paths["mon"],
           "-mon", "chardev=mon,mode=control",
           "-chardev", "file,id=serial0,path=%s,append=on" % paths["serial"],
           "-serial", "chardev:serial0",
           "-daemonize", "-pidfile", paths["pidfile"], "-D", paths["log"]]
    if launch["kernel"]:
        cmd += ["-kernel", launch["kernel"]]
    if launch["initrd"]:
        cmd += ["-initrd", launch["initrd"]]
    if launch["append"]:
        cmd += ["-append", launch["append"]]
    for d in m.disks:
        chain = m.chain(d.active)
        below = None
        for path in reversed(chain):
            rec = m.files[path]
            node = node_name(path)
            doc = {"driver": rec.fmt, "node-name": node,
                   "file": {"driver": "file", "filename": path, "node-name": node + "-f"}}
            if rec.fmt == "qcow2":
                doc["backing"] = below
            if path != d.active:
                doc["read-only"] = True
            cmd += ["-blockdev", json.dumps(doc, separators=(",", ":"))]
            below = node
        cmd += ["-device", "virtio-blk-pci,drive=%s,id=%s" % (below, d.name)]
    cmd += list(launch["qemu_args"])
    if paused or incoming:
        cmd.append("-S")
    if incoming:
        cmd += ["-incoming", "defer"]
    return cmd


def _device_id_ok(name: str) -> bool:
    return bool(name) and name[0].isalpha() and all(c.isalnum() or c in "-._" for c in name)


def launch_machine(m, state_dir: str, *, paused: bool = False,
                   incoming: Optional[str] = None, timeout: float = 60.0) -> dict:
    """Start machine m's QEMU (detached); returns its runtime document.  incoming: a memory
    file to restore (the machine then waits paused with the state loaded)."""
    if not m.launch:
        raise MachineError("machine '%s' has no launch definition (machine define ... "
                           "--memory/--kernel...): it cannot be started" % m.name)
    launch = check_launch(m.launch)
    for d in m.disks:
        if not _device_id_ok(d.name):
            raise MachineError("disk name '%s' cannot be a QEMU device id (a letter first, then "
                               "letters, digits, '-', '.', '_')" % d.name)
    paths = run_paths(state_dir, m.name)
    for k in ("qmp", "ctl", "mon", "pidfile"):
        if os.path.lexists(paths[k]):
            os.unlink(paths[k])
    cmd = qemu_command(m, launch, paths, paused=paused, incoming=incoming is not None)
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
    except FileNotFoundError:
        raise MachineError("cannot start machine '%s': %s is not installed" % (m.name,
                                                                               QEMU_SYSTEM)) \
            from None
    except subprocess.TimeoutExpired:
        raise MachineError("cannot start machine '%s': QEMU did not come up within %.0f s"
                           % (m.name, timeout)) from None
    if r.returncode != 0:
        msg = (r.stderr.decode(errors="replace").strip().splitlines() or ["exit %d"
                                                                          % r.returncode])
        raise MachineError("cannot start machine '%s': %s" % (m.name, msg[-1]))
    try:
        pid = int(open(paths["pidfile"]).read().strip())
    except (OSError, ValueError):
        raise MachineError("machine '%s': QEMU started but wrote no pid file" % m.name) \
            from None
    rt = {"pid": pid, "qmp": paths["qmp"], "ctl": paths["ctl"], "mon": paths["mon"],
          "serial": paths["serial"], "launched": True, "started": time.time(),
          "accel": launch["accel"]}
    if incoming is not None:
        with connect(rt) as s:
            migrate_in(s, incoming)
    return rt


def connect(rt: dict, timeout: float = 30.0, *, which: str = "ctl") -> QMPSession:
    """A session on one of the machine's monitors: "ctl" (the verbs), "mon" (quick
    queries), "qmp" (the public one); an attached machine has only the one it was given."""
    path = rt.get(which) or rt["qmp"]
    try:
        return QMPSession.attach(path, timeout=timeout, connect_timeout=10.0)
    except QMPError as e:
        raise MachineError("cannot reach the machine's QEMU at %s: %s" % (path, e)) \
            from None


def alive(rt: dict) -> bool:
    """Is the QEMU of this runtime document still there (and not a zombie, nor another
    process that got its pid)?"""
    pid = rt.get("pid")
    if not pid and rt.get("pidfile"):
        try:                                # recorded before the start: QEMU's own pid file
            pid = int(open(rt["pidfile"]).read().strip())
        except (OSError, ValueError):
            return False
    if not pid:
        return os.path.exists(rt["qmp"])
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return rt["qmp"].encode() in cmdline or not rt.get("launched")


def run_state(s: QMPSession) -> str:
    st = s.execute("query-status")
    return "running" if st["running"] else "paused"


def peer_pid(path: str) -> Optional[int]:
    sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sk.settimeout(5)
        sk.connect(path)
        creds = sk.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        return pid or None
    except OSError:
        return None
    finally:
        sk.close()


def stop_machine(rt: dict, *, force: bool = False, timeout: float = 60.0,
                 session: Optional[QMPSession] = None) -> str:
    """Power the machine off: ACPI power-down, then (after timeout, or at once with force)
    quit.  Returns "powered down" or "quit".  session: one already open on the machine."""
    how = "quit"

    def down(s):
        if not force:
            s.execute("system_powerdown")
            if _wait_gone(rt, timeout):
                return True
        try:
            s.execute("quit")
        except QMPError:
            pass
        return False
    try:
        if session is not None:
            if down(session):
                return "powered down"
        else:
            with connect(rt, timeout=10.0) as s:
                if down(s):
                    return "powered down"
    except (MachineError, QMPError):
        pass
    if not _wait_gone(rt, 15.0):
        pid = rt.get("pid")
        if pid:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                if _wait_gone(rt, 5.0):
                    break
        if not _wait_gone(rt, 5.0):
            raise MachineError("the machine's QEMU (pid %s) does not stop" % rt.get("pid"))
    return how


def _wait_gone(rt: dict, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while True:
        if not alive(rt):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)


def migrate_out(s: QMPSession, path: str, timeout: float = 600.0,
                before_switchover=None) -> None:
    """Save the guest's state to path (a migration stream).  before_switchover: called when
    a migration with the pause-before-switchover capability has stopped the guest (its disks
    still active), before it completes."""
    tmp = path + ".part"
    s.execute("migrate-set-parameters", {"max-bandwidth": MIGRATION_SPEED})
    s.execute("migrate", {"uri": "exec:cat > %s" % shlex.quote(tmp)})
    if before_switchover is not None:
        _wait_migration(s, timeout, "saving the memory to '%s'" % path,
                        until="pre-switchover")
        try:
            before_switchover()
        except BaseException:
            try:
                s.execute("migrate_cancel")
            except QMPError:
                pass
            raise
        s.execute("migrate-continue", {"state": "pre-switchover"})
    _wait_migration(s, timeout, "saving the memory to '%s'" % path)
    from qcow2engine.host import fileio
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fileio.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fileio.fsync(dfd)
    finally:
        os.close(dfd)


def migrate_in(s: QMPSession, path: str, timeout: float = 600.0) -> None:
    """Load the guest's state from path into a QEMU started with -incoming defer."""
    if not os.path.isfile(path):
        raise MachineError("memory file '%s' is missing" % path)
    s.execute("migrate-incoming", {"uri": "exec:cat %s" % shlex.quote(path)})
    end = time.monotonic() + timeout
    while True:
        st = s.execute("query-status")["status"]
        mig = s.execute("query-migrate")
        if mig.get("status") == "failed":
            raise MachineError("loading the memory from '%s' failed: %s"
                               % (path, mig.get("error-desc", "?")))
        if st not in ("inmigrate",) and mig.get("status") in (None, "completed"):
            return
        if time.monotonic() > end:
            raise MachineError("loading the memory from '%s' did not finish" % path)
        time.sleep(0.02)


def _wait_migration(s: QMPSession, timeout: float, what: str,
                    until: str = "completed") -> None:
    end = time.monotonic() + timeout
    while True:
        mig = s.execute("query-migrate")
        st = mig.get("status")
        if st == until:
            return
        if st in ("failed", "cancelled"):
            raise MachineError("%s failed: %s" % (what, mig.get("error-desc", st)))
        if time.monotonic() > end:
            try:
                s.execute("migrate_cancel")
            except QMPError:
                pass
            raise MachineError("%s did not finish within %.0f s" % (what, timeout))
        time.sleep(0.01)


# ---------------------------------------------------------------- the steps, live
def _job_id(kind: str, *parts: Any) -> str:
    return "qe-%s-%s" % (kind, hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:12])


class _Cancelled(Exception):
    pass


class LiveBackend:
    """The tree's steps on a running machine (see the module docstring)."""

    def __init__(self, offline, session: QMPSession):
        self.off = offline
        self.s = session
        self.pause_seconds: Optional[float] = None     # how long the last switch paused
        self.speed: Optional[int] = None                # bytes/s of merge jobs (None: no limit)
        self._stopped_at: Optional[float] = None

    # ------------------------------------------------------------ the graph
    def _nodes(self) -> dict:
        """path -> (node name, read-only) of every image node QEMU has open."""
        g = read_graph(self.s)
        out = {}
        for n in g.nodes.values():
            if n.driver in ("qcow2", "raw") and n.filename and not n.filename.startswith("json:"):
                out[os.path.abspath(n.filename)] = (n.name, n.read_only)
        return out

    def graph(self):
        return read_graph(self.s)

    def disk_chains(self) -> dict:
        """disk (device id) -> [paths of its chain, active first]."""
        return {d.name: [os.path.abspath(n.filename) for n in d.chain]
                for d in read_graph(self.s).disks}

    def begin_verb(self) -> None:
        getattr(self.off, "begin_verb", lambda: None)()

    def end_verb(self) -> None:
        getattr(self.off, "end_verb", lambda: None)()

    def _forget(self) -> None:
        getattr(self.off, "_forget", lambda: None)()

    # ------------------------------------------------------------ looking
    def probe(self, path):
        return self.off.probe(path)

    def stamp(self, path):
        if os.path.abspath(path) in {c[0] for c in self.disk_chains().values() if c}:
            # the guest writes it: a stamp that never matches (the tip always changed)
            return Stamp(self.off.probe(path).vsize, time.time_ns(), 0, "live")
        return self.off.stamp(path)

    def allocated(self, path):
        return self.off.allocated(path)

    def exists(self, path):
        return self.off.exists(path)

    def in_use(self, path):
        if os.path.abspath(path) in self._nodes():
            return False                    # our own QEMU
        return self.off.in_use(path)

    # ------------------------------------------------------------ steps on files
    def create_overlay(self, path, backing, backing_fmt, size):
        if os.path.abspath(path) in self._nodes():
            return                          # done before a crash: QEMU runs on it already
        self.off.create_overlay(path, backing, backing_fmt, size)

    def remove_file(self, path):
        ent = self._nodes().get(os.path.abspath(path))
        if ent is not None:
            self._del_node(ent[0])
        self.off.remove_file(path)

    def _del_node(self, node: str) -> None:
        try:
            self.s.execute("blockdev-del", {"node-name": node})
        except QMPCommandError as e:
            raise MachineError("QEMU still uses '%s': %s" % (node, e)) from None
        try:
            self.s.execute("blockdev-del", {"node-name": node + "-f"})
        except QMPCommandError:
            pass

    def internal_create(self, path, tag):
        ent = self._nodes().get(os.path.abspath(path))
        if ent is None:
            return self.off.internal_create(path, tag)
        if tag in self._tags(ent[0]):
            return
        self.s.execute("blockdev-snapshot-internal-sync", {"device": ent[0], "name": tag})

    def _tags(self, node: str) -> tuple:
        g = read_graph(self.s)
        n = g.nodes.get(node)
        return n.snapshots if n else ()

    def internal_apply(self, path, tag):
        if os.path.abspath(path) in self._nodes():
            raise MachineError("cannot apply internal snapshot '%s' to '%s' while the machine "
                               "runs on it" % (tag, path))
        self.off.internal_apply(path, tag)

    def internal_delete(self, path, tag):
        ent = self._nodes().get(os.path.abspath(path))
        if ent is None:
            return self.off.internal_delete(path, tag)
        if tag not in self._tags(ent[0]):
            return
        from .internal import delete_vm
        try:
            if ent[1]:
                # a backing file QEMU reads: writable for the job, read-only again after
                self._reopen(ent[0], read_only=False)
                try:
                    delete_vm(self.s, tag, devices=[ent[0]])    # a snapshot-delete job
                finally:
                    self._reopen(ent[0], read_only=True)
            else:
                delete_vm(self.s, tag, devices=[ent[0]])
        finally:
            self._forget()

    def _reopen(self, node: str, *, read_only: bool) -> None:
        n = read_graph(self.s).nodes[node]
        opts = {"driver": n.driver, "node-name": node, "read-only": read_only}
        if n.file_child:
            opts["file"] = n.file_child
        if n.driver == "qcow2":
            opts["backing"] = n.backing
        try:
            self.s.execute("blockdev-reopen", {"options": [opts]})
        except QMPCommandError as e:
            raise MachineError("cannot make '%s' %s in QEMU: %s"
                               % (n.filename, "read-only" if read_only else "writable", e)) \
                from None

    def internal_to_overlay(self, overlay, path, tag, progress=None, cancel=None):
        ent = self._nodes().get(os.path.abspath(path))
        if ent is not None and not ent[1]:
            raise MachineError("cannot read snapshot '%s' of '%s' while the guest writes it"
                               % (tag, path))
        self.off.internal_to_overlay(overlay, path, tag, progress, cancel)

    def resize(self, path, size):
        if os.path.abspath(path) in self._nodes():
            raise MachineError("cannot resize '%s' while the machine runs on it" % path)
        self.off.resize(path, size)

    def repair(self, path):
        if os.path.abspath(path) in self._nodes():
            return      # QEMU owns it (and a live step leaves no leak to give back)
        self.off.repair(path)

    def rebase(self, path, backing, backing_fmt):
        nodes = self._nodes()
        ent = nodes.get(os.path.abspath(path))
        if ent is None:
            return self.off.rebase(path, backing, backing_fmt)
        g = read_graph(self.s)
        n = g.nodes[ent[0]]
        want = os.path.abspath(backing) if backing else None
        have = None
        if n.backing and g.nodes.get(n.backing) is not None:
            bf = g.nodes[n.backing].filename
            have = os.path.abspath(bf) if bf else None
        if have != want:
            raise MachineError("cannot rebase '%s' while the machine runs on it" % path)
        if self.off.probe(path).backing == want:
            return
        disk = g.disk(ent[0])
        self.s.execute("change-backing-file", {
            "device": disk.root, "image-node-name": ent[0],
            "backing-file": _rel(path, backing) if backing else ""})

    # ------------------------------------------------------------ merges as jobs
    def _run_job(self, start, job_id, progress, cancel, *, pivot=None):
        from .blockjobs import ChainJob
        g = read_graph(self.s)
        existing = next((j for j in g.jobs if j.id == job_id), None)
        job = ChainJob.adopt_on(self.s, job_id, g) if existing else start()

        def prog(done, total):
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            if progress is not None:
                progress(done, total)
        try:
            with job:
                try:
                    r = job.finish(progress=prog, pivot=pivot)
                except _Cancelled:
                    r = job.cancel(timeout=60)
                    if r.outcome == "cancelled":
                        raise JobCancelled("cancelled") from None
        finally:
            self._forget()
        return r

    def commit(self, top, base, progress=None, cancel=None):
        nodes = self._nodes()
        t = nodes.get(os.path.abspath(top))
        if t is None:
            if os.path.abspath(base) in nodes:
                # QEMU has the base but not the top: only a completed commit (the pivot, or
                # an intermediate commit that dropped the top) leaves that; done before
                # a crash
                log.info("commit of %s into %s: already done", top, base)
                return
            return self.off.commit(top, base, progress, cancel)
        from .blockjobs import start_commit
        g = read_graph(self.s)
        b = nodes.get(os.path.abspath(base))
        job_id = _job_id("commit", top, base)
        if b is None:
            if any(j.id == job_id for j in g.jobs):
                b = None                    # adopt below
            else:
                raise MachineError("cannot commit '%s' into '%s': QEMU does not have the base "
                                   "open" % (top, base))
        disk = g.disk(t[0])
        if b is not None and b[0] not in disk.node_names:
            raise MachineError("'%s' is not below '%s' in disk %s" % (base, top, disk.name))
        active = disk.root == t[0] or disk.node_names[0] == t[0]
        self._run_job(lambda: start_commit(self.s, disk.name, top=t[0], base=b[0],
                                           job_id=job_id, graph=g, speed=self.speed),
                      job_id, progress, cancel, pivot=True if active else None)

    def stream(self, path, base, base_fmt, progress=None, cancel=None):
        nodes = self._nodes()
        p = nodes.get(os.path.abspath(path))
        if p is None:
            return self.off.stream(path, base, base_fmt, progress, cancel)
        from .blockjobs import ChainJob
        g = read_graph(self.s)
        n = g.nodes[p[0]]
        want = os.path.abspath(base) if base else None
        have = None
        if n.backing and g.nodes.get(n.backing) is not None and g.nodes[n.backing].filename:
            have = os.path.abspath(g.nodes[n.backing].filename)
        job_id = _job_id("stream", path, base)
        if have == want and not any(j.id == job_id for j in g.jobs):
            return
        disk = g.disk(p[0])
        args = {"job-id": job_id, "device": p[0], "auto-finalize": False,
                "auto-dismiss": False}
        if self.speed:
            args["speed"] = int(self.speed)
        if base:
            bn = nodes.get(want)
            if bn is None:
                raise MachineError("cannot stream into '%s': QEMU does not have '%s' open"
                                   % (path, base))
            args["base-node"] = bn[0]
            args["backing-file"] = _rel(path, base)

        def start():
            return ChainJob.start(self.s, "block-stream", args, "stream", disk=disk.name,
                                  chain_before=disk.node_names)
        self._run_job(start, job_id, progress, cancel)

    # ------------------------------------------------------------ the live-only steps
    def live_switch(self, overlays=None, internal=None, memfile=None, live=False,
                    resume=None):
        """One transaction: disk -> [base, overlay] onto new overlays, disk -> [path, tag]
        internal tags; with memfile the guest's state goes to that file first (the guest
        paused from then until the switch is done)."""
        overlays = overlays or {}
        internal = internal or {}
        nodes = self._nodes()
        actions, added = [], []
        for disk, (base, ov) in sorted(overlays.items()):
            if os.path.abspath(ov) in nodes and not nodes[os.path.abspath(ov)][1]:
                continue                    # switched before a crash
            b = nodes.get(os.path.abspath(base))
            if b is None:
                raise MachineError("disk %s: QEMU does not run on '%s'" % (disk, base))
            node = node_name(ov)
            if os.path.abspath(ov) not in nodes:
                self.s.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": node, "backing": None,
                    "file": {"driver": "file", "filename": os.path.abspath(ov),
                             "node-name": node + "-f"}})
                added.append(node)
            actions.append({"type": "blockdev-snapshot", "data": {"node": b[0],
                                                                  "overlay": node}})
        for disk, (path, tag) in sorted(internal.items()):
            ent = nodes.get(os.path.abspath(path))
            if ent is None:
                raise MachineError("disk %s: QEMU does not run on '%s'" % (disk, path))
            if tag in self._tags(ent[0]):
                continue
            actions.append({"type": "blockdev-snapshot-internal-sync",
                            "data": {"device": ent[0], "name": tag}})
        was = run_state(self.s)
        if resume is not None:
            was = resume            # done again after a crash: the state before the first try
        t0 = None
        switched = not actions

        def switch():
            nonlocal switched
            if actions:
                try:
                    self.s.execute("transaction", {"actions": actions})
                except QMPCommandError as e:
                    e.nothing_changed = True        # QEMU rolls a transaction back whole
                    raise
            switched = True
        try:
            if not memfile:
                switch()                            # atomic for the guest: no pause
            elif live and was == "running":
                # the memory goes while the guest runs; the migration stops it before the
                # switch-over (the disks still active), the disks switch, then it completes
                self.s.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "pause-before-switchover", "state": True}]})
                try:
                    def at_switchover():
                        self._stopped_at = time.monotonic()
                        switch()
                    migrate_out(self.s, memfile, before_switchover=at_switchover)
                finally:
                    self.s.execute("migrate-set-capabilities", {"capabilities": [
                        {"capability": "pause-before-switchover", "state": False}]})
            else:
                if run_state(self.s) == "running":
                    self.s.execute("stop")
                    t0 = time.monotonic()
                switch()                            # the guest stopped: disks and memory
                migrate_out(self.s, memfile)        # are of one instant
        except BaseException as e:
            if not switched:
                for node in added:
                    try:
                        self._del_node(node)
                    except Exception:   # noqa: BLE001 - the first error is the one to report
                        pass
                if memfile and os.path.exists(memfile):
                    os.unlink(memfile)
                if not getattr(e, "nothing_changed", False) and isinstance(e, QMPCommandError):
                    e.nothing_changed = True
            raise
        finally:
            if run_state(self.s) != was and was == "running":
                self.s.execute("cont")
            if t0 is not None:
                self.pause_seconds = time.monotonic() - t0
            elif self._stopped_at is not None:
                self.pause_seconds = time.monotonic() - self._stopped_at
            self._stopped_at = None
            self._forget()

    def live_save(self, tag, paths, vmstate):
        """snapshot-save: tag on every disk's active image (paths: disk -> path), the memory
        in vmstate's."""
        from .internal import save_vm
        nodes = self._nodes()
        devs = []
        for disk, path in sorted(paths.items()):
            ent = nodes.get(os.path.abspath(path))
            if ent is None:
                raise MachineError("disk %s: QEMU does not run on '%s'" % (disk, path))
            devs.append((disk, ent[0]))
        have = [n for _, n in devs if tag in self._tags(n)]
        if len(have) == len(devs):
            return                          # done before a crash
        if have:                            # half done before a crash: the whole again
            from .internal import delete_vm
            delete_vm(self.s, tag, devices=have)
        vm = dict(devs)[vmstate]
        t0 = time.monotonic()
        try:
            save_vm(self.s, tag, devices=[n for _, n in devs], vmstate=vm)
        except (QMPError, LiveJobError) as e:
            # refused (no space, a device that cannot snapshot...): nothing is left if no
            # disk has the tag, and the plan may be undone
            try:
                left = [n for _, n in devs if tag in self._tags(n)]
            except QMPError:
                left = devs
            if not left:
                e.nothing_changed = True
            raise
        finally:
            self.pause_seconds = time.monotonic() - t0
            self._forget()


def _rel(path: str, target: str) -> str:
    rel = os.path.relpath(target, os.path.dirname(path))
    return rel if not rel.startswith("..") else target

