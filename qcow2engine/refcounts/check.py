"""Refcounts computed from metadata (vectorised) and `check`, as qemu-img check reports it.

The computation walks every L1 table (active and each snapshot's), every L2 table they reach,
the snapshot table, the refcount structures, the bitmap directory and the encryption header,
and counts references per host cluster with numpy; then compares with the on-disk refcounts
and checks the COPIED flags of the active tables (docs/interop/qcow2.rst, "Host cluster
management" and "Cluster mapping").
"""
from __future__ import annotations


from dataclasses import dataclass, field

import numpy as np

from ..format import constants as C
from ..format.entries import compressed_extent
from ..image.qcow2 import Qcow2Image
from ..image.references import read_tables

L2_BATCH_BYTES = 4 << 20
MAX_MESSAGES = 1000


@dataclass
class CheckResult:
    """What `check` found (the fields of qemu-img's ImageCheck)."""
    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list = field(default_factory=list)
    messages_dropped: int = 0

    def note(self, msg: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(msg)
        else:
            self.messages_dropped += 1

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict:
        d = {"filename": self.filename, "format": self.format, "check-errors": self.check_errors}
        for key, val in (("image-end-offset", self.image_end_offset),
                         ("corruptions", self.corruptions), ("leaks", self.leaks),
                         ("corruptions-fixed", self.corruptions_fixed),
                         ("leaks-fixed", self.leaks_fixed),
                         ("total-clusters", self.total_clusters),
                         ("allocated-clusters", self.allocated_clusters),
                         ("fragmented-clusters", self.fragmented_clusters),
                         ("compressed-clusters", self.compressed_clusters)):
            if val:
                d[key] = val
        return d

    def human(self) -> str:
        out = []
        if self.corruptions_fixed or self.leaks_fixed:
            out.append("The following inconsistencies were found and repaired:\n\n"
                       "    %d leaked clusters\n    %d corruptions\n\n"
                       "Double checking the fixed image now..." % (self.leaks_fixed,
                                                                   self.corruptions_fixed))
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.")
        else:
            if self.corruptions:
                out.append("\n%d errors were found on the image.\nData may be corrupted, or "
                           "further writes to the image may corrupt it." % self.corruptions)
            if self.leaks:
                out.append("\n%d leaked clusters were found on the image.\nThis means waste of "
                           "disk space, but no harm to data." % self.leaks)
            if self.check_errors:
                out.append("\n%d internal errors have occurred during the check." % self.check_errors)
        if self.total_clusters and self.allocated_clusters:
            out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters"
                       % (self.allocated_clusters, self.total_clusters,
                          self.allocated_clusters * 100.0 / self.total_clusters,
                          self.fragmented_clusters * 100.0 / self.allocated_clusters,
                          self.compressed_clusters * 100.0 / self.allocated_clusters))
        if self.image_end_offset:
            out.append("Image end offset: %d" % self.image_end_offset)
        return "\n".join(out) + "\n"


