"""Backing-chain operations offline: rebase (safe and unsafe), commit, stream.

Every data movement goes through the crash-safe write path in chunks, and the guest view
of the chain is the same before, during and after the operation; backing pointers change
only at the end, with one write of the header cluster.  Long operations report progress
through a callback progress(done_bytes, total_bytes) and can be interrupted between chunks
(or anywhere: an interruption is a crash, which the write path survives).
"""
from __future__ import annotations

import os

import numpy as np

from .session import has_protocol, resolve_backing, walk_chain
from .view import Chain, open_chain
from ..errors import ChainError, UnsupportedFeatureError
from ..format import constants as C
from ..format import entries as E
from ..format.header import Extension
from ..image.alloc import write_header_cluster
from ..blockdev.sources import ViewSource



def set_backing(img, name: str | None, fmt: str | None) -> None:
    """Point a qcow2 image at another backing file (name as stored), or at none."""
    if name and len(name.encode()) > C.MAX_BACKING_FILE_NAME:
        raise ChainError("Backing file name too long")
    img.extensions = [e for e in img.extensions if e.type != C.EXT_BACKING_FORMAT]
    if name and fmt:
        img.extensions.insert(0, Extension(C.EXT_BACKING_FORMAT, fmt.encode()))
    img.backing_file = name or None
    img.backing_format = fmt if name else None
    img.header.extensions = img.extensions
    write_header_cluster(img)


def _file_key(path: str):
    st = os.stat(path)
    return st.st_dev, st.st_ino


WINDOW = 1 << 30        # guest bytes per write request (one metadata round)
CHUNK = 8 << 20         # bytes compared at a time
REBASE_WINDOW = 128 << 20   # rebase: compare the next window while this one is written


def _granule(chain: Chain) -> int:
    img = getattr(chain.layers[0], "image", None)
    return img.cluster_size if img is not None else 64 << 10


def _copy_into(dst: Chain, view: Chain, ranges, zero_ranges=(), progress=None, total=None,
               done=0):
    """Make dst read like view over the byte ranges: data ranges are copied as whole dst
    clusters (the view of a whole cluster is right everywhere in it), zero-only ranges are
    zeroed through metadata.  One write request (one metadata round) per window of WINDOW
    bytes; the data streams from the view through a small buffer as it is written."""
    g = _granule(dst)
    size = min(dst.size, view.size)
    ranges = sorted((max(0, s), min(e, size)) for s, e in ranges if e > s)
    zero_ranges = sorted((max(0, s), min(e, size)) for s, e in zero_ranges if e > s)
    state = [done]

    def advance(n):
        state[0] += n
        if progress:
            progress(min(state[0], total or state[0]), total)

    try:
        for w, we, sel in _plan(ranges, size, g):
            dst._writer().write_clusters(w, ViewSource(view, w, we - w, on_read=advance), sel)
        for s, e in zero_ranges:
            dst.write_zeroes(s, e - s)
    finally:
        _forget_cached_tables(view, dst)
    return state[0]


