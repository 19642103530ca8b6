"""`map`: merged block-status extents of a chain, as qemu-img map reports them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CorruptImageError
from .format import entries as E


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


def map_entries(chain, start: int = 0, length: int | None = None):
    """Yield MapEntry objects for [start, start+length), merged as qemu-img merges them."""
    end = chain.size if length is None else min(chain.size, start + length)
    pending = None
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
        for j, i in enumerate(idx):
            e = MapEntry(int(ex.starts[i]), int(ends[j] - ex.starts[i]), int(ex.depth[i]),
                         bool(present[i]), bool(zero[i]), bool(data[i]),
                         int(hosts[i]) if has_off[i] else None,
                         _layer_file(chain, int(ex.depth[i])))
            if pending is not None and _mergeable(pending, e):
                pending.length += e.length
                continue
            if pending is not None:
                yield pending
            pending = e
    if pending is None:
        yield MapEntry(start, 0, 0, False, False, False, None, chain.top.path)
    else:
        yield pending


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
