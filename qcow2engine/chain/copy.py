"""The windowed copy machinery of chain operations: make one chain read like another view
over byte ranges, a window (one write request, one metadata round) at a time.

Every window is committed crash-safely by the write path before the next one starts, so a
cancel checked between windows (`jobs.check_cancel`) stops at a clean point.
"""
from __future__ import annotations

import numpy as np

from ..blockdev.sources import ViewSource
from ..format import entries as E
from ..jobs import check_cancel
from .session import file_key
from .view import Chain, Extents


WINDOW = 1 << 30        # guest bytes per write request (one metadata round)
CHUNK = 8 << 20         # bytes compared at a time
REBASE_WINDOW = 128 << 20   # rebase: compare the next window while this one is written


def _granule(chain: Chain) -> int:
    img = getattr(chain.layers[0], "image", None)
    return img.cluster_size if img is not None else 64 << 10


def copy_into(dst: Chain, view: Chain, ranges, zero_ranges=(), progress=None, total=None,
              done=0, cancel=None):
    """Make dst read like view over the byte ranges: data ranges are copied as whole dst
    clusters (the view of a whole cluster is right everywhere in it), zero-only ranges are
    zeroed through metadata.  One write request (one metadata round) per window of WINDOW
    bytes; the data streams from the view through a small buffer as it is written."""
    g = _granule(dst)
    size = min(dst.size, view.size)
    ranges = sorted((max(0, s), min(e, size)) for s, e in ranges if e > s)
    zero_ranges = sorted((max(0, s), min(e, size)) for s, e in zero_ranges if e > s)
    state = [done]
    writer = dst.writer()

    def advance(n):
        state[0] += n
        if progress:
            progress(min(state[0], total or state[0]), total)

    for w, we, sel in plan_windows(ranges, size, g):
        check_cancel(cancel)
        writer.write_clusters(w, ViewSource(view, w, we - w, on_read=advance), sel)
    check_cancel(cancel)
    for s, e in zero_ranges:
        dst.write_zeroes(s, e - s)
    return state[0]


def plan_windows(ranges, size: int, g: int, window: int | None = None) -> list:
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


def prefetch(jobs: list, work):
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


