"""Live commit and stream on a disk's chain, and removal of the nodes they leave behind.

    job = start_commit(qmp, "vd0")                     # active commit: top -> its backing
    job.wait_ready(progress=cb)                        # everything copied, writes mirrored
    result = job.finish(pivot=True)                    # job-complete: the disk runs on base
    result.removed_nodes                               # ["top"]: blockdev-del'd

    commit(qmp, "vd0", top="mid", base="base")         # intermediate commit, to the end
    stream(qmp, "vd0", base="base")                    # pull mid's data into the top

Defaults: commit's top is the active layer and its base the top's backing node (as
`qemu-img commit`); stream without a base pulls the whole chain (the disk ends standalone).
For an intermediate commit or a partial stream, the backing-file name written into the image
above keeps the style it had: relative names stay relative (to that image's directory).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from .client import QMPSession
from .errors import LiveGraphError, QMPCommandError, QMPError
from .graph import BlockGraph, Disk, Node, nodes_left_behind, read_graph
from .jobs import Job, JobResult, ProgressCallback
from .nodes import delete_node, unique_name

__all__ = ["ChainJob", "start_commit", "start_stream", "commit", "stream", "backing_name",
           "remove_left_behind"]

log = logging.getLogger(__name__)


class ChainJob(Job):
    """A commit or stream job on one disk.  When it completes (or pivots), the nodes that
    dropped out of the disk's chain are removed with blockdev-del."""

    def __init__(self, session: QMPSession, job_id: str, job_type: str = "", *,
                 disk: str | None = None, chain_before: list[str] | None = None,
                 active: bool = False, cleanup: bool = True, **kwargs: Any):
        super().__init__(session, job_id, job_type, **kwargs)
        self.disk = disk
        self.chain_before = list(chain_before or [])
        self.active = active
        self.cleanup = cleanup

    @classmethod
    def adopt_on(cls, session: QMPSession, job_id: str,
                 graph: BlockGraph | None = None) -> "ChainJob":
        """Adopt an existing commit/stream job, remembering its disk's chain as it is now."""
        g = graph or read_graph(session)
        info = g.job(job_id)
        disk = g.disk(info.disk) if info.disk else None
        return cls.adopt(session, job_id, disk=disk.name if disk else None,
                         chain_before=disk.node_names if disk else [],
                         active=bool(info.ready) or info.status in ("ready", "standby"))

    def finish(self, timeout: float | None = None, progress: ProgressCallback | None = None,
               *, pivot: bool | None = None) -> JobResult:
        result = super().finish(timeout, progress, pivot=pivot)
        if result.outcome in ("completed", "pivoted") and self.disk:
            if result.outcome == "pivoted" and self.chain_before:
                # with no device attached QEMU has nothing to switch: say so
                try:
                    now = read_graph(self.session).disk(self.disk).root
                except LiveGraphError:
                    now = None
                if now == self.chain_before[0]:
                    result.outcome = "completed"
            if self.cleanup:
                removed, kept = remove_left_behind(self.session, self.disk, self.chain_before)
                result.removed_nodes, result.kept_nodes = removed, kept
        return result

    def run(self, *, pivot: bool = True, timeout: float | None = None,
            progress: ProgressCallback | None = None) -> JobResult:
        """Run to the end: an active commit waits for ready, then pivots (or keeps the top)."""
        return self.finish(timeout, progress, pivot=pivot)


def remove_left_behind(session: QMPSession, disk: str,
                       chain_before: list[str]) -> tuple[list[str], list[str]]:
    """blockdev-del the nodes of `chain_before` that are no longer in the disk's chain and
    that no other disk uses (each before the node it backs onto; its protocol child after
    it, if that was added separately).  Returns (removed, kept)."""
    g = read_graph(session)
    try:
        now = g.disk(disk)
    except LiveGraphError:
        return [], []  # the disk is gone or ambiguous: touch nothing
    left = nodes_left_behind(chain_before, now)
    removed: list[str] = []
    kept: list[str] = []
    for name in left:
        node = g.nodes.get(name)
        if node is None:
            continue
        users = [d.name for d in g.disks if name in d.node_names and d.root not in left]
        if users:
            kept.append(name)
            log.info("node %s left in place: still used by %s", name, ", ".join(users))
            continue
        try:
            if delete_node(session, name, missing_ok=True):
                removed.append(name)
        except QMPCommandError as e:
            # e.g. a node QEMU opened implicitly (not owned by the monitor): it goes with its
            # parent; anything else is reported
            if not name.startswith("#"):
                kept.append(name)
                log.warning("could not remove node %s: %s", name, e)
            continue
        child = node.file_child
        if child and not child.startswith("#"):
            try:
                delete_node(session, child, missing_ok=True)
            except QMPError:
                pass
    return removed, kept


