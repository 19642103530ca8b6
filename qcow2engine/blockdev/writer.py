"""Guest writes into the top qcow2 layer of a chain: write, write_zeroes, discard.

One request is planned on whole L2 tables with numpy (which clusters are rewritten in place,
which need a new host cluster, which need copy-on-write filling), then carried out in the
crash-safe order of the design:

    allocate (refcounts +1)  ->  commit refcounts, flush
    ->  guest data  ->  flush  ->  L2 tables  ->  (flush, if new tables)  ->  L1 entries
    ->  (flush, if anything was replaced)  ->  release it (refcounts -1)  ->  commit

The last metadata of a request needs no barrier of its own: nothing on disk depends on it
yet.  The next request's data flush (or its release, a flush, closing the image) covers it.
As with a disk's write cache (and QEMU), a crash may lose requests made since the last
flush, in any order among themselves; each cluster still reads as its old or new data.

A crash at any point leaves the old or the new guest data and, at worst, leaked clusters.
"""
from __future__ import annotations

import numpy as np

from ..host import fileio
from ..errors import CorruptImageError, InvalidRequestError, UnsupportedFeatureError
from ..format import constants as C
from ..format import entries as E
from .sources import CHUNK as PIECE, as_data, write_piece

OFF = np.uint64(C.L2E_OFFSET_MASK)
COPIED = np.uint64(C.QCOW_OFLAG_COPIED)
COMPRESSED = np.uint64(C.QCOW_OFLAG_COMPRESSED)
ZERO = np.uint64(C.QCOW_OFLAG_ZERO)
ALL_ALLOC = np.uint64(0xFFFFFFFF)
ALL_ZERO = np.uint64(0xFFFFFFFF00000000)
BATCH_BYTES = 1 << 30


