"""Metadata writes of one open qcow2 image: refcounts, cluster allocation, L1/L2, header.

This is the only code that writes qcow2 metadata.  It keeps the refcounts of the clusters it
touches in memory (authoritative while the image is open), allocates from them, and commits
them in the order the design requires (docs/interop/qcow2.rst, "Host cluster management"):

    new refcount blocks  ->  flush  ->  refcount table entries / new refcount table
    ->  flush  ->  header switch (when the table moved)  ->  flush  ->  free the old table

Callers raise refcounts before they write any reference to a cluster, and lower them only
after every reference to it is gone from disk, so a crash at any point leaks at worst.
"""
from __future__ import annotations

import struct

import numpy as np

from . import fileio
from .errors import CorruptImageError, Qcow2Error
from .format import constants as C
from .format.entries import decode_refblock, encode_refblock, to_be64
from .format.header import build_header

# Byte offsets of header fields we rewrite in place.
HDR_SIZE = 24
HDR_L1_SIZE = 36
HDR_L1_OFFSET = 40
HDR_REFTABLE = 48
HDR_REFTABLE_CLUSTERS = 56
HDR_SNAPSHOTS = 60
HDR_INCOMPAT = 72
HDR_AUTOCLEAR = 88


class RefcountOverflow(Qcow2Error):
    pass