class RefcountCalculator:
    """Counts references per host cluster; references past the end of the file are errors."""

    def __init__(self, img: Qcow2Image, res: CheckResult):
        self.img = img
        self.res = res
        self.cs = img.cluster_size
        self.bits = img.cluster_bits
        self.nb_clusters = img.file_clusters
        # a reference may end less than one cluster past the end of the file: one spare slot.
        # 16-bit counters suffice unless snapshots (or many compressed clusters sharing one
        # host cluster) could push a count past 65535 -- then 32-bit ones
        worst = (img.header.nb_snapshots + 1) * (img.cluster_size // 512 + 2)
        dt = np.uint16 if worst < 65535 else np.uint32
        self.counts = np.zeros(self.nb_clusters + 1, dtype=dt)

    def inc(self, offset: int, size: int) -> None:
        if size <= 0:
            return
        if offset + size - self.img.file_size >= self.cs:
            self.res.note("ERROR: counting reference for region exceeding the end of the file by "
                          "one cluster or more: offset 0x%x size 0x%x" % (offset, size))
            self.res.corruptions += 1
            return
        first = offset >> self.bits
        last = (offset + size - 1) >> self.bits
        self.counts[first:last + 1] += 1

    def inc_many(self, offsets: np.ndarray, sizes) -> None:
        """Add one reference for each [offset, offset+size) range (vectorised)."""
        if not len(offsets):
            return
        offsets = offsets.astype(np.int64, copy=False)
        if np.isscalar(sizes) and sizes == self.cs:
            # one whole cluster each: the common case of L2 tables and data clusters
            bad = offsets >= self.img.file_size
            if not bad.any() and not (offsets & (self.cs - 1)).any():
                self.add_indices(offsets >> self.bits)
                return
        sizes = np.broadcast_to(np.asarray(sizes, np.int64), offsets.shape)
        bad = offsets + sizes - self.img.file_size >= self.cs
        if bad.any():
            for o, s in zip(offsets[bad][:MAX_MESSAGES], sizes[bad][:MAX_MESSAGES]):
                self.res.note("ERROR: counting reference for region exceeding the end of the file "
                              "by one cluster or more: offset 0x%x size 0x%x" % (int(o), int(s)))
            self.res.corruptions += int(bad.sum())
            offsets, sizes = offsets[~bad], sizes[~bad]
        first = offsets >> self.bits
        last = (offsets + sizes - 1) >> self.bits
        span = last - first
        if span.any():
            extra = span.astype(np.int64)
            rep = np.repeat(first, extra + 1)
            step = np.arange(len(rep)) - np.repeat(np.cumsum(extra + 1) - (extra + 1), extra + 1)
            first = rep + step
        self.add_indices(first)

    def add_indices(self, idx: np.ndarray) -> None:
        if not len(idx):
            return
        if len(idx) == 1:
            self.counts[idx] += 1
            return
        step = np.diff(idx)
        if bool((step > 0).all()):
            brk = np.flatnonzero(step != 1)
            if len(brk) * 64 < len(idx):
                # mostly contiguous (the usual layout): add over slices
                starts = np.concatenate([[0], brk + 1])
                ends = np.concatenate([brk + 1, [len(idx)]])
                for a, b in zip(idx[starts].tolist(), (idx[ends - 1] + 1).tolist()):
                    self.counts[a:b] += 1
            else:
                self.counts[idx] += 1
            return
        lo, hi = int(idx.min()), int(idx.max())
        if hi - lo <= 4 * len(idx):
            self.counts[lo:hi + 1] += np.bincount(idx - lo, minlength=hi - lo + 1).astype(self.counts.dtype)
        else:
            u, c = np.unique(idx, return_counts=True)
            self.counts[u] += c.astype(self.counts.dtype)


def _refcount_of(disk: np.ndarray, offsets: np.ndarray, bits: int) -> np.ndarray:
    idx = offsets >> bits
    n = len(idx)
    if n > 1 and int(idx[-1]) - int(idx[0]) == n - 1 and int(idx[-1]) < len(disk) \
            and bool((np.diff(idx) == 1).all()):
        return disk[int(idx[0]):int(idx[0]) + n]
    out = np.zeros(n, dtype=disk.dtype)
    ok = idx < len(disk)
    out[ok] = disk[idx[ok]]
    return out


def walk_l1(img: Qcow2Image, l1: np.ndarray, calc: RefcountCalculator, res: CheckResult,
            active: bool, disk: np.ndarray | None = None) -> None:
    """Count references from one L1 table and its L2 tables.  For the active table also
    gather the allocation statistics and check the COPIED flags against the on-disk
    refcounts `disk` (docs: COPIED is set exactly when the refcount is 1)."""
    cs = img.cluster_size
    used = np.flatnonzero(l1)
    if not len(used):
        return
    resv = used[(l1[used] & np.uint64(C.L1E_RESERVED_MASK)) != 0]
    for i in resv[:MAX_MESSAGES]:
        res.note("ERROR found L1 entry with reserved bits set: %x" % int(l1[i]))
    res.corruptions += len(resv)
    offs = (l1[used] & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
    calc.inc_many(offs, cs)
    if active:
        rc = _refcount_of(disk, offs, img.cluster_bits)
        flag = (l1[used] & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
        bad = np.flatnonzero((rc == 1) != flag)
        for i in bad[:MAX_MESSAGES]:
            res.note("ERROR OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d"
                     % (used[i], int(l1[used[i]]), int(rc[i])))
        res.corruptions += len(bad)
    unaligned = offs % cs != 0
    for o in offs[unaligned][:MAX_MESSAGES]:
        res.note("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry corrupted" % int(o))
    res.corruptions += int(unaligned.sum())
    per_batch = max(1, L2_BATCH_BYTES // cs)
    chunks = [[int(o) for o in offs[b:b + per_batch]] for b in range(0, len(offs), per_batch)]

    def scan(chunk):
        # runs in a worker thread: reads and classifies, touches no shared state
        sink, deferred = CheckResult(filename=""), _DeferredCalc()
        _check_l2_batch(img, read_tables(img, chunk), deferred, sink, active, disk)
        return sink, deferred

    if len(chunks) == 1:
        _merge(res, calc, *scan(chunks[0]))
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for ch in chunks:
            pending.append(pool.submit(scan, ch))
            if len(pending) > 3:
                _merge(res, calc, *pending.pop(0).result())
        for f in pending:
            _merge(res, calc, *f.result())


class _DeferredCalc:
    """Collects inc_many() calls made in a worker, replayed later in the main thread."""

    def __init__(self):
        self.calls = []

    def inc_many(self, offsets, sizes):
        self.calls.append((offsets, sizes))


def _merge(res: CheckResult, calc: RefcountCalculator, sink: CheckResult, deferred) -> None:
    for offsets, sizes in deferred.calls:
        calc.inc_many(offsets, sizes)
    res.corruptions += sink.corruptions
    res.allocated_clusters += sink.allocated_clusters
    res.fragmented_clusters += sink.fragmented_clusters
    res.compressed_clusters += sink.compressed_clusters
    for m in sink.messages:
        res.note(m)


def _check_l2_batch(img, tables: np.ndarray, calc, res, active: bool, disk=None) -> None:
    cs = img.cluster_size
    if img.extended_l2:
        e = tables[:, 0::2]
        bm = tables[:, 1::2]
    else:
        e = tables
        bm = None
    comp = (e & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0
    any_comp = bool(comp.any())
    copied = (e & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
    off = (e & np.uint64(C.L2E_OFFSET_MASK)).view(np.int64)
    has_off = off != 0
    if img.has_data_file:
        has_off |= copied
    if any_comp:
        has_off &= ~comp
    alloc = has_off                                  # NORMAL or ZERO_ALLOC
    if bm is not None:
        abits = bm & np.uint64(0xFFFFFFFF)
        zbits = bm >> np.uint64(32)
        n = int(np.count_nonzero(comp & (bm != 0)))
        if n:
            res.corruptions += n
            res.note("ERROR compressed cluster with non-zero subcluster allocation bitmap")
        n = int(np.count_nonzero(alloc & ((abits & zbits) != 0)))
        if n:
            res.corruptions += n
            res.note("ERROR: Allocated cluster has corrupted subcluster allocation bitmap")
        n = int(np.count_nonzero(~alloc & ~comp & (abits != 0)))
        if n:
            res.corruptions += n
            res.note("ERROR: Unallocated cluster has non-zero subcluster allocation bitmap")
    resv = (e & np.uint64(C.L2E_RESERVED_MASK)) != 0
    if any_comp:
        resv &= ~comp
    n = int(np.count_nonzero(resv))
    if n:
        res.corruptions += n
        for v in e[resv][:20]:
            res.note("ERROR found l2 entry with reserved bits set: %x" % int(v))
    n = int(np.count_nonzero(comp & copied)) if any_comp else 0
    if n:
        res.corruptions += n
        res.note("ERROR: Compressed cluster has QCOW_OFLAG_COPIED flag set")
    if img.has_data_file:
        n = int(np.count_nonzero(comp))
        if n:
            res.corruptions += n
            res.note("ERROR compressed cluster with data file")
    unal = alloc & ((off & (cs - 1)) != 0)
    n = int(np.count_nonzero(unal))
    if n:
        res.corruptions += n
        for o in off[unal][:20]:
            res.note("ERROR offset=%x: Data cluster is not properly aligned; L2 entry corrupted." % int(o))
    if active:
        per_row = np.count_nonzero(alloc, axis=1)
        n_alloc = int(per_row.sum())
        n_comp = int(np.count_nonzero(comp)) if any_comp else 0
        res.allocated_clusters += n_alloc + n_comp
        res.compressed_clusters += n_comp
        res.fragmented_clusters += n_comp
        # Fragmentation: an allocated cluster not directly after the previous one (per table).
        o = off[alloc]
        if len(o) > 1:
            frag = o[1:] != o[:-1] + cs
            first_of_row = np.cumsum(per_row)[:-1]          # index in o of each table's first
            first_of_row = first_of_row[(first_of_row > 0) & (first_of_row < len(o))]
            frag[first_of_row - 1] = False                 # no comparison across tables
            res.fragmented_clusters += int(np.count_nonzero(frag))
        # COPIED must match "on-disk refcount == 1" for every data cluster of the active table
        if img.has_data_file:
            rcs_one = np.ones(n_alloc, bool)
        else:
            rcs_one = _refcount_of(disk, o, img.cluster_bits) == 1
        flags = copied[alloc]
        bad = np.flatnonzero(rcs_one != flags)
        if len(bad):
            ents = e[alloc][bad]
            for j in range(min(len(bad), MAX_MESSAGES)):
                res.note("ERROR OFLAG_COPIED data cluster: l2_entry=%x refcount=%d"
                         % (int(ents[j]), 1 if rcs_one[bad[j]] else
                            int(_refcount_of(disk, o[bad[j]:bad[j] + 1], img.cluster_bits)[0])))
            res.corruptions += len(bad)
    if not img.has_data_file:
        calc.inc_many(off[alloc] if not active else o, cs)
    if any_comp:
        co, cz = compressed_extent(e[comp], img.cluster_bits)
        calc.inc_many(co, cz)


def check_image(img: Qcow2Image, filename: str | None = None, keep: bool = False) -> CheckResult:
    """Read-only consistency check, numerically identical to `qemu-img check`.

    With keep, the result also carries the computed counts (`res.calc`), the on-disk
    refcounts (`res.disk`) and whether the refcount structure must be rebuilt
    (`res.rebuild`), for repair.
    """
    res = CheckResult(filename=filename if filename is not None else img.path)
    res.rebuild = False
    h = img.header
    cs = img.cluster_size
    res.total_clusters = -(-img.size // cs)
    calc = RefcountCalculator(img, res)
    calc.inc(0, cs)
    # active L1
    calc.inc(h.l1_table_offset, h.l1_size * 8)
    disk = img.refcounts_all(calc.nb_clusters + 1)
    walk_l1(img, img.l1_table, calc, res, active=True, disk=disk)
    # snapshots
    for i, sn in enumerate(img.snapshots):
        if img.version >= 3 and len(sn.extra_data) < 16:
            res.note("ERROR snapshot table entry %d is incomplete" % i)
            res.corruptions += 1
            continue
        if sn.l1_size * 8 > C.MAX_L1_SIZE_BYTES:
            res.note("ERROR snapshot %s (%s) l1_size is too big" % (sn.id_str, sn.name))
            res.corruptions += 1
            continue
        if sn.l1_table_offset % cs:
            res.note("ERROR snapshot %s (%s) l1_offset=%#x: L1 table is not cluster aligned; "
                     "snapshot table entry corrupted" % (sn.id_str, sn.name, sn.l1_table_offset))
            res.corruptions += 1
            continue
        calc.inc(sn.l1_table_offset, sn.l1_size * 8)
        walk_l1(img, img.read_l1(sn.l1_table_offset, sn.l1_size), calc, res, active=False)
    if h.nb_snapshots:
        calc.inc(h.snapshots_offset, img.snapshot_table_size)
    calc.inc(h.refcount_table_offset, h.refcount_table_clusters * cs)
    if h.refcount_table_offset + h.refcount_table_clusters * cs > img.file_size:
        # a refcount table past the end of the file reads as zeros: repair builds a new one
        # inside the file rather than writing at the wild offset
        res.rebuild = True
    # bitmaps
    if img.bitmaps:
        ext = img.bitmaps_ext
        calc.inc(ext.bitmap_directory_offset, ext.bitmap_directory_size)
        for bmp in img.bitmaps:
            calc.inc(bmp.bitmap_table_offset, bmp.bitmap_table_size * 8)
            if bmp.bitmap_table_size:
                t = np.frombuffer(img.pread(bmp.bitmap_table_size * 8, bmp.bitmap_table_offset),
                                  ">u8").astype(np.uint64)
                d = (t & np.uint64(C.BME_TABLE_ENTRY_OFFSET_MASK)).astype(np.int64)
                calc.inc_many(d[d != 0], cs)
    if img.crypto_ext is not None:
        calc.inc(img.crypto_ext.offset, img.crypto_ext.length)
    # refcount blocks
    rt = img.refcount_table
    rb = np.minimum(rt & np.uint64(C.REFT_OFFSET_MASK), np.uint64(1 << 62)).astype(np.int64)
    for i in np.flatnonzero(rt & np.uint64(C.REFT_RESERVED_MASK)).tolist():
        res.note("ERROR refcount table entry %d has reserved bits set" % i)
        res.corruptions += 1
        res.rebuild = True
    for i in np.flatnonzero(rb):
        o = int(rb[i])
        if o % cs:
            res.note("ERROR refcount block %d is not cluster aligned; refcount table entry corrupted" % i)
            res.corruptions += 1
            res.rebuild = True
            continue
        if (o >> img.cluster_bits) >= calc.nb_clusters:
            res.note("ERROR refcount block %d is outside image" % i)
            res.corruptions += 1
            res.rebuild = True
            continue
        calc.inc(o, cs)
        if calc.counts[o >> img.cluster_bits] != 1:
            res.note("ERROR refcount block %d refcount=%d" % (i, int(calc.counts[o >> img.cluster_bits])))
            res.corruptions += 1
            res.rebuild = True
    # compare the computed counts with the on-disk refcounts
    n = calc.nb_clusters + (1 if calc.counts[calc.nb_clusters] else 0)
    comp = calc.counts[:n]
    if len(disk) < n:
        disk = np.concatenate([disk, np.zeros(n - len(disk), disk.dtype)])
    disk = disk[:n]
    maxref = (1 << img.refcount_bits) - 1
    step = 1 << 21          # compare in slices: bounded temporaries on huge images
    last_used = -1
    for lo in range(0, n, step):
        d = disk[lo:lo + step]
        c = comp[lo:lo + step]
        if img.refcount_bits < 32:
            over = c > maxref
            if over.any():
                res.corruptions += int(over.sum())
                res.note("ERROR: overflow of refcounts for %d clusters" % int(over.sum()))
        nz = np.flatnonzero((d != 0) | (c != 0))
        if len(nz):
            last_used = lo + int(nz[-1])
        diff = np.flatnonzero(d != c)
        if len(diff):
            dd = d[diff].astype(np.uint64)
            cc = c[diff].astype(np.uint64)
            err = diff[dd < cc] + lo
            leak = diff[dd > cc] + lo
            for i in err[:MAX_MESSAGES]:
                res.note("ERROR cluster %d refcount=%d reference=%d" % (i, disk[i], comp[i]))
            for i in leak[:MAX_MESSAGES]:
                res.note("Leaked cluster %d refcount=%d reference=%d" % (i, disk[i], comp[i]))
            res.corruptions += len(err)
            res.leaks += len(leak)
    if last_used >= 0:
        res.image_end_offset = (last_used + 1) * cs
    if keep:
        res.calc = calc
        res.disk = disk
    return res
