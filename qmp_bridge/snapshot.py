"""Online external snapshots of one or several disks, atomically.

    result = snapshot_disks(qmp, {"vd0": "/vm/vd0.snap1.qcow2", "vd1": "/vm/vd1.snap1.qcow2"})

For each disk: create the overlay file with our own engine (size and backing name taken from
QMP, so the backing file, which QEMU holds read-write, is never opened), blockdev-add it with
"backing": null (QEMU must not open the backing file a second time), then one `transaction` of
blockdev-snapshot actions switches every disk onto its overlay at once.

All or nothing: if anything fails before or in the transaction, the nodes we added are
blockdev-del'd and the files we created deleted; QEMU rolls the transaction back as a whole,
so no disk is switched alone.  If the connection is lost while the transaction is in flight we
cannot know whether QEMU applied it: the overlay files are then kept (QEMU may be writing to
them) and the error names them.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from qcow2engine.image.create import CreateOptions, create_qcow2

from .client import QMPSession
from .errors import LiveGraphError, QMPConnectionError, QMPError, QMPTimeoutError
from .graph import read_graph
from .nodes import NAME_MAX, delete_node, unique_name, valid_name

__all__ = ["snapshot_disks", "SnapshotResult", "OverlayInfo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OverlayInfo:
    """One disk's new active layer."""
    disk: str
    node: str          # the overlay's node name
    path: str          # the overlay file
    backing_node: str  # the previous active layer (now read-only)
    backing_file: str  # the backing name written into the overlay


@dataclass
class SnapshotResult:
    """The overlays, and how long the transaction (the switch) took."""
    overlays: list[OverlayInfo] = field(default_factory=list)
    transaction_seconds: float = 0.0
    total_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"overlays": [o.__dict__ for o in self.overlays],
                "transaction-seconds": self.transaction_seconds,
                "total-seconds": self.total_seconds}


@dataclass
class _Plan:
    disk: str
    top: str
    path: str
    node: str
    size: int
    backing_file: str
    backing_fmt: str


def snapshot_disks(session: QMPSession, overlays: Mapping[str, str], *,
             node_names: Mapping[str, str] | None = None, relative_backing: bool = False,
             cluster_size: int | None = None) -> SnapshotResult:
    """Switch each disk named in `overlays` (disk -> new overlay path) onto a new qcow2
    overlay, all in one transaction.  node_names: optional disk -> overlay node name.
    relative_backing: write the backing name relative to the overlay's directory.
    Raises LiveGraphError for unknown disks, FileExistsError for an existing overlay path,
    QMPCommandError if QEMU refuses (then nothing has changed)."""
    t0 = time.monotonic()
    if not overlays:
        raise LiveGraphError("No disks to snapshot")
    g = read_graph(session)
    taken = set(g.nodes)
    plans: list[_Plan] = []
    seen_disks: set[str] = set()
    seen_paths: set[str] = set()
    for disk_name, path in overlays.items():
        d = g.disk(disk_name)
        if d.name in seen_disks:
            raise LiveGraphError("Disk '%s' named twice" % d.name)
        seen_disks.add(d.name)
        path = os.path.abspath(path)
        if path in seen_paths:
            raise LiveGraphError("Overlay '%s' given for two disks" % path)
        seen_paths.add(path)
        if os.path.lexists(path):
            raise FileExistsError(17, "Overlay file exists", path)
        top = d.top
        if top.driver not in ("qcow2", "raw") or not top.filename or \
                top.filename.startswith("json:") or top.virtual_size is None:
            raise LiveGraphError("Cannot snapshot disk '%s': its active layer '%s' is a %s node"
                                 % (d.name, top.name, top.driver))
        node = (node_names or {}).get(disk_name) or \
            unique_name("%s-%s" % (d.name, "snap"), taken, limit=NAME_MAX - 5)
        if not valid_name(node) or len(node) > NAME_MAX - 5 or node in taken \
                or node + "-file" in taken:
            raise LiveGraphError("Bad or used node name '%s' (letters, digits, '-', '.', '_'; "
                                 "at most %d characters)" % (node, NAME_MAX - 5))
        taken.update((node, node + "-file"))
        backing = os.path.relpath(top.filename, os.path.dirname(path)) if relative_backing \
            else top.filename
        plans.append(_Plan(d.name, top.name, path, node, int(top.virtual_size), backing,
                           top.driver))

    created: list[str] = []
    added: list[str] = []
    in_flight = False
    try:
        for p in plans:
            _create_overlay(p, cluster_size, created)
        for p in plans:
            session.execute("blockdev-add", {
                "driver": "qcow2", "node-name": p.node, "backing": None,
                "file": {"driver": "file", "filename": p.path, "node-name": p.node + "-file"}})
            added.append(p.node)
        actions = [{"type": "blockdev-snapshot", "data": {"node": p.top, "overlay": p.node}}
                   for p in plans]
        in_flight = True
        t1 = time.monotonic()
        session.execute("transaction", {"actions": actions})
        t_tx = time.monotonic() - t1
    except BaseException as exc:
        if in_flight and isinstance(exc, (QMPTimeoutError, QMPConnectionError)):
            if _switched(session, plans):
                log.warning("transaction reply lost, but every disk was switched")
                t_tx = float("nan")
            else:
                _roll_back(session, added, created, exc)
                raise
        else:
            _roll_back(session, added, created, exc)
            raise
    result = SnapshotResult(
        [OverlayInfo(p.disk, p.node, p.path, p.top, p.backing_file) for p in plans],
        transaction_seconds=t_tx, total_seconds=time.monotonic() - t0)
    return result


def _create_overlay(p: _Plan, cluster_size: int | None, created: list[str]) -> None:
    """Create the overlay file; the name is claimed with O_EXCL first, so that the file we
    delete on failure is always one we made."""
    fd = os.open(p.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    os.close(fd)
    created.append(p.path)
    opts = CreateOptions(size=p.size, backing_file=p.backing_file, backing_fmt=p.backing_fmt)
    if cluster_size:
        opts.cluster_size = cluster_size
    create_qcow2(p.path, opts)


def _switched(session: QMPSession, plans: list[_Plan]) -> bool:
    """After a lost transaction reply: True if every disk runs on its overlay, False if none
    does; raises QMPConnectionError if that cannot be told."""
    try:
        g = read_graph(session)
    except QMPError:
        raise QMPConnectionError(
            "Lost QMP while the snapshot transaction was in flight; it may or may not have "
            "been applied. Overlay files kept: %s" % ", ".join(p.path for p in plans)) from None
    heads = {(d.chain[0].name, d.chain[1].name if len(d.chain) > 1 else None) for d in g.disks}
    done = [(p.node, p.top) in heads for p in plans]
    if any(done) and not all(done):  # cannot happen with a transaction; never guess
        raise QMPError("Snapshot transaction half applied?! overlays: %s"
                       % ", ".join(p.path for p in plans))
    return all(done)


def _roll_back(session: QMPSession, added: list[str], created: list[str],
               cause: BaseException) -> None:
    """Undo a failed snapshot: remove the overlay nodes, then delete the files."""
    for node in reversed(added):
        try:
            delete_node(session, node, missing_ok=True)
        except QMPError as e:
            # the transaction failed (or was never sent), so no disk uses the node: its file
            # can still go; QEMU only keeps an unlinked inode open until the node is closed
            log.error("rollback: could not remove node %s: %s", node, e)
    for path in reversed(created):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("rollback: could not delete %s: %s", path, e)
    log.info("snapshot rolled back (%s)", cause)
