"""qmp_bridge: drive a live QEMU over QMP (online snapshots, commit, stream, internal snapshots).

    from qmp_bridge import QMPSession, read_graph, snapshot_disks, start_commit

    with QMPSession.attach("/run/vm1/qmp.sock") as qmp:
        print(read_graph(qmp).disk("vd0").node_names)          # ['top', 'base']
        snapshot_disks(qmp, {"vd0": "/vm/vd0.s1.qcow2"})               # atomic over the disks named
        with start_commit(qmp, "vd0") as job:                   # active commit
            job.wait_ready(progress=print)
            result = job.finish(pivot=True)                     # result.removed_nodes

Modules: client (sync session over qemu.qmp), launch (start/stop a headless QEMU), nodes
(blockdev-add helpers), graph (disks, chains, jobs), jobs (job handles), blockjobs (commit,
stream), snapshot (external, transactional), internal (snapshot-save/load/delete), cli
(`qcow2engine live`).  Errors are qcow2engine errors (see qmp_bridge.errors).
Names are imported lazily so that `import qmp_bridge` stays cheap.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "QMPSession": "client", "EventStream": "client",
    "QemuProcess": "launch",
    "add_image": "nodes", "add_chain": "nodes", "attach_device": "nodes",
    "delete_node": "nodes",
    "read_graph": "graph", "list_jobs": "graph", "BlockGraph": "graph", "Disk": "graph",
    "Node": "graph", "JobInfo": "graph",
    "Job": "jobs", "JobResult": "jobs",
    "ChainJob": "blockjobs", "start_commit": "blockjobs", "start_stream": "blockjobs",
    "commit": "blockjobs", "stream": "blockjobs",
    "snapshot_disks": "snapshot", "SnapshotResult": "snapshot",
    "save_vm": "internal", "load_vm": "internal", "delete_vm": "internal",
    "QMPError": "errors", "QMPConnectionError": "errors", "QMPTimeoutError": "errors",
    "QMPCommandError": "errors", "QMPImageInUseError": "errors", "LiveGraphError": "errors",
    "LiveJobError": "errors", "LiveSnapshotError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib
    return getattr(importlib.import_module("%s.%s" % (__name__, mod)), name)
