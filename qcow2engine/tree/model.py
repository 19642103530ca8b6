"""The machine snapshot tree as plain data (no I/O): what the store saves and the planner edits.

Terms (see DESIGN.md, "Snapshot-tree semantics"):

- A `MachineState` has named `Disk`s, each with an *active* image (the top of its chain).
- A `Snapshot` covers every disk with a `DiskState`: `internal` (a tag in the snapshot table of
  `file`), `external` (`file` is S.base, the image that holds the disk's state at S, frozen from
  then on; `overlay` is the image created on it), or `no` (the disk is not part of S).
- `FileRec` is every image the tree knows, with the backing file it must have.  `owned` files
  were created by the tree and may be removed when nothing needs them; the images given to
  `machine define` may be written (a commit down into them) but are never removed, and the
  files below them (a template shared with other machines, say) are never touched at all.
- `Stamp` records enough of an image to tell, later, that its active state changed: the
  virtual size, the file's mtime and size, and a digest of the header and the L1 table.  A
  frozen file has `frozen` set; each disk's active image has a `baseline` taken when the current
  position was last set, which tells whether the tip changed since.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Optional

INTERNAL = "internal"
EXTERNAL = "external"
NO = "no"
KINDS = (INTERNAL, EXTERNAL, NO)

NAME_MAX = 255
_DISK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def check_name(name: str, what: str = "snapshot") -> None:
    """Refuse empty names, names with '/', control characters, or over 255 bytes."""
    from ..errors import InvalidRequestError
    if not name:
        raise InvalidRequestError("invalid %s name: it is empty" % what)
    if "/" in name:
        raise InvalidRequestError("invalid %s name '%s': it contains '/'" % (what, name))
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidRequestError("invalid %s name %r: it contains a control character"
                                  % (what, name))
    if len(name.encode()) > NAME_MAX:
        raise InvalidRequestError("invalid %s name '%s...': longer than %d bytes"
                                  % (what, name[:20], NAME_MAX))
    if name in (".", ".."):
        raise InvalidRequestError("invalid %s name '%s'" % (what, name))


def check_disk_name(name: str) -> None:
    from ..errors import InvalidRequestError
    check_name(name, "disk")
    if not _DISK_NAME.match(name):
        raise InvalidRequestError("invalid disk name '%s': use letters, digits, '_', '.', '+', "
                                  "'-'" % name)


@dataclass(frozen=True)
class Stamp:
    """What an image looked like: changes to its active state change the stamp."""
    vsize: int
    mtime_ns: int
    fsize: int
    digest: str

    def as_dict(self) -> dict:
        return {"vsize": self.vsize, "mtime_ns": self.mtime_ns, "fsize": self.fsize,
                "digest": self.digest}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["Stamp"]:
        return None if not d else cls(int(d["vsize"]), int(d["mtime_ns"]), int(d["fsize"]),
                                      str(d["digest"]))


@dataclass
class FileRec:
    path: str                       # absolute
    disk: str
    fmt: str                        # "qcow2" or "raw"
    backing: Optional[str]          # absolute path of the backing file the tree expects
    owned: bool                     # created by the tree (removable when unneeded)
    frozen: Optional[Stamp] = None  # set while something depends on its active state
    foreign_tags: tuple = ()        # internal tags present when the machine was defined
    below: bool = False             # below a defined image: never written, never removed


@dataclass
class DiskState:
    kind: str                       # INTERNAL, EXTERNAL or NO
    file: Optional[str] = None      # internal: the image with the tag; external: S.base
    overlay: Optional[str] = None   # external: the overlay created on S.base (None: a label)
    size: int = 0                   # the disk's virtual size at S
    tag: Optional[str] = None       # internal: the tag's name


@dataclass
class Snapshot:
    name: str
    parent: Optional[str]
    created: float
    description: str = ""
    auto: bool = False
    merging: bool = False           # a --commit revert was cancelled: its base is half merged
    disks: dict = field(default_factory=dict)   # disk name -> DiskState
    memory: str = NO                # the machine's memory at S: NO, INTERNAL or EXTERNAL
    memfile: Optional[str] = None   # EXTERNAL: the file; INTERNAL: the disk holding the vmstate
    vm_state: Optional[str] = None  # the run state at S ("running", "paused"), None: shut off

    @property
    def kinds(self) -> set:
        return {d.kind for d in self.disks.values() if d.kind != NO}

    @property
    def state(self) -> str:
        """virsh's state column: the run state at S for a snapshot of a running machine; for a
        shut-off one a disk-only (external) snapshot is 'disk-snapshot', else 'shutoff'.  A
        disk-only snapshot of a running machine is 'disk-snapshot' too."""
        if self.memory != NO and self.vm_state:
            return self.vm_state
        return "disk-snapshot" if self.kinds == {EXTERNAL} or self.vm_state else "shutoff"

    @property
    def location(self) -> str:
        k = self.kinds
        return "external" if k == {EXTERNAL} else "internal" if k == {INTERNAL} else \
            "mixed" if k else "none"


@dataclass
class Disk:
    name: str
    active: str                     # absolute path of the active image
    fmt: str
    folder: str                     # where the tree puts the files it creates for this disk
    baseline: Optional[Stamp] = None


@dataclass
class MachineState:
    name: str
    created: float
    disks: list = field(default_factory=list)          # [Disk], in definition order
    snapshots: dict = field(default_factory=dict)      # name -> Snapshot
    files: dict = field(default_factory=dict)          # path -> FileRec
    current: Optional[str] = None
    launch: Optional[dict] = None                      # how to start it (see tree.launch)

    def clone(self) -> "MachineState":
        return copy.deepcopy(self)

    def disk(self, name: str) -> Disk:
        for d in self.disks:
            if d.name == name:
                return d
        from ..errors import InvalidRequestError
        raise InvalidRequestError("machine '%s' has no disk '%s'" % (self.name, name))

    def snapshot(self, name: str) -> Snapshot:
        try:
            return self.snapshots[name]
        except KeyError:
            from ..errors import SnapshotError
            raise SnapshotError("snapshot '%s' of machine '%s' not found"
                                % (name, self.name)) from None

    # ---- the snapshot tree
    def children(self, name: Optional[str]) -> list:
        """Child snapshots of name (None: the roots), in case-insensitive name order."""
        return sorted((s for s in self.snapshots.values() if s.parent == name),
                      key=lambda s: (s.name.lower(), s.name))

    def descendants(self, name: str) -> list:
        out, todo = [], [name]
        while todo:
            for c in self.children(todo.pop()):
                out.append(c)
                todo.append(c.name)
        return out

    def ancestors(self, name: Optional[str]) -> list:
        out = []
        while name is not None:
            out.append(name)
            name = self.snapshots[name].parent
        return out

    # ---- the file graph of one disk
    def file_children(self, path: str) -> list:
        return sorted(f.path for f in self.files.values() if f.backing == path)

    def chain(self, path: str) -> list:
        out = []
        seen = set()
        while path is not None and path not in seen:
            seen.add(path)
            out.append(path)
            rec = self.files.get(path)
            path = rec.backing if rec else None
        return out

    def state_users(self, path: str) -> list:
        """(snapshot, disk) pairs whose state at the snapshot is held by the file at path."""
        return [(s.name, d) for s in self.snapshots.values() for d, ds in s.disks.items()
                if ds.kind != NO and ds.file == path]

    def is_active(self, path: str) -> bool:
        return any(d.active == path for d in self.disks)

    def needed(self, path: str) -> bool:
        """A file is needed while a snapshot's state lives in it or a disk is active on it."""
        return self.is_active(path) or bool(self.state_users(path))

    def frozen_needed(self, path: str) -> bool:
        """Its active state must not change: an external snapshot's state, or a backing file."""
        if self.file_children(path):
            return True
        return any(ds.kind == EXTERNAL and ds.file == path
                   for s in self.snapshots.values() for ds in s.disks.values())
