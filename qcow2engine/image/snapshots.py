"""Internal snapshots: list, create, apply, delete, rename — refcounts edited on whole tables.

Every operation first computes all refcount changes in memory (a refcount overflow, e.g. on
a refcount_bits=1 image, is refused before a byte is written), then writes in the design's
order so that a crash leaves the old or the new state, with leaked clusters at worst:

create:  +1 on every L2 table and data cluster of the active L1 -> flush -> snapshot L1 copy
         -> COPIED cleared in the active tables -> new snapshot table -> flush -> header
         (nb_snapshots and snapshots_offset in one write) -> free the old table.
apply:   +1 under the snapshot's L1 -> new active L1 in new clusters -> header (size, L1 size
         and offset in one write) -> -1 under the old active L1, free it -> COPIED fixed.
delete:  new snapshot table without the entry -> header -> -1 under the snapshot's L1,
         free it and the old table -> COPIED fixed on the active tables.
"""
from __future__ import annotations

import time

import numpy as np

from ..host import fileio
from ..errors import SnapshotError
from ..format import constants as C
from ..format.entries import to_be64
from ..format.snapshot import SnapshotEntry, build_snapshot_entry
from . import metadata
from .qcow2 import Qcow2Image
from .references import (ReachableTree, add_tree, fix_copied_flags, refuse_damaged_metadata,
                         refuse_damaged_tree)

COPIED = np.uint64(C.QCOW_OFLAG_COPIED)
MAX_NAME = 255


def find_snapshot(img: Qcow2Image, key: str, *, by_id: bool = True, by_name: bool = True):
    """Index of the snapshot whose ID (tried first) or name is key, else None."""
    snaps = img.snapshots
    if by_id:
        for i, s in enumerate(snaps):
            if s.id_str == key:
                return i
    if by_name:
        for i, s in enumerate(snaps):
            if s.name == key:
                return i
    return None


def _check_writable(img: Qcow2Image) -> None:
    if img.has_data_file:
        raise SnapshotError("Internal snapshots are not supported on images with an external "
                            "data file")
    # encrypted data is shared by snapshots as it is: LUKS numbers its sectors by host
    # offset, legacy AES by guest offset, and a snapshot keeps both
    refuse_damaged_metadata(img)


def _write_table(img: Qcow2Image, snaps: list) -> None:
    """Write a whole new snapshot table, switch the header to it, free the old one."""
    alloc = img.allocator
    h = img.header
    data = b"".join(build_snapshot_entry(s) for s in snaps)
    if len(data) > C.MAX_SNAPSHOT_TABLE_BYTES:
        raise SnapshotError("Snapshot table too large")
    old_off, old_size = h.snapshots_offset, getattr(img, "snapshot_table_size", 0)
    new_off = 0
    if snaps:
        new_off = alloc.allocate_bytes(len(data))
        alloc.commit()
        fileio.pwrite(img.fd, data, new_off)
        alloc.flush()
    metadata.switch_snapshot_table(img, snaps, new_off, len(data))
    if old_off and old_size:
        a = old_off >> img.cluster_bits
        alloc.free(np.arange(a, (old_off + old_size - 1 >> img.cluster_bits) + 1, dtype=np.int64))
        alloc.commit()


def complete_entries(img: Qcow2Image, snaps: list) -> int:
    """Give every entry with less than the 16 bytes of extra data v3 requires QEMU's
    defaults (the VM state size, the current disk size); returns the entries changed."""
    fixed = 0
    for sn in snaps:
        if len(sn.extra_data) < 16:
            if sn.vm_state_size_large is None:
                sn.vm_state_size_large = sn.vm_state_size
            sn.disk_size = img.size
            sn.extra_data = bytes(sn.extra_data) + bytes(16 - len(sn.extra_data))
            fixed += 1
    return fixed


def upgrade_table(img: Qcow2Image) -> None:
    """Before a v2 image becomes v3: a snapshot table with v2-only (incomplete) entries is
    written anew with complete ones (still a valid v2 table), the old one freed."""
    snaps = list(img.snapshots)
    if complete_entries(img, snaps):
        _write_table(img, snaps)


def _next_id(snaps: list) -> str:
    best = 0
    for s in snaps:
        try:
            best = max(best, int(s.id_str))
        except ValueError:
            pass
    return str(best + 1)


