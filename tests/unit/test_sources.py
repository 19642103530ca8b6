"""blockdev.sources: a pattern source is cut into parts and slices without building the
whole buffer (the source side of the streaming write path; the rest is in
tests/interop/test_streaming.py)."""
from __future__ import annotations

import pytest

from qcow2engine.blockdev.sources import PatternSource

MiB = 1 << 20


def test_pattern_source_parts():
    s = PatternSource(0x5A, 20 * MiB + 3, chunk=MiB)
    assert len(s) == 20 * MiB + 3
    p = s.part(19 * MiB, 20 * MiB + 3)
    assert len(p) == MiB + 3
    assert bytes(p[MiB:MiB + 3]) == b"ZZZ"
    assert bytes(s[5:105]) == b"Z" * 100
    with pytest.raises(ValueError):
        s[0:MiB + 1]

