"""`map`: merged block-status extents of a chain, as qemu-img map reports them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CorruptImageError
from ..format import entries as E


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str


def _flags(chain, ex):
    k = ex.kinds
    if (k == E.INVALID).any():
        i = int(np.flatnonzero(k == E.INVALID)[0])
        raise CorruptImageError("Invalid L2 entry for guest offset %#x" % int(ex.starts[i]))
    present = E.ALLOCATED_KINDS[k]
    zero = E.ZERO_KINDS[k] | ~present
    data = E.DATA_KINDS[k]
    has_off = E.OFFSET_KINDS[k].copy()
    for d, layer in enumerate(chain.layers):
        img = getattr(layer, "image", None)
        if img is not None and img.encrypted:
            has_off[ex.depth == d] = False
    return present, zero, data, has_off


def map_batches(chain, start: int = 0, length: int | None = None):
    """Yield merged map entries in batches of numpy arrays:
    (starts, lengths, depth, present, zero, data, has_offset, offset)."""
    end = chain.size if length is None else min(chain.size, start + length)
    carry = None
    for ex in chain.iter_extents(start, end):
        if not len(ex):
            continue
        present, zero, data, has_off = _flags(chain, ex)
        lens = ex.ends - ex.starts
        hosts = np.where(has_off, ex.hosts, 0)
        brk = np.ones(len(ex), bool)
        brk[1:] = ((ex.depth[1:] != ex.depth[:-1]) | (present[1:] != present[:-1])
                   | (zero[1:] != zero[:-1]) | (data[1:] != data[:-1])
                   | (has_off[1:] != has_off[:-1])
                   | (has_off[1:] & (hosts[1:] != hosts[:-1] + lens[:-1])))
        idx = np.flatnonzero(brk)
        ends = np.append(ex.starts[idx[1:]], ex.ends[-1])
        b = [ex.starts[idx], ends - ex.starts[idx], ex.depth[idx], present[idx], zero[idx],
             data[idx], has_off[idx], hosts[idx]]
        if carry is not None:
            if _mergeable_arr(carry, b):
                b[1] = b[1].copy()
                b[1][0] += carry[1][0]
                b[0] = b[0].copy()
                b[0][0] = carry[0][0]
                b[7] = b[7].copy()
                b[7][0] = carry[7][0]
            else:
                b = [np.concatenate([c, x]) for c, x in zip(carry, b)]
        if len(b[0]) > 1:
            yield [x[:-1] for x in b]
        carry = [x[-1:] for x in b]
    if carry is None:
        z = np.zeros(1, np.int64)
        f = np.zeros(1, bool)
        yield [np.array([start]), z, z, f, f, f, f, z]
    else:
        yield carry


def _mergeable_arr(a, b) -> bool:
    if any(a[i][0] != b[i][0] for i in (2, 3, 4, 5, 6)):
        return False
    return not a[6][0] or a[7][0] + a[1][0] == b[7][0]


def map_entries(chain, start: int = 0, length: int | None = None):
    """Yield MapEntry objects for [start, start+length), merged as qemu-img merges them."""
    for b in map_batches(chain, start, length):
        for s, n, d, p, z, dt, h, o in zip(*(x.tolist() for x in b)):
            yield MapEntry(s, n, d, p, z, dt, o if h else None, _layer_file(chain, d))


def json_lines(batch) -> list:
    """The qemu-img map --output=json lines of one batch (without separators)."""
    s, n, d, p, z, dt, h, o = batch
    code = (d.astype(np.int64) << 4) | (p.astype(np.int64) << 3) | (z.astype(np.int64) << 2) \
        | (dt.astype(np.int64) << 1) | h.astype(np.int64)
    uniq, inv = np.unique(code, return_inverse=True)
    mids = np.array([', "depth": %d, "present": %s, "zero": %s, "data": %s%s'
                     % (c >> 4, _b(c >> 3 & 1), _b(c >> 2 & 1), _b(c >> 1 & 1),
                        ', "offset": ' if c & 1 else "") for c in uniq.tolist()], dtype=object)
    tails = np.where(h, o, -1).tolist()
    return ['{ "start": %d, "length": %d%s%s}' % (a, b_, m, t if t >= 0 else "")
            for a, b_, m, t in zip(s.tolist(), n.tolist(), mids[inv].tolist(), tails)]


def _layer_file(chain, depth: int) -> str:
    layer = chain.layers[depth]
    img = getattr(layer, "image", None)
    if img is not None and img.has_data_file:
        return img.data_file_path()
    return layer.path


def _mergeable(a: MapEntry, b: MapEntry) -> bool:
    if (a.depth, a.present, a.zero, a.data) != (b.depth, b.present, b.zero, b.data):
        return False
    if (a.offset is None) != (b.offset is None):
        return False
    return a.offset is None or a.offset + a.length == b.offset


def entry_json(e: MapEntry) -> str:
    s = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s'
         % (e.start, e.length, e.depth, _b(e.present), _b(e.zero), _b(e.data)))
    if e.offset is not None:
        s += ', "offset": %d' % e.offset
    return s + "}"


def _b(v: bool) -> str:
    return "true" if v else "false"


def entry_human(e: MapEntry) -> str | None:
    if e.data and e.offset is None:
        raise CorruptImageError("File contains external, encrypted or compressed clusters.")
    if e.data and not e.zero:
        return "%-16s%-16s%-16s%s" % (_hex(e.start), _hex(e.length), _hex(e.offset), e.filename)
    return None


def _hex(v: int) -> str:
    return "%#x" % v if v else "0"
