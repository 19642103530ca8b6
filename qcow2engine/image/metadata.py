"""Every switch of one image's header, and the header cluster and refcount structure writes.

These are the named functions beside the allocator (alloc.py) through which all metadata of
an open image is written.  Each one writes in the design's order and leaves the image's
in-memory state (header fields, cached tables) matching the disk:

- `switch_l1`: a new active L1 table (already written and flushed by the caller) becomes
  active with one header write of size, L1 size and L1 offset (they share one sector);
- `set_size`: the virtual size alone;
- `switch_refcount_table`: a new refcount table (written and flushed) becomes active;
- `switch_snapshot_table`: a new snapshot table (written and flushed) becomes active with one
  write of nb_snapshots and snapshots_offset;
- `set_incompatible`, `clear_unknown_autoclear`: feature bits;
- `write_header`, `write_header_cluster`: the fixed header, or header + extensions + backing
  name (all of cluster 0) in one write;
- `set_backing`: point the image at another backing file;
- `write_refcount_structure`: a whole new refcount table and blocks.

Each switch ends with a flush: anything that relies on the new state comes after it.
"""
from __future__ import annotations

import struct

from ..errors import ChainError, Qcow2Error
from ..format import constants as C
from ..format.header import Extension, build_extensions, build_header
from ..host import fileio

# Byte offsets of header fields rewritten in place ("Header").
HDR_SIZE = 24
HDR_L1_SIZE = 36
HDR_L1_OFFSET = 40
HDR_REFTABLE = 48
HDR_REFTABLE_CLUSTERS = 56
HDR_SNAPSHOTS = 60
HDR_INCOMPAT = 72
HDR_AUTOCLEAR = 88


def _flush(img) -> None:
    fileio.fsync(img.fd)


def _barrier(img) -> None:
    """Before a header write switches to new state: whatever that state depends on (a
    request's last L2/L1 writes, which wait for the next flush) is on disk first, or a
    power cut could keep the switch and lose what it points at."""
    a = getattr(img, "_allocator", None)
    if a is not None:
        a.barrier()


def switch_l1(img, l1, offset: int, size: int | None = None) -> None:
    """Make the L1 table l1 (on disk at offset, flushed) active; with size, the virtual size
    changes in the same write."""
    h = img.header
    size = h.size if size is None else size
    _barrier(img)
    fileio.pwrite(img.fd, struct.pack(">QIIQ", size, h.crypt_method, len(l1), offset), HDR_SIZE)
    _flush(img)
    h.size, h.l1_size, h.l1_table_offset = size, len(l1), offset
    img.size = size
    img._l1 = l1


def set_size(img, size: int) -> None:
    """Change only the virtual size (the L1 table is big enough for it)."""
    _barrier(img)
    fileio.pwrite(img.fd, struct.pack(">Q", size), HDR_SIZE)
    _flush(img)
    img.header.size = img.size = size


def switch_refcount_table(img, offset: int, clusters: int, table, *,
                          order: int | None = None) -> None:
    """Make the refcount table (on disk at offset, flushed, `clusters` long) active; with
    order, the refcount width changes in the same header write."""
    h = img.header
    _barrier(img)
    if order is None:
        fileio.pwrite(img.fd, struct.pack(">QI", offset, clusters), HDR_REFTABLE)
    else:
        h.refcount_order = order
        h.refcount_table_offset, h.refcount_table_clusters = offset, clusters
        fileio.pwrite(img.fd, build_header(h)[:h.header_length], 0)   # one write: both
        img.refcount_order = order
        img.refcount_bits = 1 << order
    _flush(img)
    h.refcount_table_offset, h.refcount_table_clusters = offset, clusters
    img._reftable = table


def switch_snapshot_table(img, snaps: list, offset: int, nbytes: int) -> None:
    """Make the snapshot table (on disk at offset, flushed, nbytes long) active."""
    _barrier(img)
    fileio.pwrite(img.fd, struct.pack(">IQ", len(snaps), offset), HDR_SNAPSHOTS)
    _flush(img)
    h = img.header
    h.nb_snapshots, h.snapshots_offset = len(snaps), offset
    img._snapshots = list(snaps)
    img.snapshot_table_size = nbytes


