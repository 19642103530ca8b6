"""MachineState state in SQLite (stdlib sqlite3, WAL): machines, disks, files, snapshots, and the
journal of the operation in progress.

One database per state directory: `--state-dir DIR`, else `$QCOW2ENGINE_STATE_DIR`, else
`$XDG_DATA_HOME/qcow2engine` (default `~/.local/share/qcow2engine`).  Every write is one
explicit transaction, committed through `host.fileio.db_commit` (where fault injection sees
it).  `save()` replaces a machine's rows in one transaction, so the tree on disk is always one
whole state, old or new.  One operation per machine at a time: `lock()` takes an exclusive
flock on `locks/<machine>.lock` without waiting ("machine busy" otherwise).
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from typing import Optional

from ..errors import MachineBusyError, MachineError
from ..host import fileio
from .model import Disk, DiskState, FileRec, MachineState, Snapshot, Stamp

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS machines(
    name TEXT PRIMARY KEY, created REAL NOT NULL, current TEXT, launch TEXT);
CREATE TABLE IF NOT EXISTS disks(
    machine TEXT NOT NULL REFERENCES machines(name) ON DELETE CASCADE,
    name TEXT NOT NULL, ord INTEGER NOT NULL, active TEXT NOT NULL, fmt TEXT NOT NULL,
    folder TEXT NOT NULL, baseline TEXT, PRIMARY KEY(machine, name));
CREATE TABLE IF NOT EXISTS files(
    machine TEXT NOT NULL REFERENCES machines(name) ON DELETE CASCADE,
    path TEXT NOT NULL, disk TEXT NOT NULL, fmt TEXT NOT NULL, backing TEXT,
    owned INTEGER NOT NULL, frozen TEXT, foreign_tags TEXT NOT NULL, below INTEGER NOT NULL,
    PRIMARY KEY(machine, path));
CREATE TABLE IF NOT EXISTS snapshots(
    machine TEXT NOT NULL REFERENCES machines(name) ON DELETE CASCADE,
    name TEXT NOT NULL, parent TEXT, created REAL NOT NULL, description TEXT NOT NULL,
    auto INTEGER NOT NULL, merging INTEGER NOT NULL, memory TEXT NOT NULL DEFAULT 'no',
    memfile TEXT, vm_state TEXT, PRIMARY KEY(machine, name));
CREATE TABLE IF NOT EXISTS snapshot_disks(
    machine TEXT NOT NULL, snapshot TEXT NOT NULL, disk TEXT NOT NULL, kind TEXT NOT NULL,
    file TEXT, overlay TEXT, size INTEGER NOT NULL, tag TEXT,
    PRIMARY KEY(machine, snapshot, disk),
    FOREIGN KEY(machine, snapshot) REFERENCES snapshots(machine, name) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS operations(
    machine TEXT PRIMARY KEY REFERENCES machines(name) ON DELETE CASCADE,
    kind TEXT NOT NULL, plan TEXT NOT NULL, done INTEGER NOT NULL, started REAL NOT NULL,
    status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runtime(
    machine TEXT PRIMARY KEY REFERENCES machines(name) ON DELETE CASCADE,
    doc TEXT NOT NULL);
"""

# what a database of an older schema needs to become this one
MIGRATIONS = {
    1: ["ALTER TABLE machines ADD COLUMN launch TEXT",
        "ALTER TABLE snapshots ADD COLUMN memory TEXT NOT NULL DEFAULT 'no'",
        "ALTER TABLE snapshots ADD COLUMN memfile TEXT",
        "ALTER TABLE snapshots ADD COLUMN vm_state TEXT",
        "CREATE TABLE IF NOT EXISTS runtime(machine TEXT PRIMARY KEY REFERENCES "
        "machines(name) ON DELETE CASCADE, doc TEXT NOT NULL)"],
}