def backing_name(above: Node, new_backing: Node) -> str | None:
    """The backing-file string to write into `above` when its backing becomes `new_backing`:
    relative to `above`'s directory if its current one is relative, else absolute."""
    target = new_backing.filename
    if not target or target.startswith("json:"):
        return None
    current = above.backing_file or ""
    if current and not os.path.isabs(current) and ":" not in current.split("/", 1)[0] \
            and above.filename and not above.filename.startswith("json:"):
        return os.path.relpath(target, os.path.dirname(os.path.abspath(above.filename)))
    return target


def _job_id(graph: BlockGraph, kind: str, disk: Disk, job_id: str | None) -> str:
    if job_id:
        return job_id
    return unique_name("qe-%s-%s" % (kind, disk.name), (j.id for j in graph.jobs), limit=48)


def start_commit(session: QMPSession, disk: str, *, top: str | None = None,
                 base: str | None = None, speed: int | None = None, job_id: str | None = None,
                 backing_file: str | None = None, on_error: str = "report",
                 graph: BlockGraph | None = None) -> ChainJob:
    """Start block-commit of `top` (default: the active layer) into `base` (default: top's
    backing node) on `disk`; returns the job.  With top the active layer this is an active
    commit: wait_ready(), then finish(pivot=True|False) or cancel()."""
    g = graph or read_graph(session)
    d = g.disk(disk)
    top_i = d.index(top) if top else 0
    base_i = d.index(base) if base else top_i + 1
    if base_i >= len(d.chain):
        raise LiveGraphError("Node '%s' has no backing node: nothing to commit"
                             % d.chain[top_i].name)
    if base_i <= top_i:
        raise LiveGraphError("Base '%s' must be below top '%s' in the chain (%s)"
                             % (d.chain[base_i].name, d.chain[top_i].name,
                                " -> ".join(d.node_names)))
    active = top_i == 0
    args: dict[str, Any] = {"job-id": _job_id(g, "commit", d, job_id), "device": d.root,
                            "top-node": d.chain[top_i].name, "base-node": d.chain[base_i].name,
                            "auto-finalize": False, "auto-dismiss": False,
                            "on-error": on_error}
    if speed:
        args["speed"] = int(speed)
    if not active:
        name = backing_file or backing_name(d.chain[top_i - 1], d.chain[base_i])
        if name:
            args["backing-file"] = name
    job = ChainJob.start(session, "block-commit", args, "commit", disk=d.name,
                         chain_before=d.node_names, active=active)
    return job  # type: ignore[return-value]


def start_stream(session: QMPSession, disk: str, *, base: str | None = None,
                 speed: int | None = None, job_id: str | None = None,
                 backing_file: str | None = None, on_error: str = "report",
                 graph: BlockGraph | None = None) -> ChainJob:
    """Start block-stream into the active layer of `disk` from the nodes above `base`
    (default: the whole chain, the disk ends with no backing); returns the job."""
    g = graph or read_graph(session)
    d = g.disk(disk)
    if len(d.chain) < 2:
        raise LiveGraphError("Disk '%s' has no backing chain: nothing to stream" % d.name)
    args: dict[str, Any] = {"job-id": _job_id(g, "stream", d, job_id), "device": d.root,
                            "auto-finalize": False, "auto-dismiss": False, "on-error": on_error}
    if base:
        base_i = d.index(base)
        if base_i == 0:
            raise LiveGraphError("Base '%s' is the active layer of disk '%s'" % (base, d.name))
        args["base-node"] = base
        name = backing_file or backing_name(d.chain[0], d.chain[base_i])
        if name:
            args["backing-file"] = name
    if speed:
        args["speed"] = int(speed)
    job = ChainJob.start(session, "block-stream", args, "stream", disk=d.name,
                         chain_before=d.node_names)
    return job  # type: ignore[return-value]


def commit(session: QMPSession, disk: str, *, top: str | None = None, base: str | None = None,
           speed: int | None = None, keep_top: bool = False,
           progress: ProgressCallback | None = None, timeout: float | None = None,
           **kwargs: Any) -> JobResult:
    """Commit and wait for the end; an active commit pivots onto the base unless keep_top."""
    with start_commit(session, disk, top=top, base=base, speed=speed, **kwargs) as job:
        return job.run(pivot=not keep_top, timeout=timeout, progress=progress)


def stream(session: QMPSession, disk: str, *, base: str | None = None,
           speed: int | None = None, progress: ProgressCallback | None = None,
           timeout: float | None = None, **kwargs: Any) -> JobResult:
    """Stream and wait for the end."""
    with start_stream(session, disk, base=base, speed=speed, **kwargs) as job:
        return job.run(timeout=timeout, progress=progress)
