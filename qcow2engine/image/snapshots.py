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

import struct
import time

import numpy as np

from ..host import fileio
from ..errors import SnapshotError
from ..format import constants as C
from ..format.entries import referenced_clusters, to_be64
from ..format.snapshot import SnapshotEntry, build_snapshot_entry
from .qcow2 import Qcow2Image
from .alloc import HDR_SIZE, HDR_SNAPSHOTS, MetaWriter

COPIED = np.uint64(C.QCOW_OFLAG_COPIED)
MAX_NAME = 255
BATCH = 256


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
    if img.encrypted:
        raise SnapshotError("Internal snapshots of encrypted images are not supported")


class _Tree:
    """The L2 tables and data clusters reachable from one L1 table, as cluster indices."""

    def __init__(self, img: Qcow2Image, l1: np.ndarray):
        self.img = img
        self.l1 = l1
        offs = (l1 & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
        self.used = np.flatnonzero(offs)
        self.l2_offsets = offs[self.used]

    def batches(self):
        """Yield (l1 indices, l2 offsets, 2-D tables) in batches read with large preads."""
        img = self.img
        from ..refcounts.check import _read_tables
        for b in range(0, len(self.used), BATCH):
            idx = self.used[b:b + BATCH]
            offs = [int(o) for o in self.l2_offsets[b:b + BATCH]]
            for o in offs:
                if o % img.cluster_size:
                    raise SnapshotError("L2 table offset %#x is not cluster aligned" % o)
            yield idx, offs, _read_tables(img, offs)

    def tables(self):
        """Yield (l1 index, l2 offset, table) one table at a time."""
        for idx, offs, tabs in self.batches():
            for i, o, t in zip(idx.tolist(), offs, tabs):
                yield i, o, t

    def data_clusters(self, tables: np.ndarray) -> np.ndarray:
        """Host cluster indices referenced by L2 tables (compressed ranges expanded)."""
        img = self.img
        e = (tables[..., 0::2] if img.extended_l2 else tables).reshape(-1)
        return referenced_clusters(e, img.cluster_bits)


def _add_tree(meta: MetaWriter, tree: _Tree, delta: int) -> None:
    """delta on every L2 table and data cluster under tree (one reference per path).

    The L2 tables (spread over the file) and each batch of data clusters (usually a dense
    range) are added separately, which keeps the temporaries small."""
    meta.add_many(tree.l2_offsets >> tree.img.cluster_bits, delta)
    for _, _, tabs in tree.batches():
        meta.add_many(tree.data_clusters(tabs), delta)


def _fix_copied(img: Qcow2Image, meta: MetaWriter) -> None:
    """COPIED exactly where the refcount is 1 in the active L1 and its L2 tables."""
    l1 = img.l1_table
    tree = _Tree(img, l1)
    bits = img.cluster_bits
    rc = meta.get(tree.l2_offsets >> bits)
    changed = []
    for j, i in enumerate(tree.used.tolist()):
        want = rc[j] == 1
        if want != bool(int(l1[i]) & C.QCOW_OFLAG_COPIED):
            l1[i] = (l1[i] | COPIED) if want else (l1[i] & ~COPIED)
            changed.append(i)
    for i, o, t in tree.tables():
        e = t[0::2] if img.extended_l2 else t
        comp = (e & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0
        host = (e & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
        alloc = ~comp & (host != 0)
        want = np.zeros(len(e), bool)
        want[alloc] = meta.get(host[alloc] >> bits) == 1
        have = (e & COPIED) != 0
        bad = want != have
        if bad.any():
            e[bad] = np.where(want[bad], e[bad] | COPIED, e[bad] & ~COPIED)
            if img.extended_l2:
                t[0::2] = e
            meta.write_l2(o, t.copy())
    meta.flush()
    if changed:
        meta.write_l1_entries(l1, changed)
        meta.flush()


def _write_table(img: Qcow2Image, meta: MetaWriter, snaps: list) -> None:
    """Write a whole new snapshot table, switch the header to it, free the old one."""
    h = img.header
    data = b"".join(build_snapshot_entry(s) for s in snaps)
    if len(data) > C.MAX_SNAPSHOT_TABLE_BYTES:
        raise SnapshotError("Snapshot table too large")
    old_off, old_size = h.snapshots_offset, getattr(img, "snapshot_table_size", 0)
    new_off = 0
    if snaps:
        new_off = meta.allocate_bytes(len(data))
        meta.commit()
        fileio.pwrite(img.fd, data, new_off)
        meta.flush()
    fileio.pwrite(img.fd, struct.pack(">IQ", len(snaps), new_off), HDR_SNAPSHOTS)
    meta.flush()
    h.nb_snapshots, h.snapshots_offset = len(snaps), new_off
    img._snapshots = list(snaps)
    img.snapshot_table_size = len(data)
    if old_off and old_size:
        a = old_off >> img.cluster_bits
        meta.free(np.arange(a, (old_off + old_size - 1 >> img.cluster_bits) + 1, dtype=np.int64))
        meta.commit()


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
    meta = MetaWriter(img)
    l1 = img.l1_table
    tree = _Tree(img, l1)
    _add_tree(meta, tree, +1)                 # raises RefcountOverflow before any write
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
        l1[tree.used] &= ~COPIED
        meta.write_l1_entries(l1, tree.used)
        meta.flush()
    _write_table(img, meta, snaps + [e])
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
    meta = MetaWriter(img)
    snap_l1 = img.read_l1(sn.l1_table_offset, sn.l1_size)
    new_tree = _Tree(img, snap_l1)
    _add_tree(meta, new_tree, +1)
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
    fileio.pwrite(img.fd, struct.pack(">QIIQ", size, h.crypt_method, l1_size, new_off), HDR_SIZE)
    meta.flush()
    h.size, h.l1_size, h.l1_table_offset = size, l1_size, new_off
    img.size = size
    img._l1 = new_l1
    # the old active tree loses its reference
    _add_tree(meta, _Tree(img, old_l1), -1)
    if old_n:
        a = old_off >> img.cluster_bits
        meta.free(np.arange(a, a + -(-old_n * 8 // cs), dtype=np.int64))
    meta.commit()
    _fix_copied(img, meta)
    return sn


def delete_snapshot(img: Qcow2Image, key: str, *, by_id: bool = False) -> SnapshotEntry:
    """Delete a snapshot (by name, as qemu-img snapshot -d; by_id also tries the ID first)."""
    _check_writable(img)
    i = find_snapshot(img, key, by_id=by_id)
    if i is None:
        raise SnapshotError("Could not delete snapshot '%s': snapshot not found" % key)
    snaps = list(img.snapshots)
    sn = snaps.pop(i)
    tree = _Tree(img, img.read_l1(sn.l1_table_offset, sn.l1_size))
    # 1. the new table no longer lists the snapshot (allocated from the refcounts as they
    #    are on disk: nothing the snapshot still references can be reused for it)
    _write_table(img, MetaWriter(img), snaps)
    # 2. only now do its clusters lose their references (a failure from here on leaks)
    meta = MetaWriter(img)
    _add_tree(meta, tree, -1)
    if sn.l1_size:
        a = sn.l1_table_offset >> img.cluster_bits
        meta.free(np.arange(a, a + -(-sn.l1_size * 8 // img.cluster_size), dtype=np.int64))
    meta.commit()
    _fix_copied(img, meta)
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
    _write_table(img, MetaWriter(img), snaps)
    return e