class GuestWriter:
    """Writes guest data into chain.layers[0] (a qcow2 image opened read-write)."""

    def __init__(self, chain, *, sync: bool = True):
        self.chain = chain
        self.layer = chain.layers[0]
        self.img = self.layer.image
        # LUKS images: data is encrypted per 512-byte sector (sector number: the host
        # offset / 512; legacy AES: the guest offset / 512) with the cipher the session
        # unlocked; requests are widened to whole sectors (read-modify-write through the
        # guest view)
        self.cipher = None
        self.guest_iv = False
        if self.img.encrypted:
            self.cipher = getattr(self.img, "cipher", None)
            if self.cipher is None:
                raise UnsupportedFeatureError("'%s' is encrypted and was not unlocked"
                                              % self.img.path)
            if self.img.has_data_file and self.img.data_file_raw:
                raise UnsupportedFeatureError("Encrypted images with a raw external data file "
                                              "are not supported")
            self.guest_iv = bool(getattr(self.cipher, "guest_iv", False))
        if not sync:
            self.img.allocator.sync = False
        self.cs = self.img.cluster_size
        self.bits = self.img.cluster_bits
        self.ext = self.img.extended_l2
        self.sub = self.img.subcluster_size
        self.per_l2 = self.img.l2_entries
        self.data_fd = self.img.data_fd_for_write() if self.img.has_data_file else self.img.fd
        from ..image.references import refuse_damaged_metadata
        refuse_damaged_metadata(self.img)
        from ..image.bitmaps import tracker
        self.bitmaps = tracker(self.img)        # None: no enabled persistent bitmap

    @property
    def meta(self):
        """The image's one allocator (never a copy: snapshots, repairs and other writers on
        the same open image share it)."""
        return self.img.allocator

    # ------------------------------------------------------------ public
    def write(self, offset: int, data) -> None:
        """Write data (a bytes-like object or a source, see sources.py) at offset."""
        src = as_data(data)
        self._check_range(offset, len(src))
        step = max(self.cs, BATCH_BYTES // self.cs * self.cs)
        pos = 0
        while pos < len(src):
            n = min(step - (offset + pos) % step, len(src) - pos)
            part = src[pos:pos + n] if isinstance(src, np.ndarray) else src.part(pos, pos + n)
            self._write_data(offset + pos, part)
            pos += n

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_range(offset, length)
        if length <= 0:
            return
        if self.img.version < 3 or self.img.has_data_file:
            self._write_zero_data(offset, length)
            return
        unit = self.sub
        a = -(-offset // unit) * unit
        b = (offset + length) // unit * unit
        if offset + length == self.img.size:
            b = offset + length
        if b <= a:
            self._write_zero_data(offset, length)
            return
        if a > offset:
            self._write_zero_data(offset, a - offset)
        self._zero_units(a, b, unmap=unmap, discard=False)
        if offset + length > b:
            self._write_zero_data(b, offset + length - b)

    def discard(self, offset: int, length: int) -> None:
        """Discard whole clusters (partial clusters are left alone, as QEMU does)."""
        self._check_range(offset, length)
        a = -(-offset // self.cs) * self.cs
        b = (offset + length) // self.cs * self.cs
        if offset + length == self.img.size:
            b = offset + length
        if b <= a:
            return
        if self.img.version < 3 and len(self.chain.layers) > 1:
            return      # v2 has no zero flag: freeing would expose the backing file (QEMU: no-op)
        if self.img.has_data_file:
            self._write_zero_data(a, b - a)
            return
        self._zero_units(a, b, unmap=True, discard=True)

    def write_compressed(self, c0: int, idx: np.ndarray, blobs: list, clusters: np.ndarray) -> None:
        """Store guest clusters c0+idx as compressed clusters (blobs: the compressed bytes of
        each, packed back to back); clusters whose blob would not be smaller are written
        normally from `clusters` (the uncompressed data of clusters c0.. as one array)."""
        self._check_range(c0 * self.cs, min(len(clusters), self.img.size - c0 * self.cs))
        cs = self.cs
        if self.img.has_data_file:
            raise UnsupportedFeatureError("Compression is not supported with external data files")
        if self.cipher is not None:
            raise UnsupportedFeatureError("Compression is not supported with encryption")
        big = np.array([len(b) >= cs for b in blobs], bool)
        if big.any():
            sel = np.zeros(len(clusters) // cs, bool)
            sel[idx[big]] = True
            self.write_clusters(c0 * cs, clusters[:min(len(clusters), self.img.size - c0 * cs)], sel)
        idx = idx[~big]
        blobs = [b for b, k in zip(blobs, big) if not k]
        if not len(idx):
            return
        lens = np.array([len(b) for b in blobs], np.int64)
        rel = np.concatenate([[0], np.cumsum(lens)[:-1]])
        total = int(lens.sum())
        first = int(self.meta.allocate(-(-total // cs), contiguous=True)[0])
        start = first * cs
        offs = start + rel
        fc = offs >> self.bits
        lc = (offs + lens - 1) >> self.bits
        # a host cluster holding parts of k compressed clusters has refcount k
        touch = np.concatenate([np.arange(a, b + 1) for a, b in zip(fc.tolist(), lc.tolist())])
        counts = np.bincount(touch - first)
        extra = np.repeat(np.arange(len(counts)) + first, np.maximum(counts - 1, 0))
        self.meta.add_many(extra, +1)
        g0, g1 = c0 + int(idx.min()), c0 + int(idx.max()) + 1
        tables = self._tables(g0, g1)
        pos = (c0 + idx) - g0
        repl = self._gather(tables)[0][pos]
        rh = (repl & OFF).astype(np.int64)
        self._refuse_unshared(rh[((repl & (COMPRESSED | COPIED)) == 0) & (rh != 0)], tables)
        self._refuse_referenced(tables, np.arange(first, first + len(counts)))
        self._new_tables(tables)
        self.meta.commit()
        fileio.pwrite(self.img.fd, b"".join(blobs), start)
        self.meta.flush()
        x = C.compressed_offset_bits(self.bits)
        nsec = ((offs + lens - 1) >> 9) - (offs >> 9)
        desc = (offs.astype(np.uint64) | (nsec.astype(np.uint64) << np.uint64(x))) | COMPRESSED
        old, new_bmp = self._gather(tables)
        new_ent = old.copy()
        new_ent[pos] = desc
        if self.ext:
            new_bmp[pos] = 0
        self._store(tables, ent_new=new_ent, bmp_new=new_bmp, c0=g0)
        repl = old[pos]
        comp = (repl & COMPRESSED) != 0
        host = (repl & OFF).astype(np.int64)
        self._release(host[~comp & (host != 0)], repl[comp], tables)

    def make_empty(self) -> None:
        """Drop every cluster of the image (all of it reads from the backing file again):
        the L1 table is cleared first, then the tables and data lose their references."""
        from ..image.references import ReachableTree, add_tree
        img = self.img
        tree = ReachableTree(img, img.l1_table.copy())
        if not len(tree.used):
            return
        self._check_range(0, img.size)
        add_tree(self.meta, tree, -1)           # computed (and validated) in memory first
        self.meta.set_l1_entries(tree.used, 0)
        self.meta.flush()
        img.drop_l2_cache()
        self.meta.trim_file()                    # give the space back, as QEMU does

    def _check_range(self, offset: int, length: int) -> None:
        """Refuse a request outside the disk; note it in the enabled dirty bitmaps (before
        any of its data moves)."""
        if offset < 0 or length < 0 or offset + length > self.img.size:
            raise InvalidRequestError("request [%d, %d) is outside the disk (size %d)"
                             % (offset, offset + length, self.img.size))
        if self.bitmaps is not None:
            self.bitmaps.record(offset, length)

    def _write_zero_data(self, offset: int, length: int) -> None:
        step = 64 << 20
        for p in range(offset, offset + length, step):
            n = min(step, offset + length - p)
            self._write_data(p, np.zeros(n, np.uint8))

    # ------------------------------------------------------------ tables
    def _gather(self, tables):
        """The entries (and, with extended L2, the bitmaps) of the tables' ranges, in order."""
        w = 2 if self.ext else 1
        ent = np.concatenate([t[1][t[3] * w:t[4] * w:w] for t in tables])
        bmp = np.concatenate([t[1][t[3] * 2 + 1:t[4] * 2:2] for t in tables]) if self.ext else None
        return ent, bmp

    def _tables(self, c0: int, c1: int):
        """For clusters [c0, c1): list of (l1 index, table copy, state, first, last)."""
        img = self.img
        l1 = img.l1_table
        out = []
        for i in range(c0 // self.per_l2, (c1 - 1) // self.per_l2 + 1):
            a = max(c0, i * self.per_l2) - i * self.per_l2
            b = min(c1, (i + 1) * self.per_l2) - i * self.per_l2
            ent = int(l1[i])
            l2off = ent & C.L1E_OFFSET_MASK
            if l2off == 0:
                table = np.zeros(self.per_l2 * (2 if self.ext else 1), np.uint64)
                state = "new"
            else:
                if l2off % self.cs:
                    self._corrupt("L2 table offset %#x unaligned (L1 index %d)" % (l2off, i))
                if (l2off >> self.bits) >= self.img.file_clusters + 1:
                    self._corrupt("L2 table offset %#x is past the end of the file" % l2off)
                table = img.read_l2(l2off).copy()
                state = "own" if ent & C.QCOW_OFLAG_COPIED else "cow"
            out.append([i, table, state, a, b, l2off])
        own = [t[5] >> self.bits for t in out if t[2] == "own"]
        if own:          # tables rewritten in place must not be other metadata
            self.meta.refuse_overlap(own, ignore={"active_l2"})
        return out

    def _refuse_unshared(self, hosts, tables) -> None:
        """Clusters about to be copied on write because their entry lacks COPIED (data
        clusters: hosts; L2 tables: the tables in state "cow") lose one reference
        afterwards: each must have a refcount of at least 2, or the copy would free a
        cluster that something else still uses (a refcount QEMU's check calls wrong)."""
        if self.img.has_data_file:
            hosts = np.zeros(0, np.int64)
        clusters = np.concatenate([np.asarray(hosts, np.int64) >> self.bits,
                                   np.array([t[5] >> self.bits for t in tables
                                             if t[2] == "cow"], np.int64)])
        if not len(clusters):
            return
        low = clusters[self.meta.get(clusters) < 2]
        if len(low):
            self._corrupt("Preventing invalid copy-on-write of the cluster at offset %#x: it "
                          "is marked shared but its refcount is %d"
                          % (int(low[0]) << self.bits, int(self.meta.get(low[:1])[0])))

    def _new_tables(self, tables) -> None:
        """A new cluster for each table that is not rewritten in place."""
        fresh = [t for t in tables if t[2] != "own"]
        for t in fresh:
            t.append(int(self.meta.allocate(1)[0]) << self.bits)
        self._refuse_referenced(tables, [t[6] >> self.bits for t in fresh])

    def _refuse_referenced(self, tables, new) -> None:
        """Newly allocated clusters must not be what an entry of the request's tables
        already points at (a reference the refcounts do not know: handing the cluster out
        would give it two owners)."""
        new = np.asarray(new, np.int64)
        if not len(new) or self.img.has_data_file:
            return
        ent = np.concatenate([t[1][0::2] if self.ext else t[1] for t in tables])
        comp = (ent & COMPRESSED) != 0
        lo, hi = int(new.min()), int(new.max())
        # a range test over every entry first (cheap, vectorised): the new clusters are few
        # and close together; only candidates are compared exactly
        c = (ent[~comp] & OFF).astype(np.int64) >> self.bits
        cand = c[(c >= lo) & (c <= hi)]
        if comp.any():
            cand = np.concatenate([cand, E.referenced_clusters(ent[comp], self.bits)])
        hit = np.intersect1d(new, cand) if len(cand) else cand
        if len(hit):
            self.img.forget_tables()          # the in-memory allocation is dropped
            self._corrupt("Preventing invalid allocation of the cluster at offset %#x: an "
                          "L2 entry already points at it" % (int(hit[0]) << self.bits))

    def _corrupt(self, msg: str):
        """An inconsistency found on a write path: mark the image corrupt and stop."""
        try:
            self.meta.mark_corrupt()
        except OSError:
            pass
        raise CorruptImageError("%s; the image has been marked corrupt" % msg)

    # ------------------------------------------------------------ data writes
    def write_clusters(self, offset: int, data, sel: np.ndarray) -> None:
        """Write only the clusters of [offset, offset+len(data)) selected by the boolean
        array sel (one entry per cluster; offset cluster aligned): a sparse copy in one
        request, as convert does."""
        buf = as_data(data)
        self._check_range(offset, len(buf))
        if offset % self.cs:
            raise InvalidRequestError("write_clusters needs a cluster-aligned offset")
        if sel.any():
            self._write_data(offset, buf, sel=np.asarray(sel, bool))

    def _sector_aligned(self, offset: int, data):
        """(offset, data) widened to whole 512-byte sectors: the partial head and tail
        sectors are filled from the current guest view."""
        a = offset // 512 * 512
        b = -(-(offset + len(data)) // 512) * 512
        buf = np.frombuffer(self.chain.read(a, b - a), np.uint8).copy()
        n = len(data)
        for p in range(0, n, PIECE):
            q = min(p + PIECE, n)
            buf[offset - a + p:offset - a + q] = data[p:q]
        return a, buf

    def _write_data(self, offset: int, data: np.ndarray, sel: np.ndarray | None = None) -> None:
        cs = self.cs
        if self.cipher is not None and (offset % 512 or len(data) % 512):
            offset, data = self._sector_aligned(offset, data)
        end = offset + len(data)
        c0, c1 = offset // cs, -(-end // cs)
        tables = self._tables(c0, c1)
        if sel is not None:
            for t in tables:
                first = t[0] * self.per_l2 + t[3] - c0
                if not sel[first:first + t[4] - t[3]].any():
                    t[2] = "keep"          # nothing selected in this table: leave it alone
        # Per cluster: entries (and bitmaps) gathered from the tables.
        ent, bmp = self._gather(tables)
        g = np.arange(c0, c1, dtype=np.int64)               # guest cluster indices
        lo = np.maximum(g * cs, offset) - g * cs             # touched range inside each cluster
        hi = np.minimum((g + 1) * cs, end) - g * cs
        full = (lo == 0) & (hi == cs)
        comp = (ent & COMPRESSED) != 0
        host = (ent & OFF).astype(np.int64)
        has_host = (host != 0) & ~comp
        if self.img.has_data_file:
            has_host = ((ent & COPIED) != 0) | (host != 0)
        copied = (ent & COPIED) != 0
        inplace = has_host & copied
        zero_flag = ((ent & ZERO) != 0) if not self.ext else np.zeros(len(ent), bool)
        newc = ~inplace
        if not self.img.has_data_file:
            over = inplace if sel is None else inplace & sel
            if over.any():   # data rewritten in place must not land on metadata
                self.meta.refuse_overlap(host[over] >> self.bits)
        # units that need copy-on-write filling from the current guest view
        if self.ext:
            touched = self._touched_bits(lo, hi)
            partial_sub = self._partial_bits(lo, hi)
            abits = bmp & ALL_ALLOC
            keep_old = np.where(has_host & ~inplace, abits, np.uint64(0))
            keep_old = np.where(comp, ALL_ALLOC, keep_old)
            need_fill = ((partial_sub & ~(np.where(inplace, abits, np.uint64(0)))) != 0) | \
                        (newc & ((keep_old & ~touched) != 0))
        else:
            need_fill = ~full & (newc | zero_flag)
        if sel is not None:
            newc &= sel
            need_fill &= sel
        # data file images map guest cluster g to host offset g*cs, unrefcounted
        fill_idx = np.flatnonzero(need_fill)
        fills = {int(k): np.frombuffer(self.chain.read(int(g[k]) * cs, cs), np.uint8).copy()
                 for k in fill_idx}
        # --- allocation
        n_new = int(newc.sum())
        new_tables = [t for t in tables if t[2] in ("new", "cow")]
        self._refuse_unshared(host[newc & has_host & ~copied], new_tables)
        new_host = np.zeros(len(g), np.int64)
        if self.img.has_data_file:
            new_host[newc] = g[newc] * cs
        elif n_new:
            new_host[newc] = self.meta.allocate(n_new) << self.bits
        for t in new_tables:
            t.append(int(self.meta.allocate(1)[0]) << self.bits)
        self._refuse_referenced(tables, np.concatenate(
            [new_host[newc] >> self.bits if not self.img.has_data_file else np.zeros(0, np.int64),
             np.array([t[6] >> self.bits for t in new_tables], np.int64)]))
        # refcounts and guest data are independent of each other: one flush covers both
        self.meta.commit(flush=False)
        # --- guest data
        dest = np.where(newc, new_host, host)
        direct = np.flatnonzero(~need_fill if sel is None else (~need_fill & sel))
        self._write_direct(dest[direct] + lo[direct], (g[direct] * cs + lo[direct]) - offset,
                           hi[direct] - lo[direct], data, offset)
        for k in fill_idx:
            buf = fills[int(k)]
            buf[lo[k]:hi[k]] = data[g[k] * cs + lo[k] - offset:g[k] * cs + hi[k] - offset]
            if self.cipher is not None:
                at = int(g[k]) * cs if self.guest_iv else int(dest[k])
                buf = self.cipher.encrypt(buf, at // 512)
            fileio.pwrite(self.data_fd, buf, int(dest[k]))
        # --- new entries
        new_ent = (dest.astype(np.uint64) | COPIED)
        if self.ext:
            new_bmp = np.where(newc, keep_old, abits) | touched
            zb = (bmp >> np.uint64(32)) & ~new_bmp & np.uint64(0xFFFFFFFF)
            new_bmp = new_bmp | (zb << np.uint64(32))
        if sel is not None:
            new_ent = np.where(sel, new_ent, ent)
            if self.ext:
                new_bmp = np.where(sel, new_bmp, bmp)
        # the data must be on disk before metadata points at it; a write that only
        # overwrites clusters in place changes no metadata and needs no barrier here
        if n_new or new_tables or not np.array_equal(new_ent, ent) or \
                (self.ext and not np.array_equal(new_bmp, bmp)):
            if self.img.has_data_file and self.meta.sync:
                fileio.fsync(self.data_fd)
            self.meta.flush()
        # release list: old host clusters replaced by new ones
        old_release = np.flatnonzero(newc & has_host & ~comp) if not self.img.has_data_file else np.zeros(0, np.int64)
        comp_release = np.flatnonzero(newc & comp)
        self._store(tables, ent_new=new_ent, bmp_new=new_bmp if self.ext else None, c0=c0)
        self._release(host[old_release], ent[comp_release], tables)

    def _touched_bits(self, lo, hi):
        sub = self.sub
        first = lo // sub
        last = (hi - 1) // sub
        return self._bit_range(first, last)

    def _partial_bits(self, lo, hi):
        sub = self.sub
        first = lo // sub
        last = (hi - 1) // sub
        out = np.zeros(len(lo), np.uint64)
        head = lo % sub != 0
        tail = hi % sub != 0
        out |= np.where(head, np.uint64(1) << first.astype(np.uint64), np.uint64(0))
        out |= np.where(tail, np.uint64(1) << last.astype(np.uint64), np.uint64(0))
        return out

    @staticmethod
    def _bit_range(first, last):
        f = first.astype(np.uint64)
        n = (last - first + 1).astype(np.uint64)
        ones = np.where(n >= 64, np.uint64(0xFFFFFFFFFFFFFFFF),
                        (np.uint64(1) << np.minimum(n, np.uint64(63))) - np.uint64(1))
        return (ones << f) & ALL_ALLOC

    def _write_direct(self, hosts, srcs, lens, data, offset: int = 0) -> None:
        """Write data[srcs[i]:srcs[i]+lens[i]] at hosts[i] (offset: the guest offset of
        data[0], which legacy AES numbers its sectors by)."""
        if not len(hosts):
            return
        brk = np.ones(len(hosts), bool)
        brk[1:] = (hosts[1:] != hosts[:-1] + lens[:-1]) | (srcs[1:] != srcs[:-1] + lens[:-1])
        starts = np.flatnonzero(brk)
        ends = np.append(starts[1:], len(hosts))
        big = int(lens.sum()) > 2 * PIECE
        pending = 0
        for s, e in zip(starts.tolist(), ends.tolist()):
            src = int(srcs[s])
            n = int(srcs[e - 1] + lens[e - 1]) - src
            host = int(hosts[s])
            for p in range(0, n, PIECE):
                m = min(PIECE, n - p)
                if self.cipher is not None:
                    at = offset + src + p if self.guest_iv else host + p
                    enc = self.cipher.encrypt(data[src + p:src + p + m], at // 512)
                    fileio.pwrite(self.data_fd, enc, host + p)
                else:
                    write_piece(self.data_fd, host + p, data, src + p, src + p + m)
                pending += m
                if big and pending >= PIECE:
                    # let the device work while we go on: the flush then waits less
                    fileio.start_writeback(self.data_fd)
                    pending = 0

    # ------------------------------------------------------------ zero / discard
    def _zero_units(self, a: int, b: int, *, unmap: bool, discard: bool) -> None:
        """Zero [a, b) (unit aligned, or ending at the disk end) through metadata only."""
        cs = self.cs
        c0, c1 = a // cs, -(-b // cs)
        tables = self._tables(c0, c1)
        ent, _ = self._gather(tables)
        g = np.arange(c0, c1, dtype=np.int64)
        lo = np.maximum(g * cs, a) - g * cs
        hi = np.minimum((g + 1) * cs, b) - g * cs
        last_partial = (g + 1) * cs > self.img.size
        full = (lo == 0) & ((hi == cs) | (last_partial & (g * cs + hi == self.img.size)))
        comp = (ent & COMPRESSED) != 0
        host = (ent & OFF).astype(np.int64)
        has_host = (host != 0) & ~comp
        copied = (ent & COPIED) != 0
        if not self.ext:
            # [a, b) is cluster aligned here (or ends at the disk end): every cluster is whole
            keep = has_host & copied & (not unmap)
            if discard and self.img.version < 3:
                new_ent = np.zeros(len(ent), np.uint64)
            else:
                new_ent = np.where(keep, (host.astype(np.uint64) | COPIED | ZERO), ZERO)
            release_host = host[has_host & ~keep]
            release_comp = ent[comp]
            self._refuse_unshared(host[has_host & ~copied], tables)
            self._new_tables(tables)
            self.meta.commit()
            self._store(tables, ent_new=new_ent, bmp_new=None, c0=c0)
            self._release(release_host, release_comp, tables, punch=discard)
            return
        # extended L2: zero whole subclusters via the bitmap
        bmp = self._gather(tables)[1]
        zbits = self._bit_range(lo // self.sub, (hi - 1) // self.sub)
        all_zero = full
        shared = has_host & ~copied
        # clusters that can be changed through metadata alone
        meta_ok = all_zero | (~comp & ~shared)
        if not meta_ok.all():
            for k in np.flatnonzero(~meta_ok):
                s = int(g[k]) * cs + int(lo[k])
                self._write_data(s, np.zeros(int(hi[k] - lo[k]), np.uint8))
            tables = self._tables(c0, c1)
            ent, bmp = self._gather(tables)
            comp = (ent & COMPRESSED) != 0
            host = (ent & OFF).astype(np.int64)
            has_host = (host != 0) & ~comp
            copied = (ent & COPIED) != 0
        drop = all_zero & meta_ok & (unmap | discard | comp | (has_host & ~copied) | ~has_host)
        new_ent = np.where(drop, np.uint64(0), ent)
        new_bmp = np.where(drop, ALL_ZERO,
                           np.where(meta_ok, (bmp & ~zbits) | (zbits << np.uint64(32)), bmp))
        release_host = host[drop & has_host]
        release_comp = ent[drop & comp]
        self._refuse_unshared(host[drop & has_host & ~copied], tables)
        self._new_tables(tables)
        self.meta.commit()
        self._store(tables, ent_new=new_ent, bmp_new=new_bmp, c0=c0)
        self._release(release_host, release_comp, tables, punch=discard)

    # ------------------------------------------------------------ metadata stores
    def _store(self, tables, *, ent_new, bmp_new, c0: int) -> None:
        """Write the L2 tables (new ones first written whole), then the L1 entries."""
        img = self.img
        pos = 0
        wrote = False
        for t in tables:
            table, state, a, b = t[1], t[2], t[3], t[4]
            n = b - a
            if state == "keep":
                pos += n
                continue
            if self.ext:
                table[2 * a:2 * b:2] = ent_new[pos:pos + n]
                table[2 * a + 1:2 * b:2] = bmp_new[pos:pos + n]
            else:
                table[a:b] = ent_new[pos:pos + n]
            pos += n
            if state == "own":
                cached = img.cached_l2(t[5])
                if cached is not None and np.array_equal(cached, table):
                    continue           # nothing changed in this table (in-place data write)
                self.meta.write_l2(t[5], table)
                wrote = True
            else:
                self.meta.write_l2(t[6], table)
                wrote = True
        changed = [t[0] for t in tables if t[2] in ("new", "cow")]
        if wrote:
            if changed:
                self.meta.flush()              # a new table is on disk before L1 points to it
            else:
                self.meta.unflushed = True     # a barrier is owed before anything depends on it
        if changed:
            self.meta.set_l1_entries(changed, [np.uint64(t[6]) | COPIED for t in tables
                                               if t[2] in ("new", "cow")])
            self.meta.unflushed = True
        import os
        img.file_size = max(img.file_size, os.fstat(img.fd).st_size)

    def _release(self, hosts, comp_entries, tables, punch: bool = False) -> None:
        """Drop the references replaced by this request (after they are gone from disk)."""
        rel = []
        if len(hosts):
            rel.append(np.asarray(hosts, np.int64) >> self.bits)
        if len(comp_entries):
            rel.append(E.referenced_clusters(comp_entries, self.bits))
        for t in tables:
            if t[2] == "cow":
                rel.append(np.array([t[5] >> self.bits], np.int64))
        if not rel:
            return
        self.meta.barrier()        # the new entries are on disk before any reference goes
        clusters = np.concatenate(rel)
        # a compressed cluster range may be shared by several entries: count each
        uniq, counts = np.unique(clusters, return_counts=True)
        for c in range(1, int(counts.max()) + 1):
            self.meta.free(uniq[counts >= c])
        self.meta.commit()
        if punch:
            freed = uniq[self.meta.get(uniq) == 0]
            for c in freed.tolist():
                try:
                    fileio.fallocate(self.img.fd, fileio.FALLOC_FL_PUNCH_HOLE | fileio.FALLOC_FL_KEEP_SIZE,
                                     c << self.bits, self.cs)
                except OSError:
                    break
