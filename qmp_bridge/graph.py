"""The live block graph: for each disk its chain of nodes (file, format), and the jobs running.

A *disk* is either a device's block backend (named by its device id, e.g. "vd0", or its
BlockBackend name) or, with no device attached, a root node (a format node no other node or
device uses), named by that node.  Its *chain* lists the nodes from the active layer down to the
bottom of the backing chain; implicit filter nodes that jobs insert (mirror_top, commit_top,
copy-on-read) are skipped.

Sources (QEMU 7.2): query-named-block-nodes (driver, read-only, image info, the protocol
filename), query-block (devices and their root node), x-debug-query-block-graph (which node is
whose "backing"/"file" child, and which nodes a job holds), query-jobs + query-block-jobs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .client import QMPSession
from .errors import LiveGraphError

__all__ = ["Node", "Disk", "JobInfo", "BlockGraph", "read_graph", "list_jobs", "FILTER_DRIVERS"]

#: Drivers of filter nodes: one child, no data of their own.  Jobs insert them above a chain.
FILTER_DRIVERS = frozenset({"mirror_top", "commit_top", "copy-on-read", "throttle",
                            "compress", "preallocate", "snapshot-access"})


@dataclass(frozen=True)
class Node:
    """One block node (a layer of a chain, as QEMU has it open)."""
    name: str
    driver: str                     # "qcow2", "raw", or a protocol driver ("file") for bare files
    filename: str | None            # the file under the layer (its protocol leaf)
    backing: str | None             # the backing node, by name
    backing_file: str | None        # the backing name written in the image header
    virtual_size: int | None
    read_only: bool
    snapshots: tuple[str, ...] = ()  # internal snapshot names
    children: tuple[tuple[str, str], ...] = ()  # (role, child node name), all roles

    @property
    def file_child(self) -> str | None:
        """The node name of the protocol child ("file" role), if any."""
        return next((c for role, c in self.children if role == "file"), None)

    def to_json(self) -> dict[str, Any]:
        """The node as a JSON-ready dict (QMP-style key names)."""
        return {"node-name": self.name, "driver": self.driver, "filename": self.filename,
                "backing": self.backing, "backing-file": self.backing_file,
                "virtual-size": self.virtual_size, "read-only": self.read_only,
                "snapshots": list(self.snapshots)}


@dataclass(frozen=True)
class Disk:
    """A disk and its chain, active layer first."""
    name: str                       # device id / BlockBackend name, or the root node's name
    device: str | None              # the block backend (qdev path or BlockBackend name)
    chain: tuple[Node, ...]

    @property
    def top(self) -> Node:
        """The active layer (the node the guest writes)."""
        return self.chain[0]

    @property
    def root(self) -> str:
        """The active layer's node name."""
        return self.chain[0].name

    @property
    def node_names(self) -> list[str]:
        """The chain's node names, active layer first."""
        return [n.name for n in self.chain]

    def index(self, node: str) -> int:
        """Position of `node` in the chain (0 = active layer); LiveGraphError if absent."""
        for i, n in enumerate(self.chain):
            if n.name == node:
                return i
        raise LiveGraphError("Node '%s' is not in the chain of disk '%s' (%s)"
                             % (node, self.name, " -> ".join(self.node_names)))

    def node(self, name: str) -> Node:
        """The chain's node called `name`."""
        return self.chain[self.index(name)]

    def to_json(self) -> dict[str, Any]:
        """The disk as a JSON-ready dict."""
        return {"disk": self.name, "device": self.device, "root": self.root,
                "chain": [n.to_json() for n in self.chain]}


