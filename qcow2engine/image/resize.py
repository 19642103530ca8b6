"""`resize`: change the virtual size of a qcow2 (or raw) image, crash-safely.

Growing a qcow2 image that needs a bigger L1 table writes the new table in new clusters,
then switches size, L1 size and L1 offset with a single header write (they share one
sector), then frees the old table.  Shrinking (only with shrink=True, like qemu-img's
--shrink) first writes the smaller size, then drops the L2 entries and tables past it, then
frees their clusters: a crash at any point leaves the old or the new image, leaks at most.
"""
from __future__ import annotations

import os

import numpy as np

from ..host import fileio
from ..errors import ResizeError
from ..format import constants as C
from ..format.entries import referenced_clusters, to_be64
from .qcow2 import Qcow2Image
from . import metadata



def resize_raw(f, size: int, *, shrink: bool = False) -> None:
    """Truncate a raw image (opened writable) to size; shrinking needs shrink=True."""
    if size < f.file_size and not shrink:
        raise ResizeError("Use the --shrink option to perform a shrink operation.")
    fileio.ftruncate(f.fd, size)
    f.file_size = f.size = size


def resize_qcow2(img: Qcow2Image, size: int, *, shrink: bool = False, backing_size: int = 0,
                 write_zeroes=None) -> None:
    """Resize img.  Growing over a backing file longer than the old size (backing_size)
    makes the new part read as zeros, as QEMU does, through write_zeroes(offset, length) (the
    guest writer of img's chain): written past the old end before the size changes, so a
    crash leaves the old size or the new size with its zeros."""
    if size % 512:
        raise ResizeError("The new size must be a multiple of 512")
    if img.encrypted and getattr(img, "cipher", None) is None:
        # encrypted images resize like any other once unlocked (new zeros go through the
        # encrypting guest writer)
        raise ResizeError("Resizing encrypted images needs the image unlocked")
    if size == img.size:
        return
    if img.version < 3 and img.snapshots:
        raise ResizeError("Can't resize a v2 image which has snapshots")
    if size < img.size and not shrink:
        raise ResizeError("Use the --shrink option to perform a shrink operation.")
    cs = img.cluster_size
    if -(-size // (img.l2_entries * cs)) * 8 > C.MAX_L1_SIZE_BYTES:
        raise ResizeError("The image size is too large for file format 'qcow2'")
    from . import bitmaps
    old_size = img.size
    with_bitmaps = bitmaps.begin_resize(img, size)
    _resize_qcow2(img, size, backing_size, write_zeroes)
    if with_bitmaps:
        bitmaps.finish_resize(img, old_size)


def _resize_qcow2(img: Qcow2Image, size: int, backing_size: int, write_zeroes) -> None:
    cs = img.cluster_size
    per_l2 = img.l2_entries
    need_l1 = -(-size // (per_l2 * cs))
    if need_l1 * 8 > C.MAX_L1_SIZE_BYTES:
        raise ResizeError("The image size is too large for file format 'qcow2'")
    meta = img.allocator
    h = img.header
    if size > img.size:
        old_size = img.size
        zero_end = min(size, backing_size) if write_zeroes is not None else 0
        if zero_end > old_size and img.version < 3:
            raise ResizeError("Failed to zero out new clusters: Operation not supported")
        if need_l1 > h.l1_size:
            old_off, old_n = h.l1_table_offset, h.l1_size
            l1 = np.zeros(need_l1, np.uint64)
            l1[:old_n] = img.l1_table
            first = int(meta.allocate(-(-need_l1 * 8 // cs), contiguous=True)[0])
            meta.commit()
            new_off = first * cs
            fileio.pwrite(img.fd, to_be64(l1), new_off)
            meta.flush()
            metadata.switch_l1(img, l1, new_off, size if zero_end <= old_size else None)
            if old_n:
                a = old_off >> img.cluster_bits
                meta.free(np.arange(a, a + -(-old_n * 8 // cs), dtype=np.int64))
                meta.commit()
            if zero_end <= old_size:
                return
        if zero_end > old_size:
            img.size = size                 # in memory only: the writer may reach the tail
            try:
                write_zeroes(old_size, zero_end - old_size)
                fileio.fsync(img.fd)
            finally:
                img.size = old_size
        metadata.set_size(img, size)
        return
    # shrink: size first, then drop everything past it
    metadata.set_size(img, size)
    first_gone = -(-size // cs)                # first guest cluster wholly past the end
    l1 = img.l1_table
    release = []
    changed_l1 = []
    words = 2 if img.extended_l2 else 1
    for i in range(first_gone // per_l2, len(l1)):
        l2off = int(l1[i]) & C.L1E_OFFSET_MASK
        if not l2off:
            continue
        a = max(first_gone - i * per_l2, 0)
        table = img.read_l2(l2off).copy()
        release.append(referenced_clusters(table[a * words::words], img.cluster_bits,
                                           normal=not img.has_data_file))
        shared = not (int(l1[i]) & C.QCOW_OFLAG_COPIED)
        if a == 0:
            changed_l1.append((i, 0))
            release.append(np.array([l2off >> img.cluster_bits], np.int64))
        else:
            table[a * words:] = 0
            if shared:
                # a table shared with a snapshot is copied before it is changed
                new = int(meta.allocate(1)[0]) * cs
                meta.commit()
                meta.write_l2(new, table)
                changed_l1.append((i, np.uint64(new) | np.uint64(C.QCOW_OFLAG_COPIED)))
                release.append(np.array([l2off >> img.cluster_bits], np.int64))
            else:
                meta.write_l2(l2off, table)
    meta.flush()
    if changed_l1:
        idx, vals = zip(*changed_l1)
        meta.set_l1_entries(list(idx), np.array(vals, np.uint64))
        meta.flush()
    if release:
        clusters = np.concatenate(release)
        uniq, counts = np.unique(clusters, return_counts=True)
        for c in range(1, int(counts.max()) + 1 if len(counts) else 1):
            meta.free(uniq[counts >= c])
        meta.commit()
    # as QEMU: refcount blocks left counting nothing are unhooked, the file cut after its
    # last cluster in use
    meta.drop_empty_blocks()
    meta.trim_file()
    img.file_size = os.fstat(img.fd).st_size
