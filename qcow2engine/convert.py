"""`convert -O raw`: the guest view of a chain into a sparse raw file."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .format import entries as E

CHUNK = 8 << 20


def _write_nonzero(fd: int, buf: np.ndarray, offset: int, block: int) -> None:
    """Write buf at offset, leaving holes for block-aligned runs of zeros."""
    n = len(buf)
    if block <= 0:
        os.pwrite(fd, buf, offset)
        return
    head = (-offset) % block
    nblocks = (n - head) // block
    if nblocks <= 0:
        if buf.any():
            os.pwrite(fd, buf, offset)
        return
    body = buf[head:head + nblocks * block]
    if block % 8 == 0 and body.ctypes.data % 8 == 0:
        nz = body.view(np.uint64).reshape(nblocks, block // 8).any(axis=1)
    else:
        nz = body.reshape(nblocks, block).any(axis=1)
    if head and buf[:head].any():
        os.pwrite(fd, buf[:head], offset)
    tail = head + nblocks * block
    if tail < n and buf[tail:].any():
        os.pwrite(fd, buf[tail:], offset + tail)
    if not nz.any():
        return
    if nz.all():
        os.pwrite(fd, body, offset + head)
        return
    edges = np.flatnonzero(np.diff(np.concatenate([[0], nz.astype(np.int8), [0]])))
    for a, b in zip(edges[0::2], edges[1::2]):
        os.pwrite(fd, body[a * block:b * block], offset + head + int(a) * block)


def convert_to_raw(chain, dst: str, *, min_sparse: int = 4096, progress=None,
                   threads: int = 2, create: bool = True) -> None:
    """Copy the guest view of `chain` into the raw file `dst` (holes where zero)."""
    size = chain.size
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
    fd = os.open(dst, flags, 0o644)
    try:
        if create:
            os.ftruncate(fd, size)
        for layer in chain.layers:
            img = getattr(layer, "image", None)
            if img is not None:
                img.data_fd_for_read()
        done = 0

        def work(task):
            base, length, ex = task
            buf = np.zeros(length, np.uint8)
            chain.read_extents_into(buf, base, ex)
            if not create:
                os.pwrite(fd, buf, base)
            else:
                _write_nonzero(fd, buf, base, min_sparse)
            return length

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = []
            for ex in chain.iter_extents(0, size):
                for task in _chunk_tasks(ex, create):
                    futures.append(pool.submit(work, task))
                    if len(futures) >= 8:
                        done += futures.pop(0).result()
                        if progress:
                            progress(done, size)
            for f in futures:
                done += f.result()
            if progress:
                progress(size, size)
    finally:
        os.close(fd)


def _chunk_tasks(ex, write_zeros: bool):
    """Split a window of extents into chunk tasks (base, length, sub-extents) with data."""
    data = E.DATA_KINDS[ex.kinds] & (ex.kinds != E.DATA_ZERO)
    if (ex.kinds == E.INVALID).any():
        data |= ex.kinds == E.INVALID
    idx = np.flatnonzero(data) if not write_zeros else np.arange(len(ex))
    i = 0
    from .chain import Extents
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
