"""The allocator of one open qcow2 image: refcounts in memory, cluster allocation, L1/L2 writes.

Each open image has exactly one (`img.allocator`, made on first use): it keeps the refcounts
of the clusters it touches in memory (authoritative while the image is open), allocates
from them, and commits them in the order the design requires (docs/interop/qcow2.rst,
"Host cluster management"):

    new refcount blocks  ->  flush  ->  refcount table entries / new refcount table
    ->  flush  ->  header switch (when the table moved)  ->  flush  ->  free the old table

Callers raise refcounts before they write any reference to a cluster, and lower them only
after every reference to it is gone from disk, so a crash at any point leaks at worst.
Header switches live beside it in metadata.py.

Before any cluster is handed out or written, it is checked against the image's metadata as
QEMU's default `overlap-check=cached` does (`overlap`): the header, the active L1 table, the
refcount table and blocks, the snapshot table and the snapshots' L1 tables, and the active
L2 tables.  A cluster the refcounts call free but metadata uses (a truncated copy, a stale
pointer), or a write aimed at metadata, is refused and the image marked corrupt, before a
byte is written.
"""
from __future__ import annotations

import os

import numpy as np

from ..host import fileio
from ..errors import CorruptImageError, RefcountOverflow
from ..format import constants as C
from ..format.entries import decode_refblock, encode_refblock, to_be64
from . import metadata


