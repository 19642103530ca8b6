"""`check -r leaks|all`: repair refcounts, COPIED flags and broken mappings.

The repair works from the same computation as `check`:

1. (all) L2/L1 entries that point past the end of the file, or at unaligned host offsets,
   are dropped: the guest cluster reads as zeros (v3 zero flag) instead of as garbage.
2. Refcounts are set to the computed reference counts: leaked clusters only with `leaks`,
   every mismatch with `all`.  When the refcount structure itself cannot be trusted
   (misaligned, outside the file or shared refcount blocks) it is rebuilt from scratch in
   new clusters and switched in with one header write.
3. (all) COPIED flags of the active tables are set exactly where the refcount is 1.
4. The dirty and corrupt bits are cleared, and the image is checked again; the result has
   the second check's counts with the first pass's `*_fixed` numbers, as qemu-img reports.
"""
from __future__ import annotations

import numpy as np

from ..format import constants as C
from ..image import metadata
from ..image.qcow2 import Qcow2Image
from ..image.references import fix_copied_flags
from .check import CheckResult, check_image

COPIED = np.uint64(C.QCOW_OFLAG_COPIED)


def repair_image(path: str, mode: str, filename: str | None = None) -> CheckResult:
    """Repair the image at path; mode is "leaks" or "all"."""
    img = Qcow2Image(path, writable=True, allow_corrupt=True)
    try:
        return repair_open_image(img, mode, filename if filename is not None else path)
    finally:
        img.close()


def repair_open_image(img: Qcow2Image, mode: str, filename: str) -> CheckResult:
    fix_errors = mode == "all"
    dropped = _fix_snapshot_table(img) if fix_errors else 0
    dropped += _drop_wild_entries(img) if fix_errors else 0
    first = check_image(img, filename, keep=True)
    corruptions_fixed = dropped
    leaks_fixed = 0
    img.forget_tables()             # the allocator starts from the refcounts on disk
    meta = img.allocator
    calc, disk = first.calc, first.disk
    n = len(disk)
    comp = calc.counts[:n].astype(np.int64)
    dsk = disk.astype(np.int64)
    if fix_errors and first.rebuild:
        _rebuild(img, calc)
        corruptions_fixed += int(np.count_nonzero(dsk < comp)) + 1
        leaks_fixed += int(np.count_nonzero(dsk > comp))
        meta = img.allocator
    else:
        leak = np.flatnonzero(dsk > comp)
        err = np.flatnonzero(dsk < comp) if fix_errors else np.zeros(0, np.int64)
        for idx in (leak, err):
            if not len(idx):
                continue
            delta = comp[idx] - dsk[idx]
            for d in np.unique(delta):
                meta.change(idx[delta == d], int(d))
        meta.commit()
        leaks_fixed += len(leak)
        corruptions_fixed += len(err)
    leaks_fixed += _drop_refcounts_past_end(img)
    if fix_errors:
        corruptions_fixed += fix_copied_flags(img)
    if corruptions_fixed or leaks_fixed:
        img.forget_tables()
        res = check_image(img, filename)
    else:
        res = first
        res.calc = res.disk = None
    if not res.corruptions:
        # consistent now: clear the dirty and corrupt bits (never while refcounts are bad)
        metadata.set_incompatible(img, C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT, False)
        img.dirty = img.corrupt = False
        img.allocator.flush()
    res.corruptions_fixed = corruptions_fixed
    res.leaks_fixed = leaks_fixed
    return res


