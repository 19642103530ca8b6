"""The guest view of one layer (qcow2 or raw): block status as runs, and reading.

A *run* is a maximal range of guest bytes with one kind (see format.entries) and, for kinds
with a host address, contiguous host offsets.  Runs are numpy arrays (starts, kinds, hosts)
plus an end, so that whole tables are classified with vectorised operations.
"""
from __future__ import annotations

import os
try:                            # Intel ISA-L's inflate: the same raw deflate, 3-4x faster
    from isal import isal_zlib as zlib
except ImportError:             # pragma: no cover - isal is a declared dependency
    import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptImageError, UnsupportedFeatureError
from ..format import constants as C
from ..format import entries as E
from ..image.qcow2 import Qcow2Image, pread_full


@dataclass
class Runs:
    starts: np.ndarray      # int64, first guest byte of each run
    kinds: np.ndarray       # uint8
    hosts: np.ndarray       # int64 host offset at the run start (or compressed descriptor)
    end: int                # guest byte just past the last run

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.append(self.starts, self.end))

    def __len__(self) -> int:
        return len(self.starts)


def rle(kinds: np.ndarray, hosts: np.ndarray, unit: int, first: int):
    """Group per-unit (kind, host) arrays into runs.  Returns (starts, kinds, hosts)."""
    n = len(kinds)
    if n == 0:
        return (np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64))
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    k0, k1 = kinds[:-1], kinds[1:]
    h0, h1 = hosts[:-1], hosts[1:]
    offset_kind = E.OFFSET_KINDS[k1]
    brk[1:] = (k0 != k1) | (offset_kind & (h1 != h0 + unit)) | ((k1 == E.COMPRESSED) & (h1 != h0))
    idx = np.flatnonzero(brk)
    return (first + idx.astype(np.int64) * unit, kinds[idx], hosts[idx])


def pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Read len(out) bytes at offset straight into out; past the end of the file: zeros."""
    mv = memoryview(out).cast("B")
    done = 0
    n = len(mv)
    while done < n:
        got = os.preadv(fd, [mv[done:done + (1 << 30)]], offset + done)
        if got <= 0:
            mv[done:] = bytes(n - done)
            return
        done += got


class Layer:
    """Common interface of one image in a chain."""
    path: str
    format: str
    size: int

    def runs(self, start: int, end: int) -> Runs:  # pragma: no cover - interface
        raise NotImplementedError

    def read_runs_into(self, out: np.ndarray, base: int, runs: Runs, select) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def clip_runs(starts, kinds, hosts, start: int, end: int) -> Runs:
    """Cut unit-aligned runs to [start, end); the first run's host offset is shifted."""
    i = int(np.searchsorted(starts, start, "right")) - 1
    if i > 0:
        starts, kinds, hosts = starts[i:], kinds[i:], hosts[i:]
    if len(starts) and starts[0] < start:
        delta = start - int(starts[0])
        starts = starts.copy()
        hosts = hosts.copy()
        if E.OFFSET_KINDS[kinds[0]]:
            hosts[0] += delta
        starts[0] = start
    return Runs(starts, kinds, hosts, end)


