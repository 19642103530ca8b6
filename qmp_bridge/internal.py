"""Internal snapshots of a running VM: snapshot-save / snapshot-load / snapshot-delete jobs.

    save_vm(qmp, "before-upgrade")     # every disk's active layer, VM state on the first
    load_vm(qmp, "before-upgrade")
    delete_vm(qmp, "before-upgrade")

These jobs report failure only through the job's `error` (query-jobs); it is raised as
LiveSnapshotError (a JobError and a SnapshotError).  QEMU stops the VM around save and load;
after a *failed* load it leaves it stopped (runstate "restore-vm").  Every call here puts the
VM back to running if it was running before, and stopped if it was stopped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from .client import QMPSession
from .errors import LiveGraphError, LiveJobError, LiveSnapshotError
from .graph import read_graph
from .jobs import Job, JobResult
from .nodes import unique_name

__all__ = ["save_vm", "load_vm", "delete_vm", "list_vm_snapshots", "InternalSnapshotResult",
           "snapshot_devices"]

log = logging.getLogger(__name__)


@dataclass
class InternalSnapshotResult:
    """What a snapshot-save/-load/-delete job did."""
    tag: str
    devices: list[str]
    vmstate: str | None
    job: JobResult
    run_state: str   # QEMU's runstate afterwards

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"tag": self.tag, "devices": self.devices, "vmstate": self.vmstate,
                "job": self.job.to_json(), "run-state": self.run_state}


def snapshot_devices(session: QMPSession) -> list[str]:
    """The node names that take part by default: every disk's writable active layer."""
    g = read_graph(session)
    return [d.root for d in g.disks if not d.top.read_only]


def list_vm_snapshots(session: QMPSession) -> dict[str, list[str]]:
    """Internal snapshot names per disk (by its active layer)."""
    g = read_graph(session)
    return {d.name: list(d.top.snapshots) for d in g.disks}


def _run_state(session: QMPSession) -> tuple[str, bool]:
    st = session.execute("query-status")
    return st["status"], bool(st["running"])


def _restore_run_state(session: QMPSession, was_running: bool) -> str:
    status, running = _run_state(session)
    if was_running and not running:
        session.execute("cont")
    elif not was_running and running:
        session.execute("stop")
    else:
        return status
    return _run_state(session)[0]


def _run(session: QMPSession, command: str, tag: str, devices: Sequence[str] | None,
         vmstate: str | None, timeout: float | None) -> InternalSnapshotResult:
    devs = list(devices) if devices else snapshot_devices(session)
    if not devs:
        raise LiveGraphError("No writable disks to snapshot")
    args: dict[str, Any] = {"tag": tag, "devices": devs}
    state = None
    if command != "snapshot-delete":
        state = vmstate or devs[0]
        args["vmstate"] = state
    job_ids = [j["id"] for j in session.execute("query-jobs")]
    args["job-id"] = unique_name("qe-" + command, job_ids, limit=48)
    _, was_running = _run_state(session)
    result: JobResult | None = None
    try:
        with Job.start(session, command, args, command) as job:
            try:
                result = job.finish(timeout=timeout)
            except LiveJobError as e:
                raise LiveSnapshotError("%s '%s' failed: %s" % (command, tag, e.error or e),
                                        job_id=e.job_id, error=e.error, result=e.result) from None
    finally:
        try:
            status = _restore_run_state(session, was_running)
        except Exception as e:  # never hide the job's own error
            log.error("could not restore the run state: %s", e)
            status = "unknown"
    return InternalSnapshotResult(tag, devs, state, result, status)


def save_vm(session: QMPSession, tag: str, *, devices: Sequence[str] | None = None,
            vmstate: str | None = None, timeout: float | None = 600.0) -> InternalSnapshotResult:
    """Take internal snapshot `tag` on `devices` (node names; default every writable disk's
    active layer) with the VM state saved in `vmstate` (default the first device)."""
    return _run(session, "snapshot-save", tag, devices, vmstate, timeout)


def load_vm(session: QMPSession, tag: str, *, devices: Sequence[str] | None = None,
            vmstate: str | None = None, timeout: float | None = 600.0) -> InternalSnapshotResult:
    """Revert `devices` and the VM state to internal snapshot `tag`."""
    return _run(session, "snapshot-load", tag, devices, vmstate, timeout)


def delete_vm(session: QMPSession, tag: str, *, devices: Sequence[str] | None = None,
              timeout: float | None = 600.0) -> InternalSnapshotResult:
    """Delete internal snapshot `tag` from `devices`."""
    return _run(session, "snapshot-delete", tag, devices, None, timeout)
