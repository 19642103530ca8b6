"""format.entries.referenced_clusters: the host clusters L2 entries hold references to."""
from __future__ import annotations

import numpy as np

from qcow2engine.format import constants as C
from qcow2engine.format.entries import referenced_clusters


def _compressed(off: int, nsec: int, bits: int = 16) -> int:
    x = C.compressed_offset_bits(bits)
    return C.QCOW_OFLAG_COMPRESSED | ((nsec - 1) << x) | off


def test_normal_zero_alloc_and_compressed_ranges():
    e = np.array([
        0,                                             # unallocated: nothing
        0x50000 | C.QCOW_OFLAG_COPIED,                 # normal: cluster 5
        0x60000 | C.QCOW_OFLAG_ZERO,                   # preallocated zero: cluster 6
        C.QCOW_OFLAG_ZERO,                             # plain zero: nothing
        _compressed(0x1FF00, 2),                       # 768 bytes from 0x1FF00: clusters 1, 2
        _compressed(0x20100, 1),                       # inside cluster 2 again
        _compressed(0x3FFFF, 3),                       # clusters 3 and 4
    ], np.uint64)
    got = sorted(referenced_clusters(e, 16).tolist())
    assert got == [1, 2, 2, 3, 4, 5, 6]
    # external data file: only the compressed ones (never there in practice) and no others
    assert sorted(referenced_clusters(e[:4], 16, normal=False).tolist()) == []
    assert referenced_clusters(np.zeros(0, np.uint64), 16).dtype == np.int64