@dataclass(frozen=True)
class JobInfo:
    """A QEMU job as query-jobs (+ query-block-jobs for block jobs) reports it."""
    id: str
    type: str
    status: str
    current: int
    total: int
    error: str | None = None
    speed: int | None = None
    ready: bool | None = None
    paused: bool | None = None
    io_status: str | None = None
    auto_finalize: bool | None = None
    auto_dismiss: bool | None = None
    disk: str | None = None

    @classmethod
    def from_qmp(cls, job: dict[str, Any], block_job: dict[str, Any] | None = None,
                 disk: str | None = None) -> "JobInfo":
        """Build from a query-jobs entry and the matching query-block-jobs entry."""
        bj = block_job or {}
        return cls(id=job["id"], type=job["type"], status=job["status"],
                   current=int(job.get("current-progress", 0)),
                   total=int(job.get("total-progress", 0)),
                   error=job.get("error"), speed=bj.get("speed"), ready=bj.get("ready"),
                   paused=bj.get("paused"), io_status=bj.get("io-status"),
                   auto_finalize=bj.get("auto-finalize"), auto_dismiss=bj.get("auto-dismiss"),
                   disk=disk)

    @property
    def finished(self) -> bool:
        """True once the job has ended (concluded, or gone)."""
        return self.status in ("concluded", "null")

    def to_json(self) -> dict[str, Any]:
        """The job as a JSON-ready dict (query-jobs key names plus block-job extras)."""
        out: dict[str, Any] = {"id": self.id, "type": self.type, "status": self.status,
                               "current-progress": self.current,
                               "total-progress": self.total}
        for key, val in (("error", self.error), ("speed", self.speed), ("ready", self.ready),
                         ("paused", self.paused), ("io-status", self.io_status),
                         ("disk", self.disk)):
            if val is not None:
                out[key] = val
        return out


@dataclass
class BlockGraph:
    """A snapshot of the live graph: disks, every named node, jobs."""
    disks: list[Disk]
    nodes: dict[str, Node]
    jobs: list[JobInfo] = field(default_factory=list)
    parents: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)

    def disk(self, name: str) -> Disk:
        """The disk called `name`: a device id, BlockBackend name or qdev path, a root node,
        or failing those the disk whose chain holds node `name`."""
        for d in self.disks:
            if name in (d.name, d.device):
                return d
        for d in self.disks:
            if d.root == name:
                return d
        holders = [d for d in self.disks if name in d.node_names]
        if len(holders) == 1:
            return holders[0]
        if holders:
            raise LiveGraphError("Node '%s' is in the chains of several disks (%s); name the disk"
                                 % (name, ", ".join(d.name for d in holders)))
        raise LiveGraphError("No disk or node '%s' (disks: %s)"
                             % (name, ", ".join(d.name for d in self.disks) or "none"))

    def job(self, job_id: str) -> JobInfo:
        """The job `job_id`; LiveGraphError if QEMU has no such job."""
        for j in self.jobs:
            if j.id == job_id:
                return j
        raise LiveGraphError("No job '%s'" % job_id)

    def to_json(self) -> dict[str, Any]:
        """The graph as a JSON-ready dict: {"disks": [...], "jobs": [...]}."""
        return {"disks": [d.to_json() for d in self.disks],
                "jobs": [j.to_json() for j in self.jobs]}


def _jobs(session: QMPSession) -> tuple[list[dict], dict[str, dict]]:
    jobs = session.execute("query-jobs")
    block_jobs = {bj["device"]: bj for bj in session.execute("query-block-jobs")}
    return jobs, block_jobs


def list_jobs(session: QMPSession) -> list[JobInfo]:
    """Every job QEMU knows (running, paused, ready, pending, concluded...)."""
    jobs, block_jobs = _jobs(session)
    return [JobInfo.from_qmp(j, block_jobs.get(j["id"])) for j in jobs]


