"""Vectorised decoders for L1, L2 and refcount entries ("Cluster mapping", "Host cluster management").

Everything works on whole tables held as numpy arrays of native uint64.
"""
from __future__ import annotations

import numpy as np

from . import constants as C

# Guest-view kinds of a cluster or subcluster, as the spec's cluster types.
UNALLOC_PLAIN = 0   # not allocated here: read the backing file (or zeros)
UNALLOC_ALLOC = 1   # extended L2: host cluster present, subcluster not allocated
ZERO_PLAIN = 2      # reads as zeros, no host cluster
ZERO_ALLOC = 3      # reads as zeros, host cluster preallocated
NORMAL = 4          # data at host offset
COMPRESSED = 5      # compressed data; "host" holds the raw descriptor
INVALID = 6         # an entry the spec forbids
DATA_ZERO = 7       # data at host offset that is known to read as zeros (hole in the file)

ALLOCATED_KINDS = np.array([0, 0, 1, 1, 1, 1, 1, 1], dtype=bool)
OFFSET_KINDS = np.array([0, 1, 0, 1, 1, 0, 0, 1], dtype=bool)   # host offset is a real address
ZERO_KINDS = np.array([0, 0, 1, 1, 0, 0, 0, 1], dtype=bool)
DATA_KINDS = np.array([0, 0, 0, 0, 1, 1, 0, 1], dtype=bool)


def be64(buf) -> np.ndarray:
    """Big-endian u64 table bytes -> native uint64 array (a copy)."""
    return np.frombuffer(buf, dtype=">u8").astype(np.uint64)


def to_be64(arr: np.ndarray) -> bytes:
    return np.asarray(arr, dtype=np.uint64).astype(">u8").tobytes()


def classify_standard_l2(entries: np.ndarray, has_data_file: bool, cluster_size: int = 512):
    """Kinds and host offsets for standard (64-bit) L2 entries, one per cluster.  A host
    offset that is not cluster_size-aligned makes the entry INVALID (QEMU refuses to read
    it: "Cluster allocation offset ... unaligned")."""
    e = entries
    off = (e & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
    compressed = (e & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0
    zero = (e & np.uint64(C.QCOW_OFLAG_ZERO)) != 0
    allocated = off != 0
    if has_data_file:
        allocated |= (e & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
    kind = np.full(e.shape, UNALLOC_PLAIN, dtype=np.uint8)
    kind[allocated] = NORMAL
    kind[zero & ~allocated] = ZERO_PLAIN
    kind[zero & allocated] = ZERO_ALLOC
    kind[allocated & ((off & np.int64(cluster_size - 1)) != 0)] = INVALID
    kind[compressed] = COMPRESSED
    host = np.where(compressed, e.astype(np.int64) & np.int64(0x3FFFFFFFFFFFFFFF), off)
    return kind, host


def classify_extended_l2(entries: np.ndarray, has_data_file: bool, subcluster_size: int):
    """Kinds and host offsets for extended L2 entries (pairs of u64), 32 per cluster; an
    unaligned host cluster offset makes its allocated subclusters INVALID."""
    e = entries[0::2]
    bitmap = entries[1::2]
    off = (e & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
    compressed = (e & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0
    allocated = off != 0
    if has_data_file:
        allocated |= (e & np.uint64(C.QCOW_OFLAG_COPIED)) != 0
    shifts = np.arange(32, dtype=np.uint64)
    abits = ((bitmap[:, None] >> shifts) & np.uint64(1)).astype(bool)
    zbits = ((bitmap[:, None] >> (shifts + np.uint64(32))) & np.uint64(1)).astype(bool)
    alloc_c = allocated[:, None]
    kind = np.full(abits.shape, UNALLOC_PLAIN, dtype=np.uint8)
    kind[alloc_c & ~abits & ~zbits] = UNALLOC_ALLOC
    kind[alloc_c & abits] = NORMAL
    kind[alloc_c & zbits] = ZERO_ALLOC
    kind[~alloc_c & zbits] = ZERO_PLAIN
    kind[abits & zbits] = INVALID
    kind[~alloc_c & abits] = INVALID
    misaligned = allocated & ((off & np.int64(32 * subcluster_size - 1)) != 0)
    kind[misaligned] = INVALID
    kind[compressed] = COMPRESSED
    sub = np.arange(32, dtype=np.int64) * subcluster_size
    host = off[:, None] + sub
    host = np.where(compressed[:, None], (e.astype(np.int64) & np.int64(0x3FFFFFFFFFFFFFFF))[:, None], host)
    return kind.reshape(-1), host.reshape(-1)


def compressed_extent(desc, cluster_bits: int):
    """(host offset, compressed byte length) of compressed descriptors (scalars or arrays)."""
    x = C.compressed_offset_bits(cluster_bits)
    d = np.asarray(desc, dtype=np.uint64) & np.uint64(0x3FFFFFFFFFFFFFFF)
    off = (d & np.uint64((1 << x) - 1)).astype(np.int64)
    nsec = ((d >> np.uint64(x)) & np.uint64((1 << (62 - x)) - 1)).astype(np.int64) + 1
    size = nsec * 512 - (off & 511)
    return off, size


def referenced_clusters(entries, cluster_bits: int, *, normal: bool = True) -> np.ndarray:
    """Host cluster indices that L2 entries (standard ones, or the entry words of extended
    L2) hold references to ("Host cluster management"): one per cluster with a host offset
    (normal=False: none, the data lives in an external data file), and one per host cluster
    that each compressed cluster touches, so a host cluster shared by k compressed clusters
    appears k times."""
    e = np.asarray(entries, np.uint64).reshape(-1)
    comp = (e & np.uint64(C.QCOW_OFLAG_COMPRESSED)) != 0
    out = []
    if normal:
        host = (e[~comp] & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
        out.append(host[host != 0] >> cluster_bits)
    if comp.any():
        co, cz = compressed_extent(e[comp], cluster_bits)
        first = co >> cluster_bits
        n = ((co + cz - 1) >> cluster_bits) - first + 1
        step = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        out.append(np.repeat(first, n) + step)
    if not out:
        return np.zeros(0, np.int64)
    return np.concatenate(out) if len(out) > 1 else out[0]


def decode_refblock(buf, refcount_order: int) -> np.ndarray:
    """Refcount block bytes -> native unsigned array of refcounts (widths 1..64 bits)."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    bits = 1 << refcount_order
    if bits == 1:
        return np.unpackbits(raw, bitorder="little")
    if bits < 8:
        per = 8 // bits
        mask = (1 << bits) - 1
        shifts = (np.arange(per, dtype=np.uint8) * bits)
        return ((raw[:, None] >> shifts) & mask).reshape(-1).astype(np.uint8)
    dt = {8: np.uint8, 16: ">u2", 32: ">u4", 64: ">u8"}[bits]
    return np.frombuffer(buf, dtype=dt).astype(np.dtype(dt).newbyteorder("="))


def encode_refblock(values: np.ndarray, refcount_order: int) -> bytes:
    """Native refcount array -> on-disk refcount block bytes (inverse of decode_refblock)."""
    bits = 1 << refcount_order
    v = np.asarray(values)
    if bits < 8:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint16) * bits)
        grouped = v.astype(np.uint16).reshape(-1, per) << shifts
        return grouped.sum(axis=1).astype(np.uint8).tobytes()
    dt = {8: np.uint8, 16: ">u2", 32: ">u4", 64: ">u8"}[bits]
    return v.astype(dt).tobytes()