def create_snapshot(img: Qcow2Image, name: str, *, date: float | None = None,
                    vm_clock_nsec: int = 0, icount: int | None = 0) -> SnapshotEntry:
    """Create an internal snapshot of the current disk state (no VM state)."""
    _check_writable(img)
    if len(name.encode()) > MAX_NAME:
        raise SnapshotError("Snapshot name '%s...' is longer than %d bytes" % (name[:20], MAX_NAME))
    snaps = list(img.snapshots)
    if any(s.name == name for s in snaps):
        raise SnapshotError("A snapshot named '%s' already exists" % name)
    if len(snaps) >= C.MAX_SNAPSHOTS:
        raise SnapshotError("The snapshot table is full (%d snapshots)" % C.MAX_SNAPSHOTS)
    h = img.header
    meta = img.allocator
    l1 = img.l1_table
    tree = ReachableTree(img, l1)
    # the active tables are rewritten below: none may be other metadata
    meta.refuse_overlap(tree.l2_offsets >> img.cluster_bits, ignore={"active_l2"})
    refuse_damaged_tree(meta, tree)
    add_tree(meta, tree, +1)                  # raises RefcountOverflow before any write
    sn_l1_off = meta.allocate_bytes(max(h.l1_size * 8, 1)) if h.l1_size else 0
    now = time.time() if date is None else date
    sec = int(now)
    e = SnapshotEntry(l1_table_offset=sn_l1_off, l1_size=h.l1_size, id_str=_next_id(snaps),
                      name=name, date_sec=sec, date_nsec=int(round((now - sec) * 1e6)) * 1000,
                      vm_clock_nsec=vm_clock_nsec, vm_state_size=0, extra_data=bytes(24),
                      vm_state_size_large=0, disk_size=img.size, icount=icount)
    new_table = b"".join(build_snapshot_entry(s) for s in snaps + [e])
    if len(new_table) > C.MAX_SNAPSHOT_TABLE_BYTES:
        raise SnapshotError("Snapshot table too large")
    meta.commit()                             # refcounts first (leaks at worst from here on)
    snap_l1 = l1 & ~COPIED
    if h.l1_size:
        fileio.pwrite(img.fd, to_be64(snap_l1), sn_l1_off)
    # the active tables are now shared: clear COPIED everywhere (data before metadata)
    for i, o, t in tree.tables():
        ent = t[0::2] if img.extended_l2 else t
        if (ent & COPIED).any():
            ent &= ~COPIED
            if img.extended_l2:
                t[0::2] = ent
            meta.write_l2(o, t.copy())
    meta.flush()
    if len(tree.used):
        meta.set_l1_entries(tree.used, l1[tree.used] & ~COPIED)
        meta.flush()
    _write_table(img, snaps + [e])
    return e


def apply_snapshot(img: Qcow2Image, key: str) -> SnapshotEntry:
    """Revert the disk to a snapshot (found by ID, then name)."""
    _check_writable(img)
    i = find_snapshot(img, key)
    if i is None:
        raise SnapshotError("Could not apply snapshot '%s': Failed to load snapshot: "
                            "No such file or directory" % key)
    if img.bitmaps:
        raise SnapshotError("Could not apply snapshot '%s': Device has active dirty bitmaps" % key)
    sn = img.snapshots[i]
    cs = img.cluster_size
    h = img.header
    meta = img.allocator
    snap_l1 = img.read_l1(sn.l1_table_offset, sn.l1_size)
    new_tree = ReachableTree(img, snap_l1)
    add_tree(meta, new_tree, +1)
    size = sn.disk_size if sn.disk_size is not None else img.size
    l1_size = max(sn.l1_size, -(-size // (img.l2_entries * cs)))
    new_l1 = np.zeros(l1_size, np.uint64)
    new_l1[:sn.l1_size] = snap_l1 & ~COPIED
    new_off = meta.allocate_bytes(l1_size * 8) if l1_size else 0
    meta.commit()
    if l1_size:
        fileio.pwrite(img.fd, to_be64(new_l1), new_off)
        meta.flush()
    old_l1 = img.l1_table
    old_off, old_n = h.l1_table_offset, h.l1_size
    metadata.switch_l1(img, new_l1, new_off, size)
    # the old active tree loses its reference
    add_tree(meta, ReachableTree(img, old_l1), -1)
    if old_n:
        a = old_off >> img.cluster_bits
        meta.free(np.arange(a, a + -(-old_n * 8 // cs), dtype=np.int64))
    meta.commit()
    fix_copied_flags(img)
    return sn


def delete_snapshot(img: Qcow2Image, key: str, *, by_id: bool = False) -> SnapshotEntry:
    """Delete a snapshot (by name, as qemu-img snapshot -d; by_id also tries the ID first)."""
    _check_writable(img)
    i = find_snapshot(img, key, by_id=by_id)
    if i is None:
        raise SnapshotError("Could not delete snapshot '%s': snapshot not found" % key)
    snaps = list(img.snapshots)
    sn = snaps.pop(i)
    tree = ReachableTree(img, img.read_l1(sn.l1_table_offset, sn.l1_size))
    # 1. the new table no longer lists the snapshot (its clusters still count: nothing the
    #    snapshot references can be reused for the new table)
    _write_table(img, snaps)
    # 2. only now do its clusters lose their references (a failure from here on leaks)
    meta = img.allocator
    add_tree(meta, tree, -1)
    if sn.l1_size:
        a = sn.l1_table_offset >> img.cluster_bits
        meta.free(np.arange(a, a + -(-sn.l1_size * 8 // img.cluster_size), dtype=np.int64))
    meta.commit()
    fix_copied_flags(img)
    return sn


def rename_snapshot(img: Qcow2Image, key: str, new_name: str) -> SnapshotEntry:
    """Rename a snapshot (found by ID, then name): a new table, switched in one header write."""
    i = find_snapshot(img, key)
    if i is None:
        raise SnapshotError("Snapshot '%s' not found" % key)
    if len(new_name.encode()) > MAX_NAME:
        raise SnapshotError("Snapshot name is longer than %d bytes" % MAX_NAME)
    snaps = list(img.snapshots)
    if any(s.name == new_name for j, s in enumerate(snaps) if j != i):
        raise SnapshotError("A snapshot named '%s' already exists" % new_name)
    import copy
    e = copy.copy(snaps[i])
    e.name = new_name
    snaps[i] = e
    _write_table(img, snaps)
    return e
