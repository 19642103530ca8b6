"""Adding and removing block nodes: the small building blocks the other modules share.

Each image layer is added as its own monitor-owned node (its protocol node inline, named
`<node>-file`), the layer below given as `"backing": "<node>"` (or `None` for "no backing"), so
that nodes survive graph changes and can be removed one by one with blockdev-del.
"""
from __future__ import annotations

import os
import re
import secrets
from typing import Any, Iterable, Sequence

from .client import QMPSession
from .errors import QMPCommandError

__all__ = ["add_image", "add_chain", "attach_device", "delete_node", "unique_name",
           "valid_name", "probe_format", "qemu_io", "NAME_MAX"]

NAME_MAX = 31  # QEMU's limit for node names
_UNSET: Any = object()
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")


def valid_name(name: str) -> bool:
    """True if `name` is a well-formed QEMU node name / job id."""
    return bool(_NAME_RE.match(name)) and len(name) <= NAME_MAX


def unique_name(prefix: str, taken: Iterable[str] = (), *, limit: int = NAME_MAX) -> str:
    """A well-formed name not in `taken`: the sanitised prefix plus a short random suffix."""
    base = re.sub(r"[^A-Za-z0-9._-]", "-", prefix).strip("-") or "n"
    if not base[0].isalpha():
        base = "n" + base
    taken = set(taken)
    while True:
        suffix = "-" + secrets.token_hex(2)
        name = base[:limit - len(suffix)] + suffix
        if name not in taken:
            return name


def probe_format(path: str) -> str:
    """"qcow2" if the file starts with qcow2's magic, else "raw"."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def add_image(session: QMPSession, path: str, node_name: str, *, fmt: str | None = None,
              backing: Any = _UNSET, read_only: bool = False,
              options: dict[str, Any] | None = None) -> str:
    """blockdev-add a format node `node_name` over a file node `<node_name>-file`.
    backing (qcow2 only): a node name, None (no backing), or left out to let QEMU open the
    file named in the image header.  Returns node_name."""
    fmt = fmt or probe_format(path)
    file_name = node_name + "-file" if len(node_name) <= NAME_MAX - 5 else None
    child: dict[str, Any] = {"driver": "file", "filename": os.path.abspath(path)}
    if file_name:
        child["node-name"] = file_name
    args: dict[str, Any] = {"driver": fmt, "node-name": node_name, "file": child,
                            "read-only": bool(read_only)}
    if fmt == "qcow2" and backing is not _UNSET:
        args["backing"] = backing
    if options:
        args.update(options)
    session.execute("blockdev-add", args)
    return node_name


def add_chain(session: QMPSession, paths: Sequence[str], names: Sequence[str] | None = None, *,
              read_only_backing: bool = False) -> list[str]:
    """Add a backing chain, `paths` listed base first; every layer its own node, linked by
    node name.  Returns the node names (base first).  On failure the nodes added are removed."""
    names = list(names) if names is not None else \
        ["%s%d" % ("l", i) for i in range(len(paths))]
    added: list[str] = []
    try:
        below = None
        for i, (path, name) in enumerate(zip(paths, names)):
            top = i == len(paths) - 1
            add_image(session, path, name, backing=below,
                      read_only=read_only_backing and not top)
            added.append(name)
            below = name
    except BaseException:
        for name in reversed(added):
            delete_node(session, name, missing_ok=True)
        raise
    return added


def attach_device(session: QMPSession, root: str, device_id: str, *,
                  driver: str = "virtio-blk-pci", options: dict[str, Any] | None = None) -> str:
    """device_add a disk device on node `root` (needs a machine with a bus, e.g. -M pc).
    Returns the device's block backend path (/machine/peripheral/<id>/virtio-backend for
    virtio-blk), which HMP qemu-io -d accepts."""
    args: dict[str, Any] = {"driver": driver, "drive": root, "id": device_id}
    if options:
        args.update(options)
    session.execute("device_add", args)
    for dev in session.execute("query-block"):
        inserted = dev.get("inserted") or {}
        if inserted.get("node-name") == root and dev.get("qdev", "").startswith(
                "/machine/peripheral/%s/" % device_id):
            return dev["qdev"]
    return "/machine/peripheral/%s/virtio-backend" % device_id


def delete_node(session: QMPSession, name: str, *, missing_ok: bool = False) -> bool:
    """blockdev-del `name`; returns True if deleted.  With missing_ok, a node that no longer
    exists (e.g. freed with its parent) is not an error."""
    try:
        session.execute("blockdev-del", {"node-name": name})
        return True
    except QMPCommandError as e:
        if missing_ok and ("Failed to find node" in str(e) or "Cannot find" in str(e)):
            return False
        raise


def qemu_io(session: QMPSession, target: str, command: str, *,
            timeout: float | None = None) -> None:
    """Run a qemu-io command (e.g. "write -P 0x5a 0 1M") inside QEMU through HMP, as a guest
    would: `target` is a device's block backend path ("/machine/peripheral/vd0/virtio-backend")
    or, for a disk without a device, a node name.  qemu-io's own output goes to QEMU's stdout;
    HMP-level errors raise QMPCommandError."""
    if '"' in command:
        raise ValueError("qemu-io command must not contain double quotes")
    flag = "-d " if target.startswith("/") else ""
    out = session.hmp('qemu-io %s%s "%s"' % (flag, target, command), timeout=timeout)
    if out.strip():
        raise QMPCommandError(" ".join(out.split()), command="qemu-io")
