"""Backing chains: opening and resolving them, block status and reads through all layers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..blockdev.layers import Layer, Qcow2Layer, RawLayer
from ..errors import CorruptImageError, InvalidImageError, Qcow2Error, SnapshotError
from ..format import constants as C
from ..format import entries as E

from ..image.raw import RawFile
from .session import close_all


SMALL_READ = 1 << 20        # reads up to this size try Chain._read_small first


def _as_layer(f) -> Layer:
    return RawLayer(f) if isinstance(f, RawFile) else Qcow2Layer(f)


@dataclass
class Extents:
    """Resolved guest ranges of a chain: each with the depth of the layer that answers it."""
    starts: np.ndarray
    ends: np.ndarray
    depth: np.ndarray
    kinds: np.ndarray
    hosts: np.ndarray

    def __len__(self):
        return len(self.starts)


class Chain:
    """A resolved backing chain, top first.  Read-only guest view and block status."""

    owns_session = False

    def __init__(self, layers: list, warnings: list | None = None, session=None):
        self.layers = layers
        self.warnings = warnings or []
        self.session = session

    @property
    def top(self) -> Layer:
        return self.layers[0]

    @property
    def size(self) -> int:
        return self.layers[0].size

    def close(self) -> None:
        """Close every layer (a layer open for writing is flushed first); the first error
        is raised once all of them are closed."""
        layers, self.layers = self.layers, []
        session = self.session
        closers = [(lambda l=layer: session.release(l.file)) if session is not None else layer.close
                   for layer in layers]
        if self.owns_session:
            closers.append(session.close)
        close_all(closers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ block status
    def window_size(self) -> int:
        unit = min(getattr(getattr(l, "image", None), "subcluster_size", 65536) for l in self.layers)
        return max(unit << 18, 64 << 20)

    def extents(self, start: int = 0, end: int | None = None) -> Extents:
        """Block status of [start, end) through the whole chain (see qemu-img map's model)."""
        if end is None:
            end = self.size
        end = min(end, self.size)
        parts = list(self.iter_extents(start, end))
        if not parts:
            z = np.zeros(0, np.int64)
            return Extents(z, z, z.astype(np.int32), z.astype(np.uint8), z)
        if len(parts) == 1:
            return parts[0]
        return Extents(*(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("starts", "ends", "depth", "kinds", "hosts")))

    def iter_extents(self, start: int = 0, end: int | None = None):
        """Yield Extents window by window (bounded memory on huge images)."""
        if end is None:
            end = self.size
        end = min(end, self.size)
        for w, we in window_bounds([self], start, end):
            yield self._window(w, we)

    def _l1_spans(self, layer):
        """(starts, ends) of the guest ranges whose L1 entry holds an L2 table, for a qcow2
        layer; None for a layer that may hold data anywhere (raw)."""
        img = getattr(layer, "image", None)
        l1 = getattr(layer, "l1", None)
        if img is None or l1 is None or not hasattr(img, "l2_entries"):
            return None
        cover = img.l2_entries * img.cluster_size
        idx = np.flatnonzero(np.asarray(l1, np.uint64) & np.uint64(C.L1E_OFFSET_MASK))
        starts = idx.astype(np.int64) * cover
        return starts, starts + cover

    def _next_allocated(self, pos: int, spans) -> int:
        """The first guest offset >= pos that any layer may hold data at (self.size: none)."""
        best = self.size
        for layer, sp in zip(self.layers, spans):
            if pos >= layer.size:
                continue
            if sp is None:
                return pos
            starts, ends = sp
            j = int(np.searchsorted(ends, pos, "right"))
            if j < len(starts):
                best = min(best, max(int(starts[j]), pos))
        return best

    def _window(self, w0: int, w1: int) -> Extents:
        us = np.array([w0], np.int64)      # unresolved intervals
        ue = np.array([w1], np.int64)
        out = []
        n = len(self.layers)
        for d, layer in enumerate(self.layers):
            if not len(us):
                break
            lo, hi = int(us[0]), min(int(ue[-1]), layer.size)
            r = layer.runs(lo, hi) if hi > lo else None
            nxt = self.layers[d + 1].size if d + 1 < n else None
            cut = nxt is not None and lo < nxt < int(ue[-1])
            if len(us) == 1 and r is not None and len(r) and int(r.starts[0]) == lo:
                # one interval covered by this layer's runs: already sorted and unique
                b = r.starts
                if cut:
                    k = int(np.searchsorted(b, nxt))
                    if k == len(b) or b[k] != nxt:
                        b = np.insert(b, k, nxt)
                b = np.append(b, ue[-1])
            else:
                pts = [us, ue]
                if r is not None:
                    pts.append(r.starts)
                if cut:
                    pts.append(np.array([nxt], np.int64))
                b = np.unique(np.concatenate(pts))
            ss, se = b[:-1], b[1:]
            iu = np.searchsorted(us, ss, "right") - 1
            inside = (iu >= 0) & (ss < ue[np.maximum(iu, 0)])
            ss, se = ss[inside], se[inside]
            if r is not None and len(r):
                ir = np.searchsorted(r.starts, ss, "right") - 1
                ir = np.maximum(ir, 0)
                k = r.kinds[ir]
                h = r.hosts[ir] + np.where(E.OFFSET_KINDS[k], ss - r.starts[ir], 0)
                k = np.where(ss < layer.size, k, E.UNALLOC_PLAIN).astype(np.uint8)
            else:
                k = np.full(len(ss), E.UNALLOC_PLAIN, np.uint8)
                h = np.zeros(len(ss), np.int64)
            if nxt is None:
                done = np.ones(len(ss), bool)
            else:
                done = E.ALLOCATED_KINDS[k] | (ss >= nxt)
            if done.any():
                out.append(Extents(ss[done], se[done], np.full(int(done.sum()), d, np.int32),
                                   k[done], h[done]))
            us, ue = ss[~done], se[~done]
        if len(out) == 1:
            return out[0]
        ex = Extents(*(np.concatenate([getattr(p, f) for p in out])
                       for f in ("starts", "ends", "depth", "kinds", "hosts")))
        order = np.argsort(ex.starts, kind="stable")
        return Extents(ex.starts[order], ex.ends[order], ex.depth[order], ex.kinds[order],
                       ex.hosts[order])

    # ------------------------------------------------------------ writing
    def writer(self):
        """The guest writer of the top layer (made on first use)."""
        w = getattr(self, "_guest_writer", None)
        if w is None:
            top = self.layers[0]
            if isinstance(top, RawLayer):
                w = top
            else:
                if not top.image.writable:
                    raise InvalidImageError("'%s' is opened read-only" % top.path)
                from ..blockdev.writer import GuestWriter
                w = GuestWriter(self, sync=self.sync)
            self._guest_writer = w
        return w

    sync = True

    def write(self, offset: int, data) -> None:
        """Write guest data (copy-on-write from the backing chain for partial clusters)."""
        self.writer().write(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make [offset, offset+length) read as zeros (zero flags where the format allows)."""
        self.writer().write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        """Discard whole clusters: they read as zeros on v3, from the backing file on v2."""
        self.writer().discard(offset, length)

    def flush(self) -> None:
        from ..host import fileio
        top = self.layers[0]
        fd = top.fd if isinstance(top, RawLayer) else top.image.fd
        fileio.fsync(fd)

    # ------------------------------------------------------------ reading
    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes [offset, offset+length) (zeros past the end of the disk)."""
        out = np.zeros(length, np.uint8)
        self.read_into(out, offset, zeroed=True)
        return out.tobytes()

    def read_into(self, out: np.ndarray, offset: int, zeroed: bool = False) -> None:
        """Fill the uint8 array out with the guest bytes from offset on (no extra copies).
        zeroed: out already holds zeros (holes are then not written)."""
        end = min(offset + len(out), self.size)
        if not zeroed and end - offset < len(out):
            out[max(end - offset, 0):] = 0
        if end - offset <= SMALL_READ and end > offset and self.salvage is None and \
                self._read_small(out[:end - offset], offset, zeroed):
            return
        if end > offset:
            for ex in self.iter_extents(offset, end):
                if not zeroed:
                    self._zero_holes(out, offset, ex)
                self.read_extents_into(out, offset, ex)

    def _read_small(self, out: np.ndarray, offset: int, zeroed: bool) -> bool:
        """A short read that one layer answers whole (the copy-on-write fill of a small
        guest write, most often): found by walking the layers' runs, without the chain's
        block-status machinery.  False: the range is mixed, or compressed, or invalid —
        the general path reads it."""
        end = offset + len(out)
        for layer in self.layers:
            if offset >= layer.size:
                break                       # past a shorter backing file: zeros
            if end > layer.size:
                return False
            r = layer.runs(offset, end)
            if len(r) != 1:
                return False
            k = int(r.kinds[0])
            if k == E.UNALLOC_PLAIN or k == E.UNALLOC_ALLOC:
                continue
            if k == E.NORMAL:
                layer.read_data_into(out, int(r.hosts[0]) + offset - int(r.starts[0]), offset)
                return True
            if E.ZERO_KINDS[k]:
                break
            return False
        if not zeroed:
            out[:] = 0
        return True

    def read_ranges_into(self, out: np.ndarray, base: int, starts, ends,
                         zeroed: bool = False, extents: Extents | None = None) -> None:
        """Fill out[s-base:e-base] with the guest bytes of every range [s, e) (sorted,
        disjoint): block status is resolved once for their whole span (or taken from
        extents, resolved earlier over a span that covers them), one read per piece.
        Bytes of out outside the ranges are left alone."""
        starts = np.asarray(starts, np.int64)
        ends = np.asarray(ends, np.int64)
        if not len(starts):
            return
        size = self.size
        if not zeroed:
            for s, e in zip(np.maximum(starts, size).tolist(), ends.tolist()):
                if e > s:
                    out[s - base:e - base] = 0          # past the end of the disk
        ends = np.minimum(ends, size)
        live = ends > starts
        starts, ends = starts[live], ends[live]
        if not len(starts):
            return
        if extents is None:
            parts = self.iter_extents(int(starts[0]), int(ends[-1]))
        else:
            i0 = int(np.searchsorted(extents.ends, int(starts[0]), "right"))
            i1 = int(np.searchsorted(extents.starts, int(ends[-1]), "left"))
            parts = [Extents(*(getattr(extents, f)[i0:i1]
                               for f in ("starts", "ends", "depth", "kinds", "hosts")))]
        for ex in parts:
            if not len(ex):
                continue
            lo, hi = int(ex.starts[0]), int(ex.ends[-1])
            a = int(np.searchsorted(ends, lo, "right"))
            b = int(np.searchsorted(starts, hi, "left"))
            if a >= b:
                continue
            rs, re_ = np.maximum(starts[a:b], lo), np.minimum(ends[a:b], hi)
            cuts = np.unique(np.concatenate([ex.starts, rs, re_]))
            ss, se = cuts[:-1], cuts[1:]
            j = np.searchsorted(rs, ss, "right") - 1
            keep = (j >= 0) & (ss < re_[np.maximum(j, 0)])
            ss, se = ss[keep], se[keep]
            i = np.searchsorted(ex.starts, ss, "right") - 1
            k = ex.kinds[i]
            h = ex.hosts[i] + np.where(E.OFFSET_KINDS[k], ss - ex.starts[i], 0)
            pieces = Extents(ss, se, ex.depth[i], k, h)
            if not zeroed:
                self._zero_holes(out, base, pieces, (rs, re_))
            self.read_extents_into(out, base, pieces)

    @staticmethod
    def _zero_holes(out: np.ndarray, base: int, ex: Extents, spans=None) -> None:
        """Zero out[s-base:e-base] for every extent that holds no data to read; with many
        holes, zero the spans (default: the extents' whole span) before the data is read."""
        holes = np.flatnonzero((ex.kinds != E.NORMAL) & (ex.kinds != E.COMPRESSED))
        if len(holes) > 64:
            if spans is None:
                spans = ([int(ex.starts[0])], [int(ex.ends[-1])])
            holes_s, holes_e = spans
        else:
            holes_s, holes_e = ex.starts[holes], ex.ends[holes]
        for s, e in zip(np.asarray(holes_s).tolist(), np.asarray(holes_e).tolist()):
            out[s - base:e - base] = 0

    # salvage(offset, length, message): set (convert --salvage) to read what cannot be read
    # as zeros and report it instead of failing
    salvage = None

    def read_extents_into(self, out: np.ndarray, base: int, ex: Extents, data_only=None) -> None:
        """Fill out[s-base:e-base] for every extent holding data (zeros stay untouched)."""
        kinds = ex.kinds
        bad = np.flatnonzero(kinds == E.INVALID)
        for i in bad.tolist():
            msg = "Invalid L2 entry for guest offset %#x in %s" % (
                int(ex.starts[i]), self.layers[int(ex.depth[i])].path)
            self._unreadable(out, base, int(ex.starts[i]), int(ex.ends[i]),
                             CorruptImageError(msg))
        for i in np.flatnonzero(kinds == E.NORMAL).tolist():
            s = int(ex.starts[i]); e = int(ex.ends[i])
            try:
                self.layers[int(ex.depth[i])].read_data_into(out[s - base:e - base],
                                                             int(ex.hosts[i]), s)
            except (OSError, Qcow2Error) as err:
                self._unreadable(out, base, s, e, err)      # raises it unless salvaging
        comp = np.flatnonzero(kinds == E.COMPRESSED)
        if not len(comp):
            return
        for d in np.unique(ex.depth[comp]).tolist():
            layer = self.layers[d]
            cs = layer.image.cluster_size
            sel = comp[ex.depth[comp] == d]
            descs, first = np.unique(ex.hosts[sel], return_index=True)
            descs = descs.tolist()
            try:
                data = dict(zip(descs, layer.read_compressed_many(descs)))
            except (OSError, Qcow2Error, ValueError):
                if self.salvage is None:
                    raise
                data = {}
                for desc in descs:            # salvage: find the clusters that fail
                    try:
                        data[desc] = layer.read_compressed_many([desc])[0]
                    except (OSError, Qcow2Error, ValueError) as err:
                        data[desc] = err
            for i in sel.tolist():
                s = int(ex.starts[i]); e = int(ex.ends[i])
                cstart = s - s % cs
                got = data[int(ex.hosts[i])]
                if isinstance(got, Exception):
                    self._unreadable(out, base, s, e, got)
                    continue
                out[s - base:e - base] = np.frombuffer(got, np.uint8)[s - cstart:e - cstart]

    def _unreadable(self, out: np.ndarray, base: int, s: int, e: int, err: Exception) -> None:
        """[s, e) cannot be read: raise err, or with salvage set read it as zeros and say so."""
        if self.salvage is None:
            raise err
        out[s - base:e - base] = 0
        self.salvage(s, e - s, getattr(err, "strerror", None) or str(err))


def window_bounds(chains, start: int, end: int):
    """The windows [w, we) that block status of chains (read side by side, as compare
    does) walks over [start, end): the window grid, except that a stretch where no layer
    of any chain has an L2 table is one window however large (an unallocated L1 range
    costs the same for every size)."""
    ws = min(c.window_size() for c in chains)
    spans = [[c._l1_spans(layer) for layer in c.layers] for c in chains]
    w = start
    while w < end:
        we = min(w + ws, end)
        nxt = min(c._next_allocated(w, sp) for c, sp in zip(chains, spans))
        if nxt >= we:
            we = min(end, max(we, nxt // ws * ws))
        yield w, we
        w = we


def make_chain(files: list, warnings: list, session, *, path: str,
               snapshot: str | None = None) -> Chain:
    """A Chain over files opened by session (top first); snapshot ("NAME",
    "snapshot.name=NAME" or "snapshot.id=ID") views that internal snapshot of the top."""
    layers = [_as_layer(f) for f in files]
    if snapshot is not None:
        top = layers[0]
        if not isinstance(top, Qcow2Layer):
            raise SnapshotError("'%s' has no internal snapshots (raw image)" % path)
        from ..image.snapshots import find_snapshot
        kind, _, key = snapshot.partition("=") if "=" in snapshot else ("", "", snapshot)
        i = find_snapshot(top.image, key, by_id=kind in ("", "snapshot.id"),
                          by_name=kind in ("", "snapshot.name"))
        if i is None:
            raise SnapshotError("Failed to load snapshot: Can't find snapshot '%s'" % key)
        layers[0] = Qcow2Layer(top.image, top.image.snapshots[i])
    return Chain(layers, warnings, session)
