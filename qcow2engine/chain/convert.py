"""`convert`: the guest view of a chain into a sparse raw file or a new qcow2 image.

Both take progress(done, total) and a cancel event, checked between chunks; a cancelled
convert leaves a valid (partial) target and returns an OpResult that says "cancelled".
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import InvalidImageError, InvalidRequestError, JobCancelled, UnsupportedFeatureError
from ..format import entries as E
from ..host import fileio
from ..jobs import CANCELLED, COMPLETED, OpResult, check_cancel

CHUNK = 8 << 20         # raw target: bytes per read task
SPAN = 16 << 20         # qcow2 target: guest bytes per write request


def data_mask(kinds: np.ndarray) -> np.ndarray:
    """The extents that hold data to copy: data that is not a known hole, and invalid
    entries (reading them raises, or with --salvage gives zeros and a warning)."""
    return E.DATA_KINDS[kinds] & (kinds != E.DATA_ZERO) | (kinds == E.INVALID)


def _write_nonzero(fd: int, buf: np.ndarray, offset: int, block: int) -> None:
    """Write buf at offset, leaving holes for block-aligned runs of zeros."""
    n = len(buf)
    if block <= 0:
        fileio.pwrite(fd, buf, offset)
        return
    head = (-offset) % block
    nblocks = (n - head) // block
    if nblocks <= 0:
        if buf.any():
            fileio.pwrite(fd, buf, offset)
        return
    body = buf[head:head + nblocks * block]
    if block % 8 == 0 and body.ctypes.data % 8 == 0:
        nz = body.view(np.uint64).reshape(nblocks, block // 8).any(axis=1)
    else:
        nz = body.reshape(nblocks, block).any(axis=1)
    if head and buf[:head].any():
        fileio.pwrite(fd, buf[:head], offset)
    tail = head + nblocks * block
    if tail < n and buf[tail:].any():
        fileio.pwrite(fd, buf[tail:], offset + tail)
    if not nz.any():
        return
    if nz.all():
        fileio.pwrite(fd, body, offset + head)
        return
    edges = np.flatnonzero(np.diff(np.concatenate([[0], nz.astype(np.int8), [0]])))
    for a, b in zip(edges[0::2], edges[1::2]):
        fileio.pwrite(fd, body[a * block:b * block], offset + head + int(a) * block)


def convert_to_raw(chain, dst: str, *, min_sparse: int = 4096, progress=None,
                   threads: int = 2, create: bool = True, cancel=None,
                   target_is_zero: bool = False) -> OpResult:
    """Copy the guest view of `chain` into the raw file `dst` (holes where zero).  With
    create=False, dst exists and must be large enough; its ranges where the source reads
    zeros are written with zeros unless target_is_zero (a character device such as
    /dev/null, qemu-img's null-co://, takes everything)."""
    import stat
    size = chain.size
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
    try:
        fd = os.open(dst, flags, 0o644)
    except OSError as e:
        raise InvalidImageError("Could not open '%s': Could not open '%s': %s"
                                % (dst, dst, e.strerror)) from None
    try:
        if create:
            fileio.ftruncate(fd, size)
        elif stat.S_ISCHR(os.fstat(fd).st_mode):
            target_is_zero = True           # nothing to read back: write the data only
        elif os.lseek(fd, 0, os.SEEK_END) < size:
            raise InvalidRequestError("output file is smaller than input file")
        zeros_too = not create and not target_is_zero
        for layer in chain.layers:
            img = getattr(layer, "image", None)
            if img is not None:
                img.data_fd_for_read()
        done = 0

        def work(task):
            base, length, ex = task
            buf = np.zeros(length, np.uint8)
            chain.read_extents_into(buf, base, ex)
            if zeros_too:
                fileio.pwrite(fd, buf, base)
            else:
                _write_nonzero(fd, buf, base, min_sparse)
            return length

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = []
            try:
                for ex in chain.iter_extents(0, size):
                    for task in _chunk_tasks(ex, zeros_too):
                        check_cancel(cancel)
                        futures.append(pool.submit(work, task))
                        if len(futures) >= 8:
                            done += futures.pop(0).result()
                            if progress:
                                progress(done, size)
            except JobCancelled:
                for f in futures:
                    done += f.result()
                return OpResult("convert", CANCELLED, (dst,), bytes_copied=done, target=dst)
            for f in futures:
                done += f.result()
            if progress:
                progress(size, size)
    finally:
        os.close(fd)
    return OpResult("convert", COMPLETED, (dst,), bytes_copied=size, target=dst)


def _chunk_tasks(ex, write_zeros: bool):
    """Split a window of extents into chunk tasks (base, length, sub-extents) with data."""
    data = data_mask(ex.kinds)
    idx = np.flatnonzero(data) if not write_zeros else np.arange(len(ex))
    i = 0
    from .view import Extents
    while i < len(idx):
        s = int(ex.starts[idx[i]])
        j = i
        while j < len(idx) and int(ex.ends[idx[j]]) - s <= CHUNK:
            j += 1
        if j == i:
            # one extent larger than a chunk: split it
            e = int(ex.ends[idx[i]])
            k = idx[i]
            for c in range(s, e, CHUNK):
                ce = min(c + CHUNK, e)
                h = int(ex.hosts[k]) + (c - s if E.OFFSET_KINDS[ex.kinds[k]] else 0)
                sub = Extents(np.array([c]), np.array([ce]), ex.depth[k:k + 1], ex.kinds[k:k + 1],
                              np.array([h]))
                yield c, ce - c, sub
            i += 1
            continue
        sel = idx[i:j]
        e = int(ex.ends[sel[-1]])
        sub = Extents(ex.starts[sel], ex.ends[sel], ex.depth[sel], ex.kinds[sel], ex.hosts[sel])
        yield s, e - s, sub
        i = j


def convert_to_qcow2(chain, dst: str, options=None, *, compress: bool = False,
                     backing: str | None = None, backing_fmt: str | None = None,
                     min_sparse: int = 4096, progress=None, threads: int = 2,
                     cancel=None) -> OpResult:
    """Copy the guest view of chain into a new qcow2 image dst.

    Zero blocks (min_sparse granularity) are left unallocated.  With a backing file for the
    target, only what the source's top layer holds is copied (the rest is expected to come
    from that backing file).  With compress, each cluster is compressed (zlib or zstd per
    the compression_type option) on `threads` cores and packed back to back.
    """
    from ..image.create import parse_options
    from .session import open_chain
    o = parse_options(options)
    o.size = chain.size
    if backing:
        o.backing_file, o.backing_fmt = backing, backing_fmt
    from ..image.create import create_from_options
    if compress and o.encrypt:
        raise UnsupportedFeatureError("Compression is not supported with encryption")
    create_from_options(dst, o)
    if o.encrypt.get("key-secret"):          # the new encrypted target opens with its secret
        from ..host.secrets import DEFAULT
        DEFAULT.set_key_secret(dst, o.encrypt["key-secret"])
    target = open_chain(dst, "qcow2", writable=True)
    target.sync = False                  # a fresh file: one flush at the end is enough
    outcome = COMPLETED
    try:
        img = target.layers[0].image
        cs = img.cluster_size
        writer = target.writer()
        size = chain.size
        done = 0
        top_only = backing is not None
        span = max(cs, SPAN // cs * cs)
        pool = ThreadPoolExecutor(max_workers=max(1, threads))

        def read(a, b):
            # the full guest view: with a target backing file, clusters the top only partly
            # covers still need the rest of their content
            buf = np.zeros(b - a, np.uint8)
            chain.read_into(buf, a, zeroed=True)
            return buf

        pending = []
        starts = _spans_to_copy(chain, span, top_only)    # follows the data, not the size
        for s in starts:
            if cancel is not None and cancel.is_set():
                outcome = CANCELLED
                break
            pending.append((s, pool.submit(read, s, min(s + span, size))))
            if len(pending) < 3 and s != starts[-1]:
                continue
            s0, fut = pending.pop(0)
            buf = fut.result()
            _store(writer, img, chain, s0, buf, compress, min_sparse, top_only, pool)
            done += len(buf)
            if progress:
                progress(done, size)
        for s0, fut in pending:
            buf = fut.result()
            _store(writer, img, chain, s0, buf, compress, min_sparse, top_only, pool)
            done += len(buf)
            if progress:
                progress(done, size)
        pool.shutdown()
        if progress and outcome == COMPLETED:
            progress(size, size)
        from ..host import fileio
        fileio.fsync(img.fd)
    finally:
        target.close()
    return OpResult("convert", outcome, (dst,), bytes_copied=done, target=dst)


def copy_extent_data(chain, ex, target, shift: int = 0, skip_zeros: bool = False):
    """Write the ranges of the window ex that hold data in chain to target, at their guest
    offset less shift, SPAN bytes a read; skip_zeros leaves out all-zero pieces (a fresh
    target reads zeros there).  Returns the data mask of ex."""
    data = data_mask(ex.kinds)
    for a, b in zip(ex.starts[data].tolist(), ex.ends[data].tolist()):
        for c in range(a, b, SPAN):
            buf = np.zeros(min(c + SPAN, b) - c, np.uint8)
            chain.read_into(buf, c, zeroed=True)
            if not skip_zeros or buf.any():
                target.write(c - shift, buf)
    return data


def _copy_compressed(chain, ex, target, pool, size: int):
    """`convert -n -c`: the target clusters that the window's data touches, each written
    whole (from the source's view) as a compressed cluster.  Returns the data mask of ex
    and the cluster-aligned spans written."""
    img = target.layers[0].image
    cs = img.cluster_size
    data = data_mask(ex.kinds)
    spans = []
    for a, b in zip(ex.starts[data].tolist(), ex.ends[data].tolist()):
        a, b = a // cs * cs, min(-(-b // cs) * cs, size)
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    writer = target.writer()
    step = max(cs, SPAN // cs * cs)
    for a, b in spans:
        if b % cs:
            # the source ends inside this target cluster: the rest of it keeps the target's
            # data, so that part is an ordinary write (qemu-img fails here: EINVAL)
            t = b // cs * cs
            buf = np.zeros(b - max(t, a), np.uint8)
            chain.read_into(buf, max(t, a), zeroed=True)
            target.write(max(t, a), buf)
            b = max(t, a)
        for c in range(a, b, step):
            buf = np.zeros(min(c + step, b) - c, np.uint8)
            chain.read_into(buf, c, zeroed=True)
            _store(writer, img, chain, c, buf, True, 0, False, pool)
    return data, spans


def _minus(a: int, b: int, spans) -> list:
    """[a, b) less the (sorted) spans."""
    out = []
    for s, e in spans:
        if e <= a or s >= b:
            continue
        if s > a:
            out.append((a, s))
        a = max(a, e)
    if a < b:
        out.append((a, b))
    return out


def convert_into_qcow2(chain, dst: str, *, progress=None, cancel=None,
                       target_is_zero: bool = False, compress: bool = False) -> OpResult:
    """`convert -n`: copy the guest view of chain into the existing qcow2 image dst (at
    least as large): data where the source has data, zeros where the source reads zeros
    and dst may not (dst's other ranges already read zeros and are left alone; with
    target_is_zero, the caller vouches that all of dst does).  compress (`-c`): the
    clusters written are stored compressed."""
    from .session import open_chain
    target = open_chain(dst, "qcow2", writable=True)
    size = chain.size
    done = 0
    outcome = COMPLETED
    pool = ThreadPoolExecutor(max_workers=2) if compress else None
    try:
        if target.size < size:
            raise InvalidRequestError("output file is smaller than input file")
        zero_kinds = E.ZERO_KINDS | ~E.ALLOCATED_KINDS
        for ex in chain.iter_extents(0, size):
            if cancel is not None and cancel.is_set():
                outcome = CANCELLED
                break
            spans = []
            if compress:
                data, spans = _copy_compressed(chain, ex, target, pool, size)
            else:
                data = copy_extent_data(chain, ex, target)
            if not target_is_zero:
                holes = [r for a, b in zip(ex.starts[~data].tolist(), ex.ends[~data].tolist())
                         for r in _minus(a, b, spans)]
                for a, b in holes:
                    tx = target.extents(a, b)
                    nz = ~zero_kinds[tx.kinds]
                    for ta, tb in zip(tx.starts[nz].tolist(), tx.ends[nz].tolist()):
                        target.write_zeroes(ta, tb - ta, unmap=True)
            done = int(ex.ends[-1])
            if progress:
                progress(done, size)
        target.flush()
    finally:
        if pool is not None:
            pool.shutdown()
        target.close()
    return OpResult("convert", outcome, (dst,), bytes_copied=done, target=dst)


def _spans_to_copy(chain, span: int, top_only: bool) -> list:
    """Start offsets of the spans that hold something to copy: data anywhere in the chain
    (or, with top_only, anything the top layer itself answers); the others read as zeros
    in the new image without a write."""
    parts = []
    for ex in chain.iter_extents(0, chain.size):
        k = ex.kinds
        if top_only:
            sel = ex.depth == 0
        else:
            sel = data_mask(k)
        if sel.any():
            first = ex.starts[sel] // span
            n = (ex.ends[sel] - 1) // span - first + 1          # spans each extent touches
            k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            parts.append(np.unique(np.repeat(first, n) + k))
    if not parts:
        return []
    return (np.unique(np.concatenate(parts)) * span).tolist()


def _store(writer, img, chain, base: int, buf: np.ndarray, compress: bool, min_sparse: int,
           top_only: bool, pool) -> None:
    cs = img.cluster_size
    n = -(-len(buf) // cs)
    padded = buf if len(buf) == n * cs else np.concatenate([buf, np.zeros(n * cs - len(buf), np.uint8)])
    if min_sparse > 0:
        nz = padded.view(np.uint64).reshape(n, cs // 8).any(axis=1)
    else:
        nz = np.ones(n, bool)
    if top_only:
        # only target clusters the source's top touches are written (whole, from the full
        # view); where that view is all zeros, a zero cluster is enough
        alloc = np.zeros(n, bool)
        for ex in chain.iter_extents(base, base + len(buf)):
            sel = ex.depth == 0
            for a, b in zip(ex.starts[sel].tolist(), ex.ends[sel].tolist()):
                alloc[(a - base) // cs:-(-(b - base) // cs)] = True
        zero_alloc = alloc & ~padded.view(np.uint64).reshape(n, cs // 8).any(axis=1)
        idx = np.flatnonzero(zero_alloc)
        if len(idx):
            brk = np.flatnonzero(np.diff(idx) != 1) + 1
            for grp in np.split(idx, brk):
                s = base + int(grp[0]) * cs
                e = min(base + (int(grp[-1]) + 1) * cs, base + len(buf))
                writer.write_zeroes(s, e - s)
        nz = alloc & ~zero_alloc
    partial = []
    if img.extended_l2 and min_sparse > 0 and not top_only and not compress:
        # as qemu-img: zero detection at max(subcluster, -S) granularity, and a cluster with
        # data in only some of its blocks gets only those subclusters allocated
        g = max(img.subcluster_size, 1 << (min_sparse.bit_length() - 1))
        if g < cs:
            per = cs // g
            bm = padded.view(np.uint64).reshape(n * per, g // 8).any(axis=1).reshape(n, per)
            full = bm.all(axis=1)
            for k in np.flatnonzero(nz & ~full).tolist():
                edges = np.flatnonzero(np.diff(np.concatenate([[0], bm[k].astype(np.int8), [0]])))
                for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
                    lo = k * cs + a * g
                    hi = min(k * cs + b * g, len(buf))
                    if hi > lo:
                        partial.append((lo, hi))
            nz = nz & full
    if not compress:
        if nz.any():
            writer.write_clusters(base, padded[:len(buf)], nz)
        for lo, hi in partial:
            writer.write(base + lo, padded[lo:hi])
        return
    if not nz.any():
        return
    idx = np.flatnonzero(nz)
    zstd = img.header.compression_type == 1
    blobs = list(pool.map(lambda k: _compress(padded[k * cs:(k + 1) * cs].tobytes(), zstd), idx.tolist()))
    writer.write_compressed(base // cs, idx, blobs, padded)


def _compress(data: bytes, zstd: bool) -> bytes:
    if zstd:
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    import zlib
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()