def set_incompatible(img, bits: int, on: bool) -> None:
    """Set or clear incompatible feature bits (v3 only), then flush."""
    h = img.header
    new = (h.incompatible_features | bits) if on else (h.incompatible_features & ~bits)
    if new == h.incompatible_features or img.version < 3:
        return
    h.incompatible_features = new
    _barrier(img)
    fileio.pwrite(img.fd, struct.pack(">Q", new), HDR_INCOMPAT)
    _flush(img)


def clear_unknown_autoclear(img) -> None:
    """Clear autoclear bits this engine does not know (docs: "autoclear features")."""
    h = img.header
    if img.version >= 3 and h.autoclear_features & ~C.AUTOCLEAR_KNOWN:
        h.autoclear_features &= C.AUTOCLEAR_KNOWN
        fileio.pwrite(img.fd, struct.pack(">Q", h.autoclear_features), HDR_AUTOCLEAR)
        _flush(img)


def write_header(img) -> None:
    """Rewrite the fixed part of the header from img.header, then flush."""
    _barrier(img)
    fileio.pwrite(img.fd, build_header(img.header)[:img.header.header_length
                                                   if img.version >= 3 else C.V2_HEADER_SIZE], 0)
    _flush(img)


def write_header_cluster(img) -> None:
    """Rewrite the header, its extensions and the backing file name in one write (they all
    live in cluster 0), then flush.  Used to change the backing file or the version."""
    h = img.header
    exts = list(img.extensions)
    ext_bytes = build_extensions(exts) if (exts or img.version >= 3 or img.backing_file) else b""
    backing = img.backing_file.encode() if img.backing_file else b""
    fixed = C.V2_HEADER_SIZE if img.version < 3 else h.header_length
    if backing:
        h.backing_file_offset = fixed + len(ext_bytes)
        h.backing_file_size = len(backing)
    else:
        h.backing_file_offset = h.backing_file_size = 0
    data = build_header(h)[:fixed] + ext_bytes + backing
    if len(data) > img.cluster_size:
        raise Qcow2Error("The header, its extensions and the backing file name do not fit in "
                         "the first cluster")
    _barrier(img)
    fileio.pwrite(img.fd, data, 0)
    _flush(img)


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


def write_refcount_structure(img, counts, order: int):
    """Write a complete new refcount table and blocks of width 2**order, holding counts
    (one per cluster) and counting themselves, in clusters after everything in use; flush.
    Returns (table offset, table clusters, table, clusters used).  The caller switches the
    header to the new table (switch_refcount_table) and frees the old structures after."""
    import numpy as np
    from ..format.entries import encode_refblock, to_be64
    cs = img.cluster_size
    used = np.flatnonzero(counts)
    end = max(int(used[-1]) + 1 if len(used) else 1, img.file_clusters)
    per_block = cs * 8 // (1 << order)
    nb_rb, rt_clusters = 1, 1
    while True:            # the structure must also describe its own clusters
        total = end + nb_rb + rt_clusters
        need_rb = -(-total // per_block)
        need_rt = -(-need_rb * 8 // cs)
        if need_rb <= nb_rb and need_rt <= rt_clusters:
            break
        nb_rb, rt_clusters = max(nb_rb, need_rb), max(rt_clusters, need_rt)
    total = end + nb_rb + rt_clusters
    full = np.zeros(nb_rb * per_block, np.uint64)
    n = min(len(counts), len(full))
    full[:n] = counts[:n]
    full[end:total] = 1
    table = np.zeros(rt_clusters * cs // 8, np.uint64)
    for b in range(nb_rb):
        off = (end + b) * cs
        table[b] = np.uint64(off)
        fileio.pwrite(img.fd, encode_refblock(full[b * per_block:(b + 1) * per_block], order), off)
    rt_off = (end + nb_rb) * cs
    fileio.pwrite(img.fd, to_be64(table), rt_off)
    _flush(img)
    img.file_size = max(img.file_size, total * cs)
    return rt_off, rt_clusters, table, total


def write_entries(img, offset: int, values) -> None:
    """Write big-endian 64-bit table entries at offset (no flush)."""
    from ..format.entries import to_be64
    fileio.pwrite(img.fd, to_be64(values), offset)