def _drop_refcounts_past_end(img: Qcow2Image) -> int:
    """Refcounts of clusters past the end of the file (in the refcount blocks that cover
    its last clusters): an allocation interrupted before its data reached the file.  Nothing
    can reference them, but the next write that grows the file would turn them into leaks
    (qemu-img check does not look past the end of the file): give them back."""
    per_block = img.cluster_size * 8 // img.refcount_bits
    fc = img.file_clusters
    counts = img.refcounts_all(-(-fc // per_block) * per_block)
    tail = counts[fc:].astype(np.int64)
    stale = np.flatnonzero(tail)
    if not len(stale):
        return 0
    meta = img.allocator
    vals = tail[stale]
    for v in np.unique(vals).tolist():
        meta.change((stale[vals == v] + fc).astype(np.int64), -int(v))
    meta.commit()
    return len(stale)


def _fix_snapshot_table(img: Qcow2Image) -> int:
    """Snapshot table entries that are incomplete (v3: less than 16 bytes of extra data) get
    QEMU's defaults (the VM state size, the current disk size), and a table that lies past
    the end of the file is written anew, as `qemu-img check -r all` does: a new table in new
    clusters, one header switch.  The refcounts are recomputed by the repair afterwards (the
    old table's clusters are not freed here).  Returns the entries fixed."""
    snaps = img.snapshots
    if not snaps:
        return 0
    cs = img.cluster_size
    h = img.header
    limit = -(-img.file_size // cs) * cs         # the last cluster may be cut short
    alloc = img.allocator
    # entries whose L1 table cannot be one (unaligned, too large, past the end, on the
    # header or other metadata) hold no readable snapshot: they are dropped (qemu-img
    # keeps them and stays unclean)
    keep = [sn for sn in snaps if not _bogus_l1(img, alloc, sn, limit)]
    dropped = len(snaps) - len(keep)
    from ..image.snapshots import complete_entries
    fixed = complete_entries(img, keep) if img.version >= 3 else 0
    misplaced = h.snapshots_offset < cs or h.snapshots_offset + img.snapshot_table_size > limit
    if not fixed and not misplaced and not dropped:
        return 0
    from ..format.snapshot import build_snapshot_entry
    from ..host import fileio
    data = b"".join(build_snapshot_entry(s) for s in keep)
    off = 0
    if keep:
        # the table being replaced may reach past the end of the file, over free clusters
        off = alloc.allocate_bytes(len(data), ignore={"snapshot_table"} if misplaced else ())
        alloc.commit()
        fileio.pwrite(img.fd, data, off)
        alloc.flush()
    metadata.switch_snapshot_table(img, keep, off, len(data))
    img.forget_tables()
    return max(fixed + dropped, 1)


def _bogus_l1(img: Qcow2Image, alloc, sn, limit: int) -> bool:
    """The write gate's test (references.snapshot_l1_problem), an unaligned offset even of
    an empty table, and an L1 table lying on other metadata."""
    from ..image.references import snapshot_l1_problem
    cs = img.cluster_size
    off, n = sn.l1_table_offset, sn.l1_size
    if off % cs or snapshot_l1_problem(img, sn, limit) is not None:
        return True
    return bool(n) and alloc.overlap(off // cs, -(-8 * n // cs),
                                     ignore={"inactive_l1", "snapshot_table"}) is not None


def _drop_wild_entries(img: Qcow2Image) -> int:
    """Replace L2 entries whose host cluster lies past the end of the file (by a cluster or
    more) or is unaligned, in every L2 table reachable from any L1 table."""
    cs = img.cluster_size
    fsize = img.file_size
    fixed = 0
    alloc = img.allocator
    l1s = [(img.l1_table, img.header.l1_table_offset)]
    for sn in img.snapshots:
        if sn.l1_table_offset % cs == 0 and sn.l1_size * 8 <= C.MAX_L1_SIZE_BYTES:
            l1s.append((img.read_l1(sn.l1_table_offset, sn.l1_size), sn.l1_table_offset))
    seen = set()
    for l1, l1_off in l1s:
        offs = (l1 & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
        bad_l1 = np.flatnonzero((offs != 0) & ((offs % cs != 0) | (offs + cs - fsize >= cs)))
        for i in bad_l1.tolist():
            l1[i] = 0
            metadata.write_entries(img, l1_off + 8 * i, l1[i:i + 1])
            fixed += 1
        # a "table" on other metadata (header, refcount structures, L1 tables): the entry
        # goes, the metadata is never written as an L2 table
        on_meta = [i for i in np.flatnonzero((offs != 0) & (offs % cs == 0)).tolist()
                   if alloc.overlap(int(offs[i]) // cs, 1, ignore={"active_l2"}) is not None]
        for i in on_meta:
            l1[i] = 0
            metadata.write_entries(img, l1_off + 8 * i, l1[i:i + 1])
            fixed += 1
        offs[on_meta] = 0
        for o in np.unique(offs[(offs != 0) & (offs % cs == 0) & (offs + cs - fsize < cs)]).tolist():
            if o in seen:
                continue
            seen.add(o)
            t = img.read_l2(o).copy()
            e = t[0::2] if img.extended_l2 else t
            comp = (e & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0
            host = (e & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
            if img.has_data_file:
                bad = np.zeros(len(e), bool)
            else:
                bad = ~comp & (host != 0) & ((host % cs != 0) | (host + cs - fsize >= cs))
            if comp.any():
                from ..format.entries import compressed_extent
                co, cz = compressed_extent(e[comp], img.cluster_bits)
                cbad = np.zeros(len(e), bool)
                cbad[np.flatnonzero(comp)] = (co + cz - fsize >= cs)
                bad |= cbad
            if not bad.any():
                continue
            repl = np.uint64(C.QCOW_OFLAG_ZERO) if (img.version >= 3 and not img.extended_l2) else np.uint64(0)
            e[bad] = repl
            if img.extended_l2:
                t[0::2] = e
                t[1::2][bad] = np.uint64(0xFFFFFFFF00000000)
            alloc.write_l2(o, t)
            fixed += int(bad.sum())
    if fixed:
        alloc.flush()
        img.forget_tables()
    return fixed


def _rebuild(img: Qcow2Image, calc) -> None:
    """Write a new refcount table and blocks from the computed counts, after the end of
    everything in use, and switch the header to them."""
    cs = img.cluster_size
    bits = img.cluster_bits
    h = img.header
    counts = calc.counts.astype(np.uint64)
    # the old refcount structures are not kept: drop their references
    rt_first = h.refcount_table_offset >> bits
    part = counts[rt_first:rt_first + h.refcount_table_clusters]
    part[part > 0] -= np.uint64(1)      # other references to those clusters stay counted
    rt = img.refcount_table
    for o in np.minimum(rt & np.uint64(C.REFT_OFFSET_MASK), np.uint64(1 << 62)).astype(np.int64).tolist():
        if o and o % cs == 0 and (o >> bits) < len(counts):
            if counts[o >> bits]:
                counts[o >> bits] -= np.uint64(1)
    rt_off, rt_clusters, table, _ = metadata.write_refcount_structure(img, counts,
                                                                      img.refcount_order)
    metadata.switch_refcount_table(img, rt_off, rt_clusters, table)
    img.forget_tables()                 # the allocator starts over from the new structure
