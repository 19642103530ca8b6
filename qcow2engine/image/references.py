"""The clusters one L1 table reaches, reference counting over them, and COPIED flags.

"COPIED" (docs/interop/qcow2.rst, "Cluster mapping") means refcount == 1 and is accurate
only under the active L1 table: `fix_copied_flags` sets it exactly there.
"""
from __future__ import annotations

import numpy as np

from ..errors import CorruptImageError
from ..format import constants as C
from ..format.entries import referenced_clusters

COPIED = np.uint64(C.QCOW_OFLAG_COPIED)
BATCH = 256


def read_clusters(img, offsets) -> bytearray:
    """Whole clusters at the given offsets, one after another (neighbouring clusters in one
    pread of up to 8 MiB)."""
    cs = img.cluster_size
    offsets = [int(o) for o in offsets]
    buf = bytearray(len(offsets) * cs)
    mv = memoryview(buf)
    i = 0
    n = len(offsets)
    while i < n:
        j = i + 1
        while j < n and offsets[j] == offsets[j - 1] + cs and (j - i) * cs < (8 << 20):
            j += 1
        mv[i * cs:j * cs] = img.pread((j - i) * cs, offsets[i])
        i = j
    return buf


def read_tables(img, offsets: list) -> np.ndarray:
    """Read whole clusters at the given offsets; 2-D native uint64 array, one row per table
    (neighbouring clusters in one pread of up to 8 MiB)."""
    cs = img.cluster_size
    n = len(offsets)
    arr = np.frombuffer(read_clusters(img, offsets), dtype=np.uint64)
    arr.byteswap(inplace=True)          # big-endian on disk -> native, without a copy
    return arr.reshape(n, cs // 8)


class ReachableTree:
    """The L2 tables and data clusters reachable from one L1 table, as cluster indices.
    skip_unaligned leaves out L1 entries whose L2 offset is not cluster aligned (else
    they are an error when the tables are read)."""

    def __init__(self, img, l1: np.ndarray, *, skip_unaligned: bool = False):
        self.img = img
        self.l1 = l1
        offs = (l1 & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
        keep = offs != 0
        if skip_unaligned:
            keep &= offs % img.cluster_size == 0
        self.used = np.flatnonzero(keep)
        self.l2_offsets = offs[self.used]

    def batches(self):
        """Yield (l1 indices, l2 offsets, 2-D tables) in batches read with large preads."""
        img = self.img
        for b in range(0, len(self.used), BATCH):
            idx = self.used[b:b + BATCH]
            offs = [int(o) for o in self.l2_offsets[b:b + BATCH]]
            for o in offs:
                if o % img.cluster_size:
                    raise CorruptImageError("L2 table offset %#x is not cluster aligned" % o)
            yield idx, offs, read_tables(img, offs)

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


def refuse_damaged_tree(alloc, tree: ReachableTree) -> None:
    """Before a snapshot shares every table and cluster of an active tree: refuse one whose
    L1 or L2 entries carry reserved bits, or whose data clusters are other metadata (a new
    reference to those would turn damage `check -r all` can repair into corruption)."""
    img = tree.img
    l1 = tree.l1
    flags_only = (l1 != 0) & ((l1 & np.uint64(C.L1E_OFFSET_MASK)) == 0)
    bad = ((l1 & np.uint64(C.L1E_RESERVED_MASK)) != 0) | flags_only
    if bad.any():
        raise CorruptImageError("L1 entry %d is damaged (reserved bits, or flags without a "
                                "table); run check -r all first" % int(np.flatnonzero(bad)[0]))
    for idx, offs, tabs in tree.batches():
        e = tabs[..., 0::2] if img.extended_l2 else tabs
        comp = (e & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0
        resv = ~comp & ((e & np.uint64(C.L2E_RESERVED_MASK)) != 0)
        if img.extended_l2:
            # a subcluster both allocated and zero, or allocated without a host cluster, or
            # any bitmap bit on a compressed cluster
            bm = tabs[..., 1::2]
            alloc_bits = bm & np.uint64(0xFFFFFFFF)
            zero_bits = bm >> np.uint64(32)
            # (with an external data file, offset 0 is the data file's first cluster)
            nohost = ((e & np.uint64(C.L2E_OFFSET_MASK)) == 0) & (not img.has_data_file)
            resv |= ((alloc_bits & zero_bits) != 0) | (comp & (bm != 0)) | \
                (~comp & nohost & (alloc_bits != 0))
        if resv.any():
            i = np.argwhere(resv)[0]
            raise CorruptImageError("L2 table at %#x has a damaged entry (reserved bits or an "
                                    "impossible subcluster bitmap); run check -r all first"
                                    % offs[int(i[0])])
        name = None if img.has_data_file else alloc.overlap_any(tree.data_clusters(tabs))
        if name is not None:
            alloc.mark_corrupt()
            raise CorruptImageError("Marking image as corrupt: a data cluster of the active "
                                    "L2 tables overlaps the %s" % name)


def add_tree(alloc, tree: ReachableTree, delta: int) -> None:
    """delta on every L2 table and data cluster under tree (one reference per path).

    The L2 tables (spread over the file) and each batch of data clusters (usually a dense
    range) are added separately, which keeps the temporaries small.

    A reference past the end of the file is a corruption, never a size: it is refused
    (CorruptImageError) before the refcount array would grow to it; the allocator's
    in-memory refcounts are then dropped (nothing was committed)."""
    import os
    img = tree.img
    limit = -(-os.fstat(img.fd).st_size // img.cluster_size)

    def bounded(idx, what):
        if len(idx) and int(idx.max()) >= limit:
            img.forget_tables()
            raise CorruptImageError("%s at offset %#x is past the end of the file"
                                    % (what, int(idx.max()) << img.cluster_bits))
        return idx

    alloc.add_many(bounded(tree.l2_offsets >> img.cluster_bits, "L2 table"), delta)
    for _, _, tabs in tree.batches():
        alloc.add_many(bounded(tree.data_clusters(tabs), "A data cluster"), delta)


def fix_copied_flags(img) -> int:
    """COPIED exactly where the refcount is 1 in the active L1 and its L2 tables (and never
    on compressed entries); with an external data file every allocated entry has it.
    L2 tables first, flush, then the L1 entries, flush.  Returns the entries changed."""
    alloc = img.allocator
    bits = img.cluster_bits
    l1 = img.l1_table
    tree = ReachableTree(img, l1, skip_unaligned=True)
    fixed = 0
    changed_l1 = []
    if len(tree.used):
        want = alloc.get(tree.l2_offsets >> bits) == 1
        have = (l1[tree.used] & COPIED) != 0
        for j in np.flatnonzero(want != have).tolist():
            changed_l1.append(int(tree.used[j]))
        fixed += len(changed_l1)
    for _, o, t in tree.tables():
        e = t[0::2] if img.extended_l2 else t
        comp = (e & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0
        host = (e & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
        if img.has_data_file:
            allocd = ~comp & ((host != 0) | ((e & COPIED) != 0))
            want = np.ones(int(allocd.sum()), bool)
        else:
            allocd = ~comp & (host != 0)
            want = alloc.get(host[allocd] >> bits) == 1
        have = (e[allocd] & COPIED) != 0
        bad = want != have
        comp_copied = comp & ((e & COPIED) != 0)
        if not bad.any() and not comp_copied.any():
            continue
        idx = np.flatnonzero(allocd)[bad]
        e[idx] = np.where(want[bad], e[idx] | COPIED, e[idx] & ~COPIED)
        e[comp_copied] &= ~COPIED
        if img.extended_l2:
            t[0::2] = e
        alloc.write_l2(o, t.copy())
        fixed += int(bad.sum()) + int(comp_copied.sum())
    alloc.flush()
    if changed_l1:
        idx = np.array(changed_l1, np.int64)
        alloc.set_l1_entries(idx, l1[idx] ^ COPIED)
        alloc.flush()
    return fixed


def snapshot_l1_problem(img, sn, limit: int) -> str | None:
    """Why the L1 table of snapshot entry sn cannot be one (too large; not cluster aligned,
    on the header or past limit, the file's end in bytes), or None."""
    cs = img.cluster_size
    off, n = sn.l1_table_offset, sn.l1_size
    if n * 8 > C.MAX_L1_SIZE_BYTES:
        return "has an L1 table of %d entries" % n
    if n and (off % cs or off < cs or off + 8 * n > limit):
        return "has an L1 table (offset %#x) that is not cluster aligned, overlaps the " \
               "header or lies past the end of the file" % off
    return None


def refuse_damaged_metadata(img) -> None:
    """Before anything is allocated, shared or freed in img: refuse an image whose active
    L1 table, refcount table or snapshot table overlaps other metadata, or whose snapshot
    table entries cannot be right (QEMU's own check calls each of these an error), so no
    new reference is handed out over what a bogus entry claims.  Cheap: the tables are
    parsed at open; no L2 table is read.  Checked once per open image."""
    if getattr(img, "_snapshot_table_ok", False):
        return
    snaps = img.snapshots
    h = img.header
    cs = img.cluster_size
    import os
    size = -(-os.fstat(img.fd).st_size // cs) * cs   # the last cluster may be cut short
    why = None
    if snaps and (h.snapshots_offset < cs or
                  h.snapshots_offset + getattr(img, "snapshot_table_size", 0) > size):
        why = "the snapshot table at %#x overlaps the header or lies past the end of the " \
              "file" % h.snapshots_offset
    for i, sn in enumerate(snaps if why is None else ()):
        if img.version >= 3 and len(sn.extra_data) < 16:
            why = "snapshot table entry %d is incomplete" % i
        else:
            bad = snapshot_l1_problem(img, sn, size)
            why = None if bad is None else "snapshot table entry %d %s" % (i, bad)
        if why:
            break
    if why is None:
        alloc = img.allocator
        n1 = -(-h.l1_size * 8 // cs)
        for name, first, count, me in (
                ("active L1 table", h.l1_table_offset // cs, n1, "active_l1"),
                ("refcount table", h.refcount_table_offset // cs, h.refcount_table_clusters,
                 "refcount_table"),
                ("snapshot table", h.snapshots_offset // cs,
                 -(-(getattr(img, "snapshot_table_size", 0) or 1) // cs), "snapshot_table")):
            if count and (name != "snapshot table" or snaps):
                other = alloc.overlap(first, count, ignore={me, "active_l2"})
                if other is not None:
                    why = "the %s overlaps the %s" % (name, other)
                    break
    if why:
        raise CorruptImageError("Refusing to write: %s; run check -r all first" % why)
    img._snapshot_table_ok = True