def default_state_dir() -> str:
    d = os.environ.get("QCOW2ENGINE_STATE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(base, "qcow2engine")


class Store:
    """The database of one state directory."""

    def __init__(self, state_dir: Optional[str] = None):
        self.dir = os.path.abspath(state_dir or default_state_dir())
        try:
            os.makedirs(os.path.join(self.dir, "locks"), exist_ok=True)
            self.conn = sqlite3.connect(os.path.join(self.dir, "machines.db"),
                                        isolation_level=None, timeout=10.0)
        except (OSError, sqlite3.Error) as e:
            raise MachineError("cannot open the state directory '%s': %s" % (self.dir, e)) \
                from None
        c = self.conn
        try:
            c.execute("PRAGMA foreign_keys=ON")
            mode = c.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            if not c.execute("SELECT name FROM sqlite_master WHERE name='operations'"
                             ).fetchone():
                with self.transaction():
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            c.execute(stmt)
                    c.execute("INSERT OR REPLACE INTO meta VALUES('schema', ?)",
                              (str(SCHEMA_VERSION),))
            v = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if v is not None and v[0].isdigit() and int(v[0]) in MIGRATIONS:
                with self.transaction():
                    for n in range(int(v[0]), SCHEMA_VERSION):
                        for stmt in MIGRATIONS[n]:
                            c.execute(stmt)
                    c.execute("UPDATE meta SET value=? WHERE key='schema'",
                              (str(SCHEMA_VERSION),))
                v = (str(SCHEMA_VERSION),)
            if v is None or int(v[0]) != SCHEMA_VERSION:
                raise MachineError("state database '%s' has schema %s; this version reads %d"
                                   % (self.dir, v and v[0], SCHEMA_VERSION))
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise MachineError("state database in '%s' is unreadable: %s" % (self.dir, e)) \
                from None
        self._locks: dict = {}

    def close(self) -> None:
        for fd in self._locks.values():
            os.close(fd)
        self._locks.clear()
        self.conn.close()

    # ------------------------------------------------------------ transactions
    class _Txn:
        def __init__(self, store):
            self.s = store

        def __enter__(self):
            self.s.conn.execute("BEGIN IMMEDIATE")
            return self.s.conn

        def __exit__(self, et, ev, tb):
            if et is None:
                try:
                    fileio.db_commit(self.s.conn)
                except BaseException:
                    if self.s.conn.in_transaction:
                        self.s.conn.rollback()
                    raise
            elif self.s.conn.in_transaction:
                self.s.conn.rollback()

    def transaction(self):
        return Store._Txn(self)

    # ------------------------------------------------------------ locking
    def lock(self, name: str) -> None:
        """Take the machine's operation lock (no waiting); held until unlock()."""
        if name in self._locks:
            return
        p = os.path.join(self.dir, "locks", name + ".lock")
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MachineBusyError("machine '%s' is busy: another operation holds it" % name) \
                from None
        self._locks[name] = fd

    def unlock(self, name: str) -> None:
        fd = self._locks.pop(name, None)
        if fd is not None:
            os.close(fd)

    # ------------------------------------------------------------ machines
    def names(self) -> list:
        return [r[0] for r in self.conn.execute("SELECT name FROM machines ORDER BY name")]

    def exists(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM machines WHERE name=?", (name,)).fetchone() \
            is not None

    def load(self, name: str) -> MachineState:
        c = self.conn
        row = c.execute("SELECT created, current, launch FROM machines WHERE name=?",
                        (name,)).fetchone()
        if row is None:
            raise MachineError("machine '%s' not found" % name)
        m = MachineState(name, row[0], current=row[1],
                         launch=json.loads(row[2]) if row[2] else None)
        for n, active, fmt, folder, base in c.execute(
                "SELECT name, active, fmt, folder, baseline FROM disks WHERE machine=? "
                "ORDER BY ord", (name,)):
            m.disks.append(Disk(n, active, fmt, folder, _stamp(base)))
        for path, disk, fmt, backing, owned, frozen, tags, below in c.execute(
                "SELECT path, disk, fmt, backing, owned, frozen, foreign_tags, below FROM files "
                "WHERE machine=?", (name,)):
            m.files[path] = FileRec(path, disk, fmt, backing, bool(owned), _stamp(frozen),
                                    tuple(json.loads(tags)), bool(below))
        for sn, parent, created, desc, auto, merging, mem, memfile, vm_state in c.execute(
                "SELECT name, parent, created, description, auto, merging, memory, memfile, "
                "vm_state FROM snapshots WHERE machine=?", (name,)):
            m.snapshots[sn] = Snapshot(sn, parent, created, desc, bool(auto), bool(merging),
                                       memory=mem, memfile=memfile, vm_state=vm_state)
        for sn, disk, kind, f, ov, size, tag in c.execute(
                "SELECT snapshot, disk, kind, file, overlay, size, tag FROM snapshot_disks "
                "WHERE machine=?", (name,)):
            m.snapshots[sn].disks[disk] = DiskState(kind, f, ov, size, tag)
        order = [d.name for d in m.disks]
        for s in m.snapshots.values():
            s.disks = {d: s.disks[d] for d in order if d in s.disks}
        return m

    def _write(self, c, m: MachineState) -> None:
        c.execute("DELETE FROM snapshot_disks WHERE machine=?", (m.name,))
        c.execute("DELETE FROM snapshots WHERE machine=?", (m.name,))
        c.execute("DELETE FROM files WHERE machine=?", (m.name,))
        c.execute("DELETE FROM disks WHERE machine=?", (m.name,))
        c.execute("INSERT INTO machines(name, created, current, launch) VALUES(?,?,?,?) "
                  "ON CONFLICT(name) DO UPDATE SET current=excluded.current, "
                  "launch=excluded.launch",
                  (m.name, m.created, m.current,
                   json.dumps(m.launch) if m.launch is not None else None))
        c.executemany("INSERT INTO disks VALUES(?,?,?,?,?,?,?)",
                      [(m.name, d.name, i, d.active, d.fmt, d.folder, _json(d.baseline))
                       for i, d in enumerate(m.disks)])
        c.executemany("INSERT INTO files VALUES(?,?,?,?,?,?,?,?,?)",
                      [(m.name, f.path, f.disk, f.fmt, f.backing, int(f.owned), _json(f.frozen),
                        json.dumps(list(f.foreign_tags)), int(f.below))
                       for f in m.files.values()])
        c.executemany("INSERT INTO snapshots(machine, name, parent, created, description, "
                      "auto, merging, memory, memfile, vm_state) VALUES(?,?,?,?,?,?,?,?,?,?)",
                      [(m.name, s.name, s.parent, s.created, s.description, int(s.auto),
                        int(s.merging), s.memory, s.memfile, s.vm_state)
                       for s in m.snapshots.values()])
        c.executemany("INSERT INTO snapshot_disks VALUES(?,?,?,?,?,?,?,?)",
                      [(m.name, s.name, d, ds.kind, ds.file, ds.overlay, ds.size, ds.tag)
                       for s in m.snapshots.values() for d, ds in s.disks.items()])

    def save(self, m: MachineState, *, finish_op: bool = False) -> None:
        """Write the whole machine in one transaction (and end its operation, if asked)."""
        with self.transaction() as c:
            self._write(c, m)
            if finish_op:
                c.execute("DELETE FROM operations WHERE machine=?", (m.name,))

    def delete(self, name: str) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM snapshot_disks WHERE machine=?", (name,))
            c.execute("DELETE FROM machines WHERE name=?", (name,))

    # ------------------------------------------------------------ the journal
    def begin_op(self, name: str, kind: str, plan: dict) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO operations VALUES(?,?,?,?,?,?)",
                      (name, kind, json.dumps(plan), 0, time.time(), "running"))

    def step_done(self, name: str, done: int) -> None:
        with self.transaction() as c:
            c.execute("UPDATE operations SET done=? WHERE machine=?", (done, name))

    def set_op_status(self, name: str, status: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE operations SET status=? WHERE machine=?", (status, name))

    def end_op(self, name: str) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM operations WHERE machine=?", (name,))

    # ------------------------------------------------------------ a running machine
    def runtime(self, name: str) -> Optional[dict]:
        """How to reach the machine's QEMU (pid, QMP socket...), or None: shut off."""
        row = self.conn.execute("SELECT doc FROM runtime WHERE machine=?", (name,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_runtime(self, name: str, doc: Optional[dict]) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM runtime WHERE machine=?", (name,))
            if doc is not None:
                c.execute("INSERT INTO runtime VALUES(?,?)", (name, json.dumps(doc)))

    def op(self, name: str) -> Optional[dict]:
        row = self.conn.execute("SELECT kind, plan, done, started, status FROM operations "
                                "WHERE machine=?", (name,)).fetchone()
        if row is None:
            return None
        return {"kind": row[0], "plan": json.loads(row[1]), "done": row[2], "started": row[3],
                "status": row[4]}


def _json(stamp: Optional[Stamp]) -> Optional[str]:
    return None if stamp is None else json.dumps(stamp.as_dict())


def _stamp(text: Optional[str]) -> Optional[Stamp]:
    return Stamp.from_dict(json.loads(text)) if text else None


# ---------------------------------------------------------------- machine <-> JSON (the journal)
def machine_to_dict(m: MachineState) -> dict:
    return {
        "name": m.name, "created": m.created, "current": m.current, "launch": m.launch,
        "disks": [{"name": d.name, "active": d.active, "fmt": d.fmt, "folder": d.folder,
                   "baseline": d.baseline.as_dict() if d.baseline else None} for d in m.disks],
        "files": [{"path": f.path, "disk": f.disk, "fmt": f.fmt, "backing": f.backing,
                   "owned": f.owned, "frozen": f.frozen.as_dict() if f.frozen else None,
                   "foreign_tags": list(f.foreign_tags), "below": f.below}
                  for f in m.files.values()],
        "snapshots": [{"name": s.name, "parent": s.parent, "created": s.created,
                       "description": s.description, "auto": s.auto, "merging": s.merging,
                       "memory": s.memory, "memfile": s.memfile, "vm_state": s.vm_state,
                       "disks": {d: {"kind": ds.kind, "file": ds.file, "overlay": ds.overlay,
                                     "size": ds.size, "tag": ds.tag}
                                 for d, ds in s.disks.items()}}
                      for s in m.snapshots.values()],
    }


def machine_from_dict(d: dict) -> MachineState:
    m = MachineState(d["name"], d["created"], current=d["current"], launch=d.get("launch"))
    m.disks = [Disk(x["name"], x["active"], x["fmt"], x["folder"], Stamp.from_dict(x["baseline"]))
               for x in d["disks"]]
    m.files = {x["path"]: FileRec(x["path"], x["disk"], x["fmt"], x["backing"], x["owned"],
                                  Stamp.from_dict(x["frozen"]), tuple(x["foreign_tags"]),
                                  x["below"]) for x in d["files"]}
    for x in d["snapshots"]:
        m.snapshots[x["name"]] = Snapshot(
            x["name"], x["parent"], x["created"], x["description"], x["auto"], x["merging"],
            {k: DiskState(v["kind"], v["file"], v["overlay"], v["size"], v["tag"])
             for k, v in x["disks"].items()},
            memory=x.get("memory", "no"), memfile=x.get("memfile"), vm_state=x.get("vm_state"))
    return m