def _plan(ranges, size: int, g: int, window: int | None = None) -> list:
    """Split sorted, disjoint (start, end) byte ranges into windows of `window` bytes
    (default WINDOW): a list of (w, we, sel), sel marking the g-byte clusters of [w, we)
    that the ranges touch."""
    window = window or WINDOW
    jobs = []
    for s, e in ranges:
        while s < e:
            w = s // window * window
            if not jobs or jobs[-1][0] != w:
                we = min(w + window, size)
                jobs.append((w, we, np.zeros(-(-(we - w) // g), bool)))
            we = jobs[-1][1]
            e2 = min(e, we)
            jobs[-1][2][(s - w) // g:-(-(e2 - w) // g)] = True
            s = e2
    return jobs


def _prefetch(jobs: list, work):
    """Yield (job, work(job)) in order, work on the next job running in a helper thread
    while the caller handles the current one.  Only reads belong in work: every write stays
    in the caller's thread, in order."""
    if len(jobs) < 2:
        for job in jobs:
            yield job, work(job)
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1, thread_name_prefix="qcow2engine-compare") as pool:
        fut = pool.submit(work, jobs[0])
        for k, job in enumerate(jobs):
            res = fut.result()
            if k + 1 < len(jobs):
                fut = pool.submit(work, jobs[k + 1])
            yield job, res


def _groups(sel: np.ndarray):
    """Runs of True in sel as arrays of [start, end) indices."""
    edges = np.diff(np.concatenate([[False], sel, [False]]).astype(np.int8))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def _forget_cached_tables(view: Chain, dst: Chain) -> None:
    """When view reads a file that dst writes through another open file (commit: the base),
    its cached L1/L2 tables are stale after a write: drop them."""
    if view is dst:
        return
    key = _file_key(dst.layers[0].path)
    for layer in view.layers:
        img = getattr(layer, "image", None)
        if img is not None and _file_key(layer.path) == key:
            img._l1 = None
            img._l2_cache.clear()
            img._reftable = None
            img.file_size = os.fstat(img.fd).st_size


def _find_in_chain(chain: Chain, path: str, name: str) -> int:
    """Depth of the layer that name designates, as qemu-img matches -b: the name stored in
    the image above it, or a path (relative to the current directory or to that image)."""
    keys = {}
    for cand in (name, resolve_backing(path, name)):
        try:
            keys[_file_key(cand)] = True
        except OSError:
            pass
    for d, layer in enumerate(chain.layers[1:], start=1):
        above = chain.layers[d - 1]
        stored = getattr(getattr(above, "image", None), "backing_file", None)
        if stored == name:
            return d
        for cand in (resolve_backing(above.path, name),):
            try:
                keys.setdefault(_file_key(cand), True)
            except OSError:
                pass
        if _file_key(layer.path) in keys:
            return d
    raise ChainError("'%s' is not in the backing chain of '%s'" % (name, path))


def _runs_of(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """Merge consecutive selected segments into (start, end) ranges."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return []
    brk = np.flatnonzero(starts[idx][1:] != ends[idx][:-1]) + 1
    out = []
    for grp in np.split(idx, brk):
        out.append((int(starts[grp[0]]), int(ends[grp[-1]])))
    return out


def rebase(path: str, backing: str | None, backing_fmt: str | None = None, *,
           unsafe: bool = False, progress=None) -> None:
    """Change the backing file of path.  Safe mode first copies into path every range where
    the old and the new backing files differ, so the guest view does not change."""
    backing = backing or None
    if backing and not backing_fmt:
        # refused before anything is copied (qemu-img 7.2 refuses only after the copy)
        raise ChainError("backing format must be specified (-F)")
    if backing and has_protocol(backing):
        raise ChainError("Backing file '%s' uses a protocol prefix; refusing" % backing)
    if backing_fmt not in (None, "qcow2", "raw"):
        raise UnsupportedFeatureError("Unknown driver '%s'" % backing_fmt)
    if unsafe:
        files, _ = walk_chain(path, "qcow2", backing=False, writable=True)
        try:
            set_backing(files[0], backing, backing_fmt)
        finally:
            files[0].close()
        return
    top = open_chain(path, "qcow2", writable=True, lock="top")
    try:
        img = top.layers[0].image
        new = None
        if backing:
            npath = resolve_backing(path, backing)
            if _file_key(npath) == _file_key(path):
                raise ChainError("Cannot rebase '%s' onto itself" % path)
            new = open_chain(npath, backing_fmt, lock=False)
        try:
            _rebase_copy(top, new, progress)
        finally:
            if new is not None:
                new.close()
        set_backing(img, backing, backing_fmt)
    finally:
        top.close()


def _rebase_copy(top: Chain, new: Chain | None, progress) -> None:
    size = top.size
    # position of the new backing file in the current chain, if it is there
    k = None
    if new is not None:
        key = _file_key(new.layers[0].path)
        for d, layer in enumerate(top.layers[1:], start=1):
            if _file_key(layer.path) == key:
                k = d
                break
    done = 0
    g = top.layers[0].image.cluster_size
    for ex in top.iter_extents(0, size):
        below = ex.depth >= 1
        if k is not None:
            # ranges answered at or below the new backing file read the same afterwards
            need = below & (ex.depth < k)
            zero_only = E.ZERO_KINDS[ex.kinds] | ~E.ALLOCATED_KINDS[ex.kinds]
            done = _copy_into(top, top, _runs_of(need & ~zero_only, ex.starts, ex.ends),
                              _runs_of(need & zero_only, ex.starts, ex.ends), progress, size, done)
            continue
        # where the top does not answer: compare its view (= the old backing's) with the
        # new backing's, a piece at a time, and keep the old view where they differ
        n = -(-min(CHUNK, size) // g) * g
        bufs = (np.empty(n, np.uint8), np.empty(n, np.uint8) if new is not None else None)

        def compare(job, ex=ex):
            # ex (resolved before any write here) still describes this window: writes so
            # far went to other windows only, and it needs no table lookup
            return _rebase_compare(top, new, *job, g, bufs, ex)

        jobs = _plan(_runs_of(below, ex.starts, ex.ends), size, g, REBASE_WINDOW)
        windows = _prefetch(jobs, compare)
        try:
            for (w, we, sel), (data, zero) in windows:
                if data.any():
                    top._writer().write_clusters(w, ViewSource(top, w, we - w, extents=ex),
                                                 data)
                zs, ze = _groups(zero)
                for a, b in zip(zs.tolist(), ze.tolist()):
                    top.write_zeroes(w + a * g, min(w + b * g, we) - (w + a * g))
                done += int(sel.sum()) * g
                if progress:
                    progress(min(done, size), size)
        finally:
            windows.close()             # the helper thread is done before we go on


def _rebase_compare(top: Chain, new, w: int, we: int, sel, g: int, bufs, view=None):
    """Compare the current view of the selected clusters of [w, we) with the new backing's,
    CHUNK bytes at a time through bufs; return the clusters to write as data and those to
    write as zeros (where the two views differ)."""
    n = len(sel)
    differ = np.zeros(n, bool)
    nonzero = np.zeros(n, bool)
    per = len(bufs[0]) // g
    for c0 in range(0, n, per):
        c1 = min(c0 + per, n)
        rs, re_ = _groups(sel[c0:c1])
        if not len(rs):
            continue
        p0, p1 = w + c0 * g, min(w + c1 * g, we)
        cur = bufs[0][:(c1 - c0) * g]
        cur[p1 - p0:] = 0                   # the tail of a last, partial cluster
        starts, ends = p0 + rs * g, np.minimum(p0 + re_ * g, p1)
        top.read_ranges_into(cur, p0, starts, ends, extents=view)
        uc = cur.view(np.uint64).reshape(c1 - c0, g // 8)
        if new is not None:
            nxt = bufs[1][:(c1 - c0) * g]
            nxt[p1 - p0:] = 0
            new.read_ranges_into(nxt, p0, starts, ends)
            un = nxt.view(np.uint64).reshape(c1 - c0, g // 8)
        for a, b in zip(rs.tolist(), re_.tolist()):
            nonzero[c0 + a:c0 + b] = uc[a:b].any(axis=1)
            if new is not None:
                differ[c0 + a:c0 + b] = (uc[a:b] != un[a:b]).any(axis=1)
    if new is None:
        differ = nonzero                # the new view is all zeros
    return differ & nonzero, differ & ~nonzero


def commit(path: str, base: str | None = None, *, drop: bool = False, progress=None) -> str:
    """Write the data of path (and of the layers between it and base) into base — by default
    its immediate backing file — and, unless drop (or base given), empty path afterwards.
    Returns the base's path."""
    chain = open_chain(path, "qcow2", lock=False)
    try:
        if len(chain.layers) < 2:
            raise ChainError("Image does not have a backing file")
        k = 1
        if base is not None:
            k = _find_in_chain(chain, path, base)
            drop = True
        base_layer = chain.layers[k]
        base_path = base_layer.path
        base_fmt = base_layer.format
    finally:
        chain.close()
    # locks: the top (emptied) and the base (written) are taken for writing
    top = open_chain(path, "qcow2", writable=not drop, lock="top")
    try:
        if base_layer_grow_needed(top, k):
            from ..image.resize import resize_image
            resize_image(base_path, top.size, fmt=base_fmt)
        dst = open_chain(base_path, base_fmt, writable=True)
        try:
            src = Chain(top.layers[:k])
            total = top.size
            done = 0
            for ex in src.iter_extents(0, top.size):
                # only what the layers above the base hold; the rest already reads from it
                above = E.ALLOCATED_KINDS[ex.kinds]
                zero = above & E.ZERO_KINDS[ex.kinds]
                done = _copy_into(dst, top, _runs_of(above & ~zero, ex.starts, ex.ends),
                                  _runs_of(zero, ex.starts, ex.ends), progress, total, done)
            dst.flush()
        finally:
            dst.close()
        if not drop:
            from ..blockdev.writer import GuestWriter
            GuestWriter(top).make_empty()
    finally:
        top.close()
    return base_path


def base_layer_grow_needed(top: Chain, k: int) -> bool:
    return top.layers[k].size < top.size


def stream(path: str, base: str | None = None, *, progress=None) -> None:
    """Pull into path the data of the layers between it and base (all of them by default),
    then point path at base (or at nothing).  The guest view never changes."""
    chain = open_chain(path, "qcow2", lock=False)
    try:
        if base is None:
            new_name, new_fmt = None, None
        else:
            layer = chain.layers[_find_in_chain(chain, path, base)]
            new_fmt = layer.format
            if os.path.isabs(base):
                new_name = base
            else:
                new_name = os.path.relpath(layer.path, os.path.dirname(os.path.abspath(path)))
    finally:
        chain.close()
    rebase(path, new_name, new_fmt, progress=progress)