class Qcow2Layer(Layer):
    format = "qcow2"

    def __init__(self, image: Qcow2Image, snapshot=None):
        self.image = image
        self.path = image.path
        self._prealloc = None
        self._snap_l1 = None
        if snapshot is not None:
            # a read-only view of an internal snapshot: its own L1 table, seen at the
            # image's current size (as qemu-img convert -l shows it)
            self._snap_l1 = image.read_l1(snapshot.l1_table_offset, snapshot.l1_size)

    @property
    def file(self) -> Qcow2Image:
        return self.image

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def l1(self):
        return self._snap_l1 if self._snap_l1 is not None else self.image.l1_table

    def close(self) -> None:
        self.image.close()

    def runs(self, start: int, end: int) -> Runs:
        img = self.image
        if end <= start:
            return Runs(np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64), start)
        cs = img.cluster_size
        unit = img.subcluster_size
        c0 = start // cs
        c1 = -(-end // cs)
        per_l2 = img.l2_entries
        l1 = self.l1
        words = 2 if img.extended_l2 else 1
        # Gather the L2 entries of [c0, c1) into one array (zeros where no L2 table), then
        # classify and group them in one vectorised pass.
        n = c1 - c0
        ent = None
        i0 = c0 // per_l2
        i1 = (c1 - 1) // per_l2
        hi_i = min(i1, len(l1) - 1)
        present = (np.flatnonzero(np.asarray(l1[i0:hi_i + 1], np.uint64)
                                  & np.uint64(C.L1E_OFFSET_MASK)) + i0).tolist() \
            if hi_i >= i0 else []
        for i in present:                  # only the L1 entries that hold a table
            l2off = int(l1[i]) & C.L1E_OFFSET_MASK
            if l2off % cs:
                raise CorruptImageError("L2 table offset %#x unaligned (L1 index: %#x)" % (l2off, i))
            a = max(c0, i * per_l2) - i * per_l2
            b = min(c1, (i + 1) * per_l2) - i * per_l2
            if ent is None:
                ent = np.zeros(n * words, np.uint64)
            dst = (i * per_l2 + a - c0) * words
            ent[dst:dst + (b - a) * words] = img.read_l2(l2off)[a * words:b * words]
        if ent is None:
            s = np.array([c0 * cs], np.int64)
            k = np.array([E.UNALLOC_PLAIN], np.uint8)
            h = np.zeros(1, np.int64)
        else:
            if img.extended_l2:
                kk, hh = E.classify_extended_l2(ent, img.has_data_file, unit)
            else:
                kk, hh = E.classify_standard_l2(ent, img.has_data_file, cs)
            s, k, h = rle(kk, hh, unit, c0 * cs)
        # clip the last run implicitly through end; clip the first explicitly
        keep = s < end
        s, k, h = s[keep], k[keep], h[keep]
        if self.metadata_preallocated:
            s, k, h = self._mark_file_holes(s, k, h, end)
        return clip_runs(s, k, h, start, end)

    # QEMU's block status reports data clusters that sit in holes of the image file as both
    # data and zero when the image looks metadata-preallocated (more clusters referenced
    # than the file really allocates).
    @property
    def metadata_preallocated(self) -> bool:
        if self._prealloc is None:
            img = self.image
            if img.has_data_file:
                self._prealloc = False
            else:
                real = img.allocated_size // img.cluster_size
                threshold = max(real * 10 // 9, real + 2)
                used = int(np.count_nonzero(img.refcounts_all()[:img.file_clusters]))
                self._prealloc = used >= threshold
        return self._prealloc

    def _mark_file_holes(self, s, k, h, end):
        img = self.image
        normal = np.flatnonzero(k == E.NORMAL)
        if not len(normal):
            return s, k, h
        lens = np.diff(np.append(s, end))
        lo = int(h[normal].min())
        hi = int((h[normal] + lens[normal]).max())
        data = file_data_extents(img.fd, lo, hi, img.file_size)
        if len(data) == 1 and data[0][0] <= lo and data[0][1] >= hi:
            return s, k, h
        # Split NORMAL runs at host hole/data borders.
        dstart = np.array([d[0] for d in data], np.int64)
        dend = np.array([d[1] for d in data], np.int64)
        borders = np.unique(np.concatenate([dstart, dend]))
        out_s, out_k, out_h = [], [], []
        for i in range(len(s)):
            if k[i] != E.NORMAL:
                out_s.append(s[i]); out_k.append(k[i]); out_h.append(h[i])
                continue
            hs, he = int(h[i]), int(h[i] + lens[i])
            inner = borders[(borders > hs) & (borders < he)]
            cuts = np.concatenate([[hs], inner])
            if len(dstart):
                j = np.searchsorted(dstart, cuts, "right") - 1
                in_data = (j >= 0) & (cuts < dend[np.maximum(j, 0)])
            else:
                in_data = np.zeros(len(cuts), bool)
            for c, dflag in zip(cuts, in_data):
                out_s.append(int(s[i]) + int(c) - hs)
                out_k.append(E.NORMAL if dflag else E.DATA_ZERO)
                out_h.append(int(c))
        return (np.array(out_s, np.int64), np.array(out_k, np.uint8), np.array(out_h, np.int64))

    # ---------------------------------------------------------------- reading
    def read_data(self, host: int, length: int, guest: int | None = None) -> bytes:
        img = self.image
        if img.encrypted:
            out = np.empty(length, np.uint8)
            self.read_data_into(out, host, guest)
            return out.tobytes()
        return pread_full(img.data_fd_for_read(), length, host)

    def data_fd(self) -> int | None:
        """The fd whose bytes at a NORMAL extent's host offset are the guest data (None when
        they are encrypted)."""
        return None if self.image.encrypted else self.image.data_fd_for_read()

    def read_data_into(self, out: np.ndarray, host: int, guest: int | None = None) -> None:
        """Fill out with the guest data at host offset host (guest: the guest offset it
        maps, which legacy AES encryption numbers its sectors by)."""
        img = self.image
        if img.encrypted:
            cipher = getattr(img, "cipher", None)
            if cipher is None:
                raise UnsupportedFeatureError("'%s' is encrypted and was not unlocked" % img.path)
            # whole sectors, decrypted in large passes; the sector number is the host
            # offset / 512 (LUKS in qcow2) or the guest offset / 512 (legacy AES: host and
            # guest offsets agree modulo the cluster size, so the sectors line up)
            shift = 0
            if getattr(cipher, "guest_iv", False):
                if guest is None:
                    raise ValueError("legacy AES data needs its guest offset to be read")
                shift = guest - host
            n = len(out)
            step = 32 << 20
            for p in range(0, n, step):
                m = min(step, n - p)
                a = (host + p) // 512 * 512
                b = -(-(host + p + m) // 512) * 512
                raw = np.empty(b - a, np.uint8)
                pread_into(img.data_fd_for_read(), raw, a)
                plain = cipher.decrypt(raw, (a + shift) // 512)
                out[p:p + m] = plain[host + p - a:host + p - a + m]
            return
        pread_into(img.data_fd_for_read(), out, host)

    def read_compressed(self, desc: int, raw=None) -> bytes:
        """Decompress one compressed cluster (raw deflate or zstd) to cluster_size bytes.
        raw, when given, holds the compressed bytes already read."""
        img = self.image
        off, size = E.compressed_extent(desc, img.cluster_bits)
        off, size = int(off), int(size)
        buf = pread_full(img.fd, size, off) if raw is None else raw
        cs = img.cluster_size
        try:
            if img.header.compression_type == C.COMPRESSION_ZSTD:
                import zstandard
                d = zstandard.ZstdDecompressor().decompressobj()
                out = d.decompress(bytes(buf))
            else:
                out = zlib.decompress(buf, -15, cs)     # trailing sector padding is ignored
        except Exception:
            raise CorruptImageError("Could not decompress cluster at host offset %#x" % off) from None
        if len(out) < cs:
            raise CorruptImageError("Compressed cluster at host offset %#x is truncated" % off)
        return out[:cs] if len(out) > cs else out

    def read_compressed_many(self, descs):
        """Decompress several clusters; their compressed bytes are read with few large preads
        when they lie close together (as converted images store them)."""
        img = self.image
        offs, sizes = E.compressed_extent(np.asarray(descs, np.uint64), img.cluster_bits)
        lo = int(offs.min())
        hi = int((offs + sizes).max())
        if hi - lo <= 2 * int(sizes.sum()) + (1 << 20):
            span = memoryview(pread_full(img.fd, hi - lo, lo))
            return [self.read_compressed(int(d), span[int(o) - lo:int(o) - lo + int(z)])
                    for d, o, z in zip(descs, offs.tolist(), sizes.tolist())]
        return [self.read_compressed(int(d)) for d in descs]


class RawLayer(Layer):
    format = "raw"

    def __init__(self, f):
        self.file = f
        self.path = f.path
        self.allocated_size = f.allocated_size

    @property
    def size(self) -> int:
        return self.file.size

    @property
    def file_size(self) -> int:
        return self.file.file_size

    @property
    def fd(self) -> int:
        return self.file.fd

    @property
    def writable(self) -> bool:
        return self.file.writable

    def close(self) -> None:
        self.file.close()

    def runs(self, start: int, end: int) -> Runs:
        ext = file_data_extents(self.fd, start, min(end, self.file_size), self.file_size)
        s, k = [], []
        pos = start
        for ds, de in ext:
            if ds > pos:
                s.append(pos); k.append(E.ZERO_ALLOC)
            s.append(ds); k.append(E.NORMAL)
            pos = de
        if pos < end:
            if k and k[-1] == E.NORMAL and pos >= self.file_size and pos - self.file_size < 512 \
                    and self.file_size % 512:
                pass  # the partial last sector belongs to the data before it
            else:
                s.append(pos); k.append(E.ZERO_ALLOC)
        starts = np.array(s, np.int64)
        return Runs(starts, np.array(k, np.uint8), starts.copy(), end)

    def read_data(self, host: int, length: int, guest: int | None = None) -> bytes:
        return pread_full(self.fd, length, host)

    def data_fd(self) -> int | None:
        return self.fd

    def read_data_into(self, out: np.ndarray, host: int, guest: int | None = None) -> None:
        pread_into(self.fd, out, host)

    # guest writes on a raw layer are plain file writes
    def write(self, offset: int, data) -> None:
        """Write data (bytes-like, or a source: see sources.py) at offset."""
        self.write_clusters(offset, data, None)

    def write_clusters(self, offset: int, data, sel) -> None:
        """Write the selected 64 KiB units of data at offset (all of it when sel is None),
        in pieces of at most sources.CHUNK."""
        from .sources import CHUNK, as_data, write_piece
        g = 64 << 10
        buf = as_data(data)
        self._check(offset, len(buf))
        if sel is None:
            runs = [(0, len(buf))]
        else:
            idx = np.flatnonzero(sel)
            brk = np.flatnonzero(np.diff(idx) != 1) + 1
            runs = [(int(grp[0]) * g, min((int(grp[-1]) + 1) * g, len(buf)))
                    for grp in np.split(idx, brk) if len(grp)]
        for a, b in runs:
            for p in range(a, b, CHUNK):
                write_piece(self.fd, offset + p, buf, p, min(p + CHUNK, b))

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        from ..host import fileio
        self._check(offset, length)
        try:
            fileio.fallocate(self.fd, 0x10, offset, length)    # FALLOC_FL_ZERO_RANGE
        except OSError as e:
            import errno
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            step = 16 << 20
            for p in range(offset, offset + length, step):
                fileio.pwrite(self.fd, bytes(min(step, offset + length - p)), p)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def _check(self, offset: int, length: int) -> None:
        if not self.writable:
            raise ValueError("'%s' is opened read-only" % self.path)
        if offset < 0 or offset + length > self.size:
            raise ValueError("request outside the disk")


def file_data_extents(fd: int, start: int, end: int, file_size: int) -> list:
    """Data extents [(s, e)] of a file within [start, end) from SEEK_DATA/SEEK_HOLE."""
    out = []
    pos = start
    end = min(end, file_size)
    while pos < end:
        try:
            ds = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        if ds >= end:
            break
        try:
            de = os.lseek(fd, ds, os.SEEK_HOLE)
        except OSError:
            de = end
        de = min(de, end)
        out.append((ds, de))
        pos = de
    return out