def read_graph(session: QMPSession) -> BlockGraph:
    """Read disks, chains, nodes and jobs from QEMU."""
    named = {n["node-name"]: n for n in session.execute("query-named-block-nodes",
                                                        {"flat": True})}
    raw = session.execute("x-debug-query-block-graph")
    devices = session.execute("query-block")
    jobs, block_jobs = _jobs(session)

    by_id = {n["id"]: n for n in raw["nodes"]}
    children: dict[str, list[tuple[str, str]]] = {}
    parents: dict[str, list[tuple[str, str, str]]] = {}   # child -> (parent type, name, role)
    job_holds: dict[str, list[str]] = {}
    for e in raw["edges"]:
        p, c = by_id.get(e["parent"]), by_id.get(e["child"])
        if p is None or c is None or c["type"] != "block-driver":
            continue
        parents.setdefault(c["name"], []).append((p["type"], p["name"], e["name"]))
        if p["type"] == "block-driver":
            children.setdefault(p["name"], []).append((e["name"], c["name"]))
        elif p["type"] == "block-job":
            job_holds.setdefault(p["name"], []).append(c["name"])

    def leaf_filename(name: str) -> str | None:
        seen = set()
        while name not in seen:
            seen.add(name)
            kids = [c for role, c in children.get(name, []) if role != "backing"]
            if not kids:
                return named.get(name, {}).get("file")
            name = kids[0]
        return None

    nodes: dict[str, Node] = {}
    for name, info in named.items():
        image = info.get("image") or {}
        kids = tuple(children.get(name, []))
        backing = next((c for role, c in kids if role == "backing"), None)
        file_kid = next((c for role, c in kids if role == "file"), None)
        nodes[name] = Node(
            name=name, driver=info.get("drv", "?"),
            filename=leaf_filename(file_kid) if file_kid else info.get("file"),
            backing=backing, backing_file=image.get("backing-filename"),
            virtual_size=image.get("virtual-size"), read_only=bool(info.get("ro")),
            snapshots=tuple(s["name"] for s in image.get("snapshots") or ()),
            children=kids)

    def below_filters(name: str) -> str:
        seen = set()
        while name in nodes and nodes[name].driver in FILTER_DRIVERS and name not in seen:
            seen.add(name)
            kids = nodes[name].children
            nxt = nodes[name].backing or next((c for role, c in kids if role == "file"), None)
            if nxt is None:
                break
            name = nxt
        return name

    def chain_from(root: str) -> tuple[Node, ...]:
        out: list[Node] = []
        seen: set[str] = set()
        name: str | None = below_filters(root)
        while name is not None and name in nodes and name not in seen:
            seen.add(name)
            out.append(nodes[name])
            nxt = nodes[name].backing
            name = below_filters(nxt) if nxt else None
        return tuple(out)

    disks: list[Disk] = []
    claimed: set[str] = set()
    for dev in devices:
        inserted = dev.get("inserted")
        if not inserted:
            continue
        qdev = dev.get("qdev") or ""
        device_id = dev.get("device") or _qdev_id(qdev) or qdev
        chain = chain_from(inserted["node-name"])
        if chain:
            disks.append(Disk(device_id, dev.get("device") or qdev, chain))
            claimed.add(chain[0].name)

    def real_parents(name: str) -> list[tuple[str, str, str]]:
        # a job's own block backends are anonymous; jobs are not users of a disk
        return [p for p in parents.get(name, ())
                if p[0] == "block-driver" or (p[0] == "block-backend" and p[1])]

    for name in named:
        if real_parents(name):
            continue
        chain = chain_from(name)
        if not chain or chain[0].name in claimed:
            continue
        claimed.add(chain[0].name)
        disks.append(Disk(chain[0].name, None, chain))

    def disk_of_job(job_id: str) -> str | None:
        held = [below_filters(n) for n in job_holds.get(job_id, [])]
        for d in disks:
            if any(n in d.node_names for n in held):
                return d.name
        return None

    job_infos = [JobInfo.from_qmp(j, block_jobs.get(j["id"]), disk_of_job(j["id"]))
                 for j in jobs]
    return BlockGraph(disks=disks, nodes=nodes, jobs=job_infos, parents=parents)


def _qdev_id(qdev: str) -> str | None:
    """"vd0" from "/machine/peripheral/vd0/virtio-backend"."""
    parts = qdev.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "machine" and parts[1] == "peripheral":
        return parts[2]
    return None


def nodes_left_behind(before: Iterable[str], after: Disk | None) -> list[str]:
    """Names from the old chain `before` (active first) that the disk's new chain no longer
    holds, in the old order (so each can be deleted before the node it backs onto)."""
    keep = set(after.node_names) if after is not None else set()
    return [n for n in before if n not in keep]