class Allocator:
    """Refcounts and allocation for one image opened read-write (use `img.allocator`)."""

    def __init__(self, img, *, sync: bool = True):
        self.img = img
        self.cs = img.cluster_size
        self.bits = img.cluster_bits
        self.per_block = self.cs * 8 // img.refcount_bits
        self.max_ref = (1 << img.refcount_bits) - 1
        self.reftable = img.refcount_table.copy()
        self._rt_version = 0             # bumped at every change of self.reftable
        self._meta_index: dict = {}      # _metadata_index's cache
        # all refcounts loaded so far, in one flat array in the image's own width
        bits = img.refcount_bits
        self.dtype = np.uint8 if bits <= 8 else np.dtype("u%d" % (bits // 8))
        self.flat = np.zeros(0, self.dtype)
        self.loaded = np.zeros(0, bool)
        self.dirty: set = set()
        self.homeless: set = set()       # refblocks that exist only in memory
        self.reftable_dirty: set = set()
        self.free_hint = 0
        self.end = img.file_clusters     # one past the last cluster that may be in use
        self.sync = sync
        self.unflushed = False           # metadata written that no flush has covered yet

    @property
    def fd(self) -> int:
        return self.img.fd

    # ------------------------------------------------------------ overlap checks
    def _metadata_ranges(self, ignore: frozenset):
        """(name, first cluster array, cluster count array) of the metadata in use."""
        img, bits, cs = self.img, self.bits, self.cs
        h = img.header

        def span(off, nbytes):
            return off >> bits, max(1, -(-(off % cs + nbytes) // cs))

        out = []
        if "header" not in ignore:
            out.append(("qcow2_header", [0], [1]))
        if "active_l1" not in ignore and h.l1_size:
            a, n = span(h.l1_table_offset, h.l1_size * 8)
            out.append(("active L1 table", [a], [n]))
        if "refcount_table" not in ignore:
            a, n = span(h.refcount_table_offset, h.refcount_table_clusters * cs)
            out.append(("refcount table", [a], [n]))
        if "refcount_block" not in ignore:
            rb = np.minimum(self.reftable & np.uint64(C.REFT_OFFSET_MASK), np.uint64(1 << 62)).astype(np.int64)
            rb = rb[rb != 0] >> bits
            out.append(("refcount block", rb, np.ones(len(rb), np.int64)))
        if h.nb_snapshots and img._snapshots is not None:
            if "snapshot_table" not in ignore:
                a, n = span(h.snapshots_offset, getattr(img, "snapshot_table_size", 0) or 1)
                out.append(("snapshot table", [a], [n]))
            if "inactive_l1" not in ignore:
                firsts, counts = [], []
                for sn in img._snapshots:
                    if sn.l1_size and sn.l1_table_offset:
                        a, n = span(sn.l1_table_offset, sn.l1_size * 8)
                        firsts.append(a)
                        counts.append(n)
                out.append(("inactive L1 table", firsts, counts))
        if "active_l2" not in ignore and h.l1_size:
            l2 = (img.l1_table & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
            l2 = l2[l2 != 0] >> bits
            out.append(("active L2 table", l2, np.ones(len(l2), np.int64)))
        return out

    def overlap(self, first: int, count: int = 1, ignore=()) -> str | None:
        """The name of the metadata that clusters [first, first+count) overlap, or None."""
        return self.overlap_any(np.array([first], np.int64), np.array([count], np.int64),
                                ignore)

    def _metadata_index(self, ignore: frozenset):
        """The metadata ranges merged into arrays sorted by start (starts, ends, rank into
        names, prefix maximum of ends, names), kept until the metadata layout changes: the
        key holds the header fields, the active L1 table's bytes, the refcount table's
        version (every change of it in this allocator bumps it) and the snapshots' L1
        tables (guest writes check each new cluster; rebuilding the ranges per check cost
        more than the write)."""
        img, h = self.img, self.img.header
        snaps = img._snapshots
        key = (ignore, h.l1_table_offset, h.l1_size, h.refcount_table_offset,
               h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset,
               getattr(img, "snapshot_table_size", 0),
               img.l1_table.tobytes() if h.l1_size else b"", self._rt_version,
               None if snaps is None else tuple((sn.l1_table_offset, sn.l1_size)
                                                for sn in snaps))
        cache = self._meta_index
        got = cache.get(key)
        if got is not None:
            return got
        names, starts, ends, ranks = [], [], [], []
        for rank, (name, ms, mc) in enumerate(self._metadata_ranges(ignore)):
            ms = np.asarray(ms, np.int64)
            names.append(name)
            starts.append(ms)
            ends.append(ms + np.asarray(mc, np.int64))
            ranks.append(np.full(len(ms), rank, np.int32))
        ms = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        me = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        rk = np.concatenate(ranks) if ranks else np.zeros(0, np.int32)
        order = np.argsort(ms, kind="stable")
        ms, me, rk = ms[order], me[order], rk[order]
        got = (ms, me, rk, np.maximum.accumulate(me) if len(me) else me, names)
        if len(cache) > 8:
            cache.clear()
        cache[key] = got
        return got

    def overlap_any(self, firsts, counts=None, ignore=()) -> str | None:
        """The name of the metadata any of the cluster ranges [firsts[i], +counts[i])
        overlaps (counts None: single clusters), or None."""
        firsts = np.asarray(firsts, np.int64)
        if not len(firsts):
            return None
        counts = np.ones(len(firsts), np.int64) if counts is None else np.asarray(counts, np.int64)
        ms, me, rk, pmax, names = self._metadata_index(frozenset(ignore))
        if not len(ms):
            return None
        ends = firsts + counts
        # metadata ranges starting before each candidate's end; one of them ends after its
        # start exactly when their largest end does
        k = np.searchsorted(ms, ends, side="left")
        hit = (k > 0) & (pmax[np.maximum(k - 1, 0)] > firsts)
        if not hit.any():
            return None
        best = None
        for i in np.flatnonzero(hit).tolist():
            j = np.flatnonzero((ms[:k[i]] < ends[i]) & (me[:k[i]] > firsts[i]))
            r = int(rk[j].min())
            best = r if best is None else min(best, r)
        return names[best]

    def refuse_overlap(self, firsts, counts=None, ignore=(), what: str = "write") -> None:
        """Mark the image corrupt and raise if the clusters overlap metadata (QEMU's
        "Preventing invalid write on metadata")."""
        name = self.overlap_any(firsts, counts, ignore)
        if name is None:
            return
        first = int(np.asarray(firsts, np.int64).min()) << self.bits
        try:
            self.mark_corrupt()
        except OSError:
            pass
        if what == "write":
            msg = "Preventing invalid write on metadata (overlaps with %s)" % name
        else:
            msg = ("Preventing invalid allocation of %s at offset %#x (overlaps with %s)"
                   % (what, first, name))
        raise CorruptImageError("Marking image as corrupt: " + msg)

    # ------------------------------------------------------------ basics
    def flush(self) -> None:
        if self.sync:
            fileio.fsync(self.fd)
        self.unflushed = False

    def barrier(self) -> None:
        """Flush if metadata was written since the last flush."""
        if self.unflushed:
            self.flush()

    def _grow(self, nblocks: int) -> None:
        if nblocks <= len(self.loaded):
            return
        n = max(nblocks, 2 * len(self.loaded), 16)
        flat = np.zeros(n * self.per_block, self.dtype)
        flat[:len(self.flat)] = self.flat
        loaded = np.zeros(n, bool)
        loaded[:len(self.loaded)] = self.loaded
        self.flat, self.loaded = flat, loaded

    def _load(self, rb: int) -> None:
        self._grow(rb + 1)
        off = int(self.reftable[rb]) & C.REFT_OFFSET_MASK if rb < len(self.reftable) else 0
        if off:
            if off % self.cs:
                raise CorruptImageError("Refcount block %d offset %#x is not cluster aligned" % (rb, off))
            self.flat[rb * self.per_block:(rb + 1) * self.per_block] = decode_refblock(
                self.img.pread(self.cs, off), self.img.refcount_order)
        self.loaded[rb] = True

    def _ensure(self, rbs) -> None:
        for rb in rbs:
            rb = int(rb)
            if rb >= len(self.loaded) or not self.loaded[rb]:
                self._load(rb)

    def _block(self, rb: int) -> np.ndarray:
        """The refcounts of one block: a writable view into the flat array."""
        if rb >= len(self.loaded) or not self.loaded[rb]:
            self._load(rb)
        return self.flat[rb * self.per_block:(rb + 1) * self.per_block]

    def _is_loaded(self, rb: int) -> bool:
        return rb < len(self.loaded) and bool(self.loaded[rb])

    def _has_home(self, rb: int) -> bool:
        return rb < len(self.reftable) and (int(self.reftable[rb]) & C.REFT_OFFSET_MASK) != 0

    def get(self, clusters) -> np.ndarray:
        clusters = np.asarray(clusters, np.int64)
        if not len(clusters):
            return np.zeros(0, self.dtype)
        lo = int(clusters.min())
        rbs = np.flatnonzero(np.bincount(clusters // self.per_block - lo // self.per_block)) \
            + lo // self.per_block
        self._ensure(rbs.tolist())
        return self.flat[clusters]

    def change(self, clusters, delta: int) -> None:
        """Add delta to the refcount of each cluster (each index once per call)."""
        clusters = np.asarray(clusters, np.int64)
        if not len(clusters):
            return
        rbs = clusters // self.per_block
        groups = [(int(rb), clusters[rbs == rb] % self.per_block) for rb in np.unique(rbs)]
        for rb, idx in groups:  # validate everything before changing anything
            cur = self._block(rb)[idx]
            if delta > 0 and (cur.max() + delta > self.max_ref):
                raise RefcountOverflow("Refcount overflow: a cluster would need a reference count "
                                       "above %d (refcount_bits=%d)" % (self.max_ref, self.img.refcount_bits))
            if delta < 0 and cur.min() < -delta:
                raise CorruptImageError("Refcount underflow for a cluster in refcount block %d" % rb)
        for rb, idx in groups:
            arr = self._block(rb)
            arr[idx] = (arr[idx].astype(np.int64) + delta).astype(self.dtype)
            self.dirty.add(rb)
            if not self._has_home(rb):
                self.homeless.add(rb)
        if delta < 0:
            self.free_hint = min(self.free_hint, int(clusters.min()))
        else:
            self.end = max(self.end, int(clusters.max()) + 1)

    def add_many(self, clusters, delta: int) -> None:
        """Add delta once per occurrence of each cluster index (duplicates allowed), on whole
        ranges of the flat refcount array.  Raises before changing anything that would
        overflow or underflow."""
        idx = np.asarray(clusters, np.int64)
        if not len(idx):
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0:
            raise CorruptImageError("negative cluster index")
        per = self.per_block
        if hi - lo > 8 * len(idx) + (1 << 16):
            # sparse: group by block
            u, c = np.unique(idx, return_counts=True)
            for rb in np.unique(u // per).tolist():
                m = (u // per) == rb
                dense = np.zeros(per, np.int64)
                dense[u[m] - rb * per] = c[m]
                self._add_block(rb, 0, dense, delta)
            return
        cnt = np.bincount(idx - lo, minlength=hi - lo + 1)
        if delta < 0:
            cnt = -cnt
        if abs(delta) != 1:
            cnt = cnt * abs(delta)
        slab = 1 << 20
        work = []
        for s0 in range(lo, hi + 1, slab):
            part = cnt[s0 - lo:min(s0 + slab, hi + 1) - lo]
            nz = np.flatnonzero(part)
            if not len(nz):
                continue
            a, b = s0 + int(nz[0]), s0 + int(nz[-1]) + 1
            part = part[nz[0]:nz[-1] + 1]
            self._ensure(range(a // per, (b - 1) // per + 1))
            cur = self.flat[a:b]
            if delta > 0:
                if int((cur.astype(np.int64) + part).max()) > self.max_ref:
                    raise RefcountOverflow("Refcount overflow: a cluster would need a reference "
                                           "count above %d (refcount_bits=%d)"
                                           % (self.max_ref, self.img.refcount_bits))
            elif int((cur.astype(np.int64) + part).min()) < 0:
                raise CorruptImageError("Refcount underflow for a cluster near index %d" % a)
            work.append((a, b, part))
        for a, b, part in work:       # everything validated: now apply
            new = self.flat[a:b].astype(np.int64) + part
            self.flat[a:b] = new.astype(self.dtype)
            for rb in range(a // per, (b - 1) // per + 1):
                self.dirty.add(rb)
                if not self._has_home(rb):
                    self.homeless.add(rb)
            if delta < 0:
                freed = np.flatnonzero((new == 0) & (part != 0))
                if len(freed):
                    self.free_hint = min(self.free_hint, a + int(freed[0]))
            else:
                self.end = max(self.end, b)

    def _add_block(self, rb: int, start: int, counts: np.ndarray, delta: int) -> None:
        arr = self._block(rb)
        cur = arr[start:start + len(counts)].astype(np.int64)
        new = cur + counts.astype(np.int64) * delta
        if delta > 0 and int(new.max()) > self.max_ref:
            raise RefcountOverflow("Refcount overflow: a cluster would need a reference count "
                                   "above %d (refcount_bits=%d)" % (self.max_ref, self.img.refcount_bits))
        if delta < 0 and int(new.min()) < 0:
            raise CorruptImageError("Refcount underflow in refcount block %d" % rb)
        arr[start:start + len(counts)] = new.astype(self.dtype)
        self.dirty.add(rb)
        if not self._has_home(rb):
            self.homeless.add(rb)
        if delta < 0:
            freed = np.flatnonzero((new == 0) & (counts > 0))
            if len(freed):
                self.free_hint = min(self.free_hint, rb * self.per_block + start + int(freed[0]))

    # ------------------------------------------------------------ allocation
    def _free_runs(self, start: int):
        """Yield (first, length) runs of free clusters from start on; the last one is endless
        (length None) once past every refcount block that exists."""
        per = self.per_block
        c = start
        cur = None
        prev_end = None
        while True:
            rb = c // per
            if rb * per >= self.end and not self._is_loaded(rb) and not self._has_home(rb):
                yield (cur if cur is not None else c), None
                return
            lo = c - rb * per
            free = self._block(rb)[lo:] == 0
            d = np.diff(np.concatenate([[0], free.astype(np.int8), [0]]))
            starts = np.flatnonzero(d == 1) + c
            ends = np.flatnonzero(d == -1) + c
            block_end = (rb + 1) * per
            for s, e in zip(starts.tolist(), ends.tolist()):
                if cur is not None and s != c:
                    yield cur, prev_end - cur
                    cur = None
                if cur is None:
                    cur = s
                prev_end = e
                if e < block_end:
                    yield cur, e - cur
                    cur = None
            if cur is not None and (not len(starts) or int(ends[-1]) < block_end):
                yield cur, prev_end - cur
                cur = None
            c = block_end

    def drop_empty_blocks(self) -> None:
        """Unhook the refcount blocks loaded here that count nothing but (maybe) their own
        cluster, as QEMU does after a shrink: the table entries are cleared and flushed
        first, then the blocks' clusters freed (a crash in between leaks at most)."""
        self.commit()
        per, mask = self.per_block, np.uint64(C.REFT_OFFSET_MASK)
        n = min(len(self.loaded), len(self.reftable))
        cand = np.flatnonzero(self.loaded[:n] & (self.reftable[:n] & mask != 0))
        drop, elsewhere = [], []
        for rb in cand.tolist():
            c = (int(self.reftable[rb]) & C.REFT_OFFSET_MASK) >> self.bits
            used = np.flatnonzero(self._block(rb))
            own = c // per == rb
            if not len(used) or (own and len(used) == 1 and int(used[0]) == c - rb * per
                                 and int(self._block(rb)[used[0]]) == 1):
                drop.append(rb)
                if not own:
                    elsewhere.append(c)
        if not drop:
            return
        self._rt_version += 1
        for rb in drop:
            self.reftable[rb] = 0
            self._block(rb)[:] = 0           # it counts nothing now (its own cluster is free)
        lo, hi = min(drop), max(drop) + 1   # one write: the entries between are unchanged
        metadata.write_entries(self.img, self.img.header.refcount_table_offset + 8 * lo,
                               self.reftable[lo:hi])
        self.flush()
        self.img._reftable = self.reftable
        if elsewhere:
            self.free(elsewhere)
            self.commit()
        self.free_hint = min(self.free_hint, min(drop) * per)

    def trim_file(self) -> None:
        """Cut the file after its last cluster in use (refcounts committed and flushed
        first: only clusters nothing refers to any more are cut off)."""
        self.commit()
        homes = np.flatnonzero(self.reftable & np.uint64(C.REFT_OFFSET_MASK)).tolist()
        blocks = sorted(set(homes) | set(np.flatnonzero(self.loaded).tolist()), reverse=True)
        end = 0
        for rb in blocks:                        # the last block with a cluster in use
            used = np.flatnonzero(self._block(rb))
            if len(used):
                end = (rb * self.per_block + int(used[-1]) + 1) << self.bits
                break
        if end < os.fstat(self.fd).st_size:
            fileio.ftruncate(self.fd, end)
            self.flush()
            self.img.file_size = end
            self.end = min(self.end, end >> self.bits)
            self.free_hint = min(self.free_hint, self.end)

    def allocate(self, n: int, contiguous: bool = False, ignore=()) -> np.ndarray:
        """Allocate n clusters (refcount set to 1 in memory).  Returns their indices.
        ignore: metadata the overlap check leaves out (one being replaced)."""
        if n <= 0:
            return np.zeros(0, np.int64)
        got = []
        need = n
        c = self.free_hint
        per = self.per_block
        if not contiguous and n <= 8 and (c + n - 1) // per == c // per:
            # the common case (a guest write's cluster or two): the clusters at the hint are
            # free; the same answer as the scan below, without it
            lo = c - c // per * per
            if not self._block(c // per)[lo:lo + n].any():
                got = [np.arange(c, c + n, dtype=np.int64)]
                need = 0
        for s, length in (self._free_runs(self.free_hint) if need else ()):
            if length is None:
                length = need
            if contiguous:
                if length >= n:
                    got = [np.arange(s, s + n, dtype=np.int64)]
                    break
                continue
            take = min(length, need)
            got.append(np.arange(s, s + take, dtype=np.int64))
            need -= take
            if need == 0:
                break
        out = np.concatenate(got)
        self.refuse_overlap(out, ignore=ignore, what="a cluster")
        if not contiguous and len(out):
            # the runs were taken in order from the hint, each one whole but the last:
            # every cluster before the last one taken is in use
            self.free_hint = max(self.free_hint, int(out[-1]) + 1)
        self.change(out, +1)
        return out

    def allocate_bytes(self, nbytes: int, ignore=()) -> int:
        """Allocate contiguous clusters for nbytes; returns the host byte offset."""
        n = -(-nbytes // self.cs)
        return int(self.allocate(n, contiguous=True, ignore=ignore)[0]) << self.bits

    def free(self, clusters) -> None:
        self.change(clusters, -1)

    # ------------------------------------------------------------ commit
    def _home_blocks(self) -> None:
        """Give every in-memory refcount block a cluster (self-describing where possible)."""
        while self.homeless:
            for rb in sorted(self.homeless):
                if self._has_home(rb):
                    self.homeless.discard(rb)
                    continue
                arr = self._block(rb)
                free = np.flatnonzero(arr == 0)
                if len(free):
                    c = rb * self.per_block + int(free[0])
                    self.refuse_overlap([c], what="refcount block")
                    arr[int(free[0])] += 1
                    self.end = max(self.end, c + 1)
                else:
                    c = int(self.allocate(1)[0])
                self._set_reftable(rb, c << self.bits)
                self.dirty.add(rb)
                self.homeless.discard(rb)

    def _set_reftable(self, rb: int, offset: int) -> None:
        if rb >= len(self.reftable):
            grown = np.zeros(max(rb + 1, len(self.reftable) * 2), np.uint64)
            grown[:len(self.reftable)] = self.reftable
            self.reftable = grown
            self._reftable_moved = True
        self.reftable[rb] = np.uint64(offset)
        self._rt_version += 1
        self.reftable_dirty.add(rb)

    def commit(self, flush: bool = True) -> None:
        """Write all changed refcounts in a crash-safe order; ends with a flush unless
        flush=False (the caller then flushes before anything that relies on them)."""
        if not self.dirty and not self.homeless:
            return
        self._reftable_moved = False
        self._home_blocks()
        h = self.img.header
        old_rt = (h.refcount_table_offset, h.refcount_table_clusters)
        table_bytes = h.refcount_table_clusters * self.cs
        new_rt = None
        if self._reftable_moved or len(self.reftable) * 8 > table_bytes:
            # A bigger table: place it in free clusters, which may need refblocks of its own.
            while True:
                need = -(-len(self.reftable) * 8 // self.cs)
                need = max(need, h.refcount_table_clusters + 1)
                first = int(self.allocate(need, contiguous=True)[0])
                self._home_blocks()
                if len(self.reftable) * 8 <= need * self.cs:
                    break
                self.free(np.arange(first, first + need))
            new_rt = (first << self.bits, need)
        # 1. refcount blocks
        homes = [int(self.reftable[rb]) & C.REFT_OFFSET_MASK for rb in self.dirty]
        self.refuse_overlap(np.array(homes, np.int64) >> self.bits, ignore={"refcount_block"})
        for rb in sorted(self.dirty):
            off = int(self.reftable[rb]) & C.REFT_OFFSET_MASK
            fileio.pwrite(self.fd, encode_refblock(self._block(rb), self.img.refcount_order), off)
        self.dirty.clear()
        if new_rt is None:
            # 2. refcount table entries in place (new blocks must be on disk before them)
            if self.reftable_dirty:
                self.flush()
                for rb in sorted(self.reftable_dirty):
                    metadata.write_entries(self.img, h.refcount_table_offset + 8 * rb,
                                           self.reftable[rb:rb + 1])
                self.reftable_dirty.clear()
            if flush:
                self.flush()
            self.img._reftable = self.reftable
            return
        self.flush()
        # 2. new table, 3. header switch, 4. free the old table
        table = np.zeros(new_rt[1] * self.cs // 8, np.uint64)
        table[:len(self.reftable)] = self.reftable
        self.reftable = table
        self._rt_version += 1
        fileio.pwrite(self.fd, to_be64(table), new_rt[0])
        self.flush()
        metadata.switch_refcount_table(self.img, new_rt[0], new_rt[1], self.reftable)
        self.unflushed = False
        self.reftable_dirty.clear()
        self.free(np.arange(old_rt[0] >> self.bits, (old_rt[0] >> self.bits) + old_rt[1]))
        self.commit()

    # ------------------------------------------------------------ tables
    def write_l2(self, offset: int, table: np.ndarray) -> None:
        """Write one L2 table (no flush); the image's cache holds it from now on."""
        self.refuse_overlap([offset >> self.bits], ignore={"active_l2"})
        fileio.pwrite(self.fd, to_be64(table), offset)
        self.img._cache_l2(offset, table)

    def set_l1_entries(self, indices, values=None) -> None:
        """Set entries of the active L1 table (values None: write them as they are in the
        image's L1), contiguous runs in one write each (no flush)."""
        l1 = self.img.l1_table
        idx = np.unique(np.asarray(indices, np.int64))
        if not len(idx):
            return
        base = self.img.header.l1_table_offset
        self.refuse_overlap([(base + 8 * int(idx[0])) >> self.bits],
                            [((base + 8 * int(idx[-1])) >> self.bits)
                             - ((base + 8 * int(idx[0])) >> self.bits) + 1],
                            ignore={"active_l1"})
        if values is not None:
            l1[np.asarray(indices, np.int64)] = values
        brk = np.flatnonzero(np.diff(idx) != 1) + 1
        for run in np.split(idx, brk):
            a, b = int(run[0]), int(run[-1]) + 1
            fileio.pwrite(self.fd, to_be64(l1[a:b]), base + 8 * a)

    def mark_corrupt(self) -> None:
        """Set the corrupt bit (an inconsistency found on a write path)."""
        metadata.set_incompatible(self.img, C.INCOMPAT_CORRUPT, True)