class MetaWriter:
    """Refcounts and allocation for one image opened read-write."""

    def __init__(self, img, *, sync: bool = True):
        self.img = img
        self.fd = img.fd
        self.cs = img.cluster_size
        self.bits = img.cluster_bits
        self.per_block = self.cs * 8 // img.refcount_bits
        self.max_ref = (1 << img.refcount_bits) - 1
        self.reftable = img.refcount_table.copy()
        self.blocks: dict = {}
        self.dirty: set = set()
        self.homeless: set = set()       # refblocks that exist only in memory
        self.reftable_dirty: set = set()
        self.free_hint = 0
        self.end = img.file_clusters     # one past the last cluster that may be in use
        self.sync = sync

    # ------------------------------------------------------------ basics
    def flush(self) -> None:
        if self.sync:
            fileio.fsync(self.fd)

    def _block(self, rb: int) -> np.ndarray:
        arr = self.blocks.get(rb)
        if arr is not None:
            return arr
        off = int(self.reftable[rb]) & C.REFT_OFFSET_MASK if rb < len(self.reftable) else 0
        if off:
            if off % self.cs:
                raise CorruptImageError("Refcount block %d offset %#x is not cluster aligned" % (rb, off))
            arr = decode_refblock(self.img.pread(self.cs, off), self.img.refcount_order).astype(np.uint64)
        else:
            arr = np.zeros(self.per_block, np.uint64)
        self.blocks[rb] = arr
        return arr

    def _has_home(self, rb: int) -> bool:
        return rb < len(self.reftable) and (int(self.reftable[rb]) & C.REFT_OFFSET_MASK) != 0

    def get(self, clusters) -> np.ndarray:
        clusters = np.asarray(clusters, np.int64)
        out = np.zeros(len(clusters), np.uint64)
        rbs = clusters // self.per_block
        for rb in np.unique(rbs):
            m = rbs == rb
            out[m] = self._block(int(rb))[clusters[m] % self.per_block]
        return out

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
            if delta > 0:
                arr[idx] += np.uint64(delta)
            else:
                arr[idx] -= np.uint64(-delta)
            self.dirty.add(rb)
            if not self._has_home(rb):
                self.homeless.add(rb)
        if delta < 0:
            self.free_hint = min(self.free_hint, int(clusters.min()))
        else:
            self.end = max(self.end, int(clusters.max()) + 1)

    def add_many(self, clusters, delta: int) -> None:
        """Add delta once per occurrence of each cluster index (duplicates allowed), on whole
        refcount blocks at a time.  Raises before changing a block that would overflow."""
        idx = np.asarray(clusters, np.int64)
        if not len(idx):
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0:
            raise CorruptImageError("negative cluster index")
        per = self.per_block
        if hi - lo <= 8 * len(idx) + (1 << 16):
            cnt = np.bincount(idx - lo, minlength=hi - lo + 1)
            base = lo
        else:
            u, c = np.unique(idx, return_counts=True)
            for rb in np.unique(u // per).tolist():
                m = (u // per) == rb
                dense = np.zeros(per, np.int64)
                dense[u[m] - rb * per] = c[m]
                self._add_block(rb, 0, dense, delta)
            return
        for rb in range(lo // per, hi // per + 1):
            a = max(lo, rb * per)
            b = min(hi + 1, (rb + 1) * per)
            part = cnt[a - base:b - base]
            if part.any():
                self._add_block(rb, a - rb * per, part, delta)

    def _add_block(self, rb: int, start: int, counts: np.ndarray, delta: int) -> None:
        arr = self._block(rb)
        cur = arr[start:start + len(counts)].astype(np.int64)
        new = cur + counts.astype(np.int64) * delta
        if delta > 0 and int(new.max()) > self.max_ref:
            raise RefcountOverflow("Refcount overflow: a cluster would need a reference count "
                                   "above %d (refcount_bits=%d)" % (self.max_ref, self.img.refcount_bits))
        if delta < 0 and int(new.min()) < 0:
            raise CorruptImageError("Refcount underflow in refcount block %d" % rb)
        arr[start:start + len(counts)] = new.astype(np.uint64)
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
            if rb * per >= self.end and rb not in self.blocks and not self._has_home(rb):
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

    def allocate(self, n: int, contiguous: bool = False) -> np.ndarray:
        """Allocate n clusters (refcount set to 1 in memory).  Returns their indices."""
        if n <= 0:
            return np.zeros(0, np.int64)
        got = []
        need = n
        for s, length in self._free_runs(self.free_hint):
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
        if not contiguous and len(out) and out[0] == self.free_hint:
            self.free_hint = int(out[-1]) + 1
        self.change(out, +1)
        return out

    def allocate_bytes(self, nbytes: int) -> int:
        """Allocate contiguous clusters for nbytes; returns the host byte offset."""
        n = -(-nbytes // self.cs)
        return int(self.allocate(n, contiguous=True)[0]) << self.bits

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
                    arr[int(free[0])] += np.uint64(1)
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
        self.reftable_dirty.add(rb)

    def commit(self) -> None:
        """Write all changed refcounts in a crash-safe order; ends with a flush."""
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
        for rb in sorted(self.dirty):
            off = int(self.reftable[rb]) & C.REFT_OFFSET_MASK
            fileio.pwrite(self.fd, encode_refblock(self.blocks[rb], self.img.refcount_order), off)
        self.dirty.clear()
        self.flush()
        if new_rt is None:
            # 2. refcount table entries in place
            for rb in sorted(self.reftable_dirty):
                fileio.pwrite(self.fd, struct.pack(">Q", int(self.reftable[rb])),
                              h.refcount_table_offset + 8 * rb)
            self.reftable_dirty.clear()
            self.flush()
            self.img._reftable = self.reftable
            return
        # 2. new table, 3. header switch, 4. free the old table
        table = np.zeros(new_rt[1] * self.cs // 8, np.uint64)
        table[:len(self.reftable)] = self.reftable
        self.reftable = table
        fileio.pwrite(self.fd, to_be64(table), new_rt[0])
        self.flush()
        fileio.pwrite(self.fd, struct.pack(">QI", new_rt[0], new_rt[1]), HDR_REFTABLE)
        self.flush()
        h.refcount_table_offset, h.refcount_table_clusters = new_rt
        self.img._reftable = self.reftable
        self.reftable_dirty.clear()
        self.free(np.arange(old_rt[0] >> self.bits, (old_rt[0] >> self.bits) + old_rt[1]))
        self.commit()

    # ------------------------------------------------------------ tables and header
    def write_l2(self, offset: int, table: np.ndarray) -> None:
        fileio.pwrite(self.fd, to_be64(table), offset)
        self.img._l2_cache[offset] = table

    def write_l1_entries(self, l1: np.ndarray, indices) -> None:
        """Write the given entries of the active L1 table (contiguous runs in one write)."""
        idx = np.unique(np.asarray(indices, np.int64))
        if not len(idx):
            return
        base = self.img.header.l1_table_offset
        brk = np.flatnonzero(np.diff(idx) != 1) + 1
        for run in np.split(idx, brk):
            a, b = int(run[0]), int(run[-1]) + 1
            fileio.pwrite(self.fd, to_be64(l1[a:b]), base + 8 * a)

    def write_header(self) -> None:
        """Rewrite the fixed part of the header from img.header."""
        fileio.pwrite(self.fd, build_header(self.img.header), 0)

    def set_incompatible(self, bits: int, on: bool) -> None:
        h = self.img.header
        new = (h.incompatible_features | bits) if on else (h.incompatible_features & ~bits)
        if new == h.incompatible_features or self.img.version < 3:
            return
        h.incompatible_features = new
        fileio.pwrite(self.fd, struct.pack(">Q", new), HDR_INCOMPAT)
        self.flush()
