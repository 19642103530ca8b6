"""`compare`: guest-visible comparison of two chains with qemu-img compare's semantics."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CorruptImageError
from ..format import entries as E
from .view import window_bounds

CHUNK = 16 << 20


@dataclass
class CompareResult:
    identical: bool
    messages: list
    mismatch_offset: int | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.identical else 1


def _status(ex):
    k = ex.kinds
    present = E.ALLOCATED_KINDS[k]
    zero = E.ZERO_KINDS[k] | ~present
    return present, zero, E.DATA_KINDS[k], E.OFFSET_KINDS[k]


def _segments(a, b):
    """Common segmentation of two Extents covering the same window."""
    bounds = np.unique(np.concatenate([a.starts, b.starts, a.ends[-1:], b.ends[-1:]]))
    ss, se = bounds[:-1], bounds[1:]
    ia = np.searchsorted(a.starts, ss, "right") - 1
    ib = np.searchsorted(b.starts, ss, "right") - 1
    return ss, se, ia, ib


def _first_diff(x: np.ndarray, y: np.ndarray) -> int | None:
    ne = np.flatnonzero(x != y)
    return int(ne[0]) if len(ne) else None


def _first_nonzero(chain, start: int, end: int) -> int | None:
    for ex in chain.iter_extents(start, end):
        present, zero, _, _ = _status(ex)
        cand = np.flatnonzero(~zero)
        for i in cand:
            s, e = int(ex.starts[i]), int(ex.ends[i])
            for c in range(s, e, CHUNK):
                ce = min(c + CHUNK, e)
                buf = np.frombuffer(chain.read(c, ce - c), np.uint8)
                nz = np.flatnonzero(buf)
                if len(nz):
                    return c + int(nz[0])
    return None


def compare_chains(c1, c2, strict: bool = False) -> CompareResult:
    """Compare the guest views; the first differing 512-byte sector is reported."""
    s1, s2 = c1.size, c2.size
    if strict and s1 != s2:
        return CompareResult(False, ["Strict mode: Image size mismatch!"])
    common = min(s1, s2)
    for w, we in window_bounds([c1, c2], 0, common):
        a = c1._window(w, we)
        b = c2._window(w, we)
        for c, x in ((c1, a), (c2, b)):
            if (x.kinds == E.INVALID).any():
                # qemu-img compare: block status fails before any data is read (exit 3)
                err = CorruptImageError("Sector allocation test failed for %s" % c.top.path)
                err.exit_code = 3
                raise err
        ss, se, ia, ib = _segments(a, b)
        pa, za, da, oa = _status(a)
        pb, zb, db, ob = _status(b)
        limit = len(ss)
        status_off = None
        if strict:
            bad = np.flatnonzero((pa[ia] != pb[ib]) | (za[ia] != zb[ib]) | (da[ia] != db[ib])
                                 | (oa[ia] != ob[ib]))
            if len(bad):
                limit = int(bad[0])
                status_off = int(ss[limit])
        need = ~(za[ia] & zb[ib])
        need[limit:] = False
        idx = np.flatnonzero(need)
        # compare the needed segments in chunks
        i = 0
        while i < len(idx):
            cs = int(ss[idx[i]])
            ce = min(int(se[idx[i]]), cs + CHUNK)
            j = i + 1
            while j < len(idx) and int(se[idx[j]]) - cs <= CHUNK and int(ss[idx[j]]) == int(se[idx[j - 1]]):
                ce = int(se[idx[j]])
                j += 1
            x = np.frombuffer(c1.read(cs, ce - cs), np.uint8)
            y = np.frombuffer(c2.read(cs, ce - cs), np.uint8)
            d = _first_diff(x, y)
            if d is not None:
                off = (cs + d) // 512 * 512
                return CompareResult(False, ["Content mismatch at offset %d!" % off], off)
            if ce < int(se[idx[i]]):
                # the segment was longer than one chunk: continue inside it
                ss = ss.copy()
                ss[idx[i]] = ce
                continue
            i = j
        if status_off is not None:
            return CompareResult(False, ["Strict mode: Offset %d block status mismatch!" % status_off],
                                 status_off)
    msgs = []
    if s1 != s2:
        msgs.append("Warning: Image size mismatch!")
        longer = c1 if s1 > s2 else c2
        nz = _first_nonzero(longer, common, max(s1, s2))
        if nz is not None:
            off = nz // 512 * 512
            msgs.append("Content mismatch at offset %d!" % off)
            return CompareResult(False, msgs, off)
    msgs.append("Images are identical.")
    return CompareResult(True, msgs)
