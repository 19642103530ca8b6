"""Data sources for large writes: objects that stand for the bytes of a write request
without holding them all in memory.

A source has ``is_source = True``, a length, and serves slices ``src[a:b]`` of at most its
chunk size as uint8 arrays (valid until the next slice is taken); ``part(a, b)`` is the
source of bytes [a, b).  The write path (GuestWriter, raw layers) takes slices as it
writes, so a 1 GiB write moves through a buffer of a few MiB.  A source may also offer
``copy_to(fd, offset, a, b)``: write its bytes [a, b) at offset of fd itself (in-kernel
copies), returning False when it cannot.
"""
from __future__ import annotations

import bisect

import numpy as np

from ..host import fileio
from ..format import entries as E

CHUNK = 8 << 20     # the largest slice a source serves, and the largest single write


def as_data(data):
    """data as the write path takes it: a source as it is, anything else as uint8 array."""
    if getattr(data, "is_source", False):
        return data
    return np.frombuffer(memoryview(data).cast("B"), np.uint8)


def write_piece(fd: int, offset: int, data, a: int, b: int) -> None:
    """Write data[a:b] (at most CHUNK bytes) at offset of fd: with the source's in-kernel
    copy when it has one that works here, else from the bytes."""
    copy = getattr(data, "copy_to", None)
    if copy is None or not copy(fd, offset, a, b):
        fileio.pwrite(fd, data[a:b], offset)


class PatternSource:
    """length bytes that all have one value (qemu-io's write -P)."""
    is_source = True

    def __init__(self, byte: int, length: int, chunk: int = CHUNK, _buf=None):
        self.byte, self.length = byte, length
        self.buf = _buf if _buf is not None else np.full(min(chunk, max(length, 1)), byte, np.uint8)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b = sl.start or 0, min(sl.stop, self.length)
        if b - a > len(self.buf):
            raise ValueError("slice of %d bytes exceeds the source's chunk" % (b - a))
        return self.buf[:max(b - a, 0)]

    def part(self, a: int, b: int) -> "PatternSource":
        return PatternSource(self.byte, min(b, self.length) - a, _buf=self.buf)


class ViewSource:
    """The guest bytes of a chain over [offset, offset+length), served slice by slice
    (src[a:b], at most `chunk` bytes) through one small buffer that is reused: a data source
    for write_clusters that reads as the writer consumes, with the block status resolved
    once up front.  A slice stays valid until the next one is taken."""
    is_source = True

    def __init__(self, chain, offset: int, length: int, chunk: int = CHUNK,
                 on_read=None, extents=None):
        self.chain, self.offset, self.length = chain, offset, length
        end = min(offset + length, chain.size)
        if extents is None and end > offset:
            extents = chain.extents(offset, end)
        self.extents = ex = extents
        if ex is not None:
            # plain lists: a slice usually meets a handful of extents, walked directly
            self._s, self._e = ex.starts.tolist(), ex.ends.tolist()
            self._k, self._d, self._h = ex.kinds.tolist(), ex.depth.tolist(), ex.hosts.tolist()
        self.buf = np.empty(min(chunk, max(length, 1)), np.uint8)
        self.on_read = on_read
        self.no_copy = False
        self.zero_buf = None

    def __len__(self) -> int:
        return self.length

    def part(self, a: int, b: int) -> "ViewSource":
        return ViewSource(self.chain, self.offset + a, min(b, self.length) - a,
                          len(self.buf), self.on_read, self.extents)

    def _simple(self, lo: int, hi: int):
        """Indices of the extents under [lo, hi) when they are few and all plain data or
        zeros (else None: the general path reads them)."""
        i0 = bisect.bisect_right(self._e, lo)
        i1 = bisect.bisect_left(self._s, hi)
        if i1 - i0 > 16:
            return None
        for i in range(i0, i1):
            if self._k[i] == E.COMPRESSED or self._k[i] == E.INVALID:
                return None
        return range(i0, i1)

    def copy_to(self, fd: int, offset: int, a: int, b: int) -> bool:
        """Write the slice [a, b) at offset of fd with in-kernel copies from the layers'
        files (zeros written as zeros); False when that is not possible here (the caller
        then writes self[a:b])."""
        if self.no_copy or self.extents is None:
            return False
        lo, hi = self.offset + a, self.offset + min(b, self.length)
        idx = self._simple(lo, hi) if hi <= self.chain.size else None
        if idx is None:
            return False
        layers = self.chain.layers
        fds = [layers[self._d[i]].data_fd() if self._k[i] == E.NORMAL else -1 for i in idx]
        if None in fds:
            return False
        try:
            for i, src in zip(idx, fds):
                s, e = max(self._s[i], lo), min(self._e[i], hi)
                if src >= 0:
                    fileio.copy_range(fd, offset + s - lo, src, self._h[i] + s - self._s[i], e - s)
                else:
                    fileio.pwrite(fd, self._zeros(e - s), offset + s - lo)
        except OSError as err:
            if err.errno not in fileio.COPY_UNSUPPORTED:
                raise
            self.no_copy = True
            return False
        if self.on_read:
            self.on_read(hi - lo)
        return True

    def _zeros(self, n: int):
        if self.zero_buf is None or len(self.zero_buf) < n:
            self.zero_buf = bytes(max(n, len(self.buf)))
        return memoryview(self.zero_buf)[:n]

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b = sl.start or 0, min(sl.stop, self.length)
        if b - a > len(self.buf):
            raise ValueError("slice of %d bytes exceeds the source's chunk" % (b - a))
        out = self.buf[:b - a]
        lo, hi = self.offset + a, self.offset + b
        if self.extents is None:
            out[:] = 0
        else:
            idx = self._simple(lo, hi)
            if idx is None:
                self.chain.read_ranges_into(out, lo, [lo], [hi], extents=self.extents)
            else:
                if hi > self.chain.size:
                    out[max(self.chain.size, lo) - lo:] = 0
                layers = self.chain.layers
                for i in idx:
                    s, e = max(self._s[i], lo), min(self._e[i], hi)
                    if self._k[i] == E.NORMAL:
                        layers[self._d[i]].read_data_into(out[s - lo:e - lo],
                                                          self._h[i] + s - self._s[i], s)
                    else:
                        out[s - lo:e - lo] = 0
        if self.on_read:
            self.on_read(b - a)
        return out