def groups(sel: np.ndarray):
    """Runs of True in sel as arrays of [start, end) indices."""
    edges = np.diff(np.concatenate([[False], sel, [False]]).astype(np.int8))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def runs_of(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """Merge consecutive selected segments into (start, end) ranges."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return []
    brk = np.flatnonzero(starts[idx][1:] != ends[idx][:-1]) + 1
    out = []
    for grp in np.split(idx, brk):
        out.append((int(starts[grp[0]]), int(ends[grp[-1]])))
    return out


def rebase_copy(top: Chain, new: Chain | None, progress=None, cancel=None) -> int:
    """Make top's own layer hold every range where its view differs from new's (None: all
    zeros), window by window; returns the guest bytes handled."""
    size = top.size
    # position of the new backing file in the current chain, if it is there
    k = None
    if new is not None:
        key = file_key(new.layers[0].path)
        for d, layer in enumerate(top.layers[1:], start=1):
            if file_key(layer.path) == key:
                k = d
                break
    done = 0
    g = top.layers[0].image.cluster_size
    for ex in top.iter_extents(0, size):
        # what the top's own layer does not answer: backing data, and zeros from nowhere
        # (no backing file, or past a shorter one's end), which the new backing may not read
        below = (ex.depth >= 1) | ~E.ALLOCATED_KINDS[ex.kinds]
        if k is not None:
            # ranges answered at or below the new backing file read the same afterwards
            need = below & (ex.depth < k)
            zero_only = E.ZERO_KINDS[ex.kinds] | ~E.ALLOCATED_KINDS[ex.kinds]
            done = copy_into(top, top, runs_of(need & ~zero_only, ex.starts, ex.ends),
                             runs_of(need & zero_only, ex.starts, ex.ends), progress, size, done,
                             cancel)
            continue
        # where the top does not answer: compare its view (= the old backing's) with the
        # new backing's, a piece at a time, and keep the old view where they differ
        n = -(-min(CHUNK, size) // g) * g
        bufs = (np.empty(n, np.uint8), np.empty(n, np.uint8) if new is not None else None)

        def compare(job, ex=ex):
            # ex (resolved before any write here) still describes this window: writes so
            # far went to other windows only, and it needs no table lookup
            return rebase_compare(top, new, *job, g, bufs, ex)

        jobs = plan_windows(runs_of(below, ex.starts, ex.ends), size, g, REBASE_WINDOW)
        windows = prefetch(jobs, compare)
        try:
            for (w, we, sel), (data, zero) in windows:
                check_cancel(cancel)
                if data.any():
                    top.writer().write_clusters(w, ViewSource(top, w, we - w, extents=ex),
                                                 data)
                zs, ze = groups(zero)
                for a, b in zip(zs.tolist(), ze.tolist()):
                    top.write_zeroes(w + a * g, min(w + b * g, we) - (w + a * g))
                done += int(sel.sum()) * g
                if progress:
                    progress(min(done, size), size)
        finally:
            windows.close()             # the helper thread is done before we go on
    return done


def rebase_compare(top: Chain, new, w: int, we: int, sel, g: int, bufs, view=None):
    """Compare the current view of the selected clusters of [w, we) with the new backing's,
    CHUNK bytes at a time through bufs; return the clusters to write as data and those to
    write as zeros (where the two views differ)."""
    n = len(sel)
    differ = np.zeros(n, bool)
    nonzero = np.zeros(n, bool)
    per = len(bufs[0]) // g
    for c0 in range(0, n, per):
        c1 = min(c0 + per, n)
        rs, re_ = groups(sel[c0:c1])
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




def view_differences(a: Chain, b: Chain):
    """Window by window over a: (data_ranges, zero_ranges) where a's view may differ from
    b's, from block status alone (no data read): a range reads the same in both when both
    read zeros, or both take it from the same layer, of the same kind, at the same host
    offset.  The two chains must share their layer objects below the top (one Session), as
    an internal snapshot's view and its image's active view do.  data_ranges: a reads data
    there; zero_ranges: a reads zeros there (and b may not)."""
    zero_kinds = E.ZERO_KINDS | ~E.ALLOCATED_KINDS
    for ex in a.iter_extents(0, a.size):
        w0, w1 = int(ex.starts[0]), int(ex.ends[-1])
        hi = min(w1, b.size)
        eb = b.extents(w0, hi) if hi > w0 else None
        if eb is None or not len(eb):
            eb = Extents(np.array([w0]), np.array([w1]), np.zeros(1, np.int32),
                         np.array([E.ZERO_PLAIN], np.uint8), np.zeros(1, np.int64))
        elif hi < w1:          # b is shorter: it reads zeros past its end
            eb = Extents(np.append(eb.starts, hi), np.append(eb.ends, w1),
                         np.append(eb.depth, 0), np.append(eb.kinds, E.ZERO_PLAIN),
                         np.append(eb.hosts, 0))
        bounds = np.union1d(np.concatenate([ex.starts, ex.ends]),
                            np.concatenate([eb.starts, eb.ends]))
        s, e = bounds[:-1], bounds[1:]
        ia = np.searchsorted(ex.starts, s, side="right") - 1
        ib = np.searchsorted(eb.starts, s, side="right") - 1
        ka, kb = ex.kinds[ia], eb.kinds[ib]
        za, zb = zero_kinds[ka], zero_kinds[kb]
        ha = ex.hosts[ia] + np.where(E.OFFSET_KINDS[ka], s - ex.starts[ia], 0)
        hb = eb.hosts[ib] + np.where(E.OFFSET_KINDS[kb], s - eb.starts[ib], 0)
        same = (za & zb) | (~za & ~zb & (ka == kb) & (ex.depth[ia] == eb.depth[ib]) &
                            (ha == hb) & (ka != E.INVALID))
        yield runs_of(~same & ~za, s, e), runs_of(~same & za, s, e)
