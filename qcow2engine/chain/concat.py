"""Several chains read one after the other as one disk: `convert` of several source images
(qemu-img concatenates them; each one's guest view starts where the previous one ends)."""
from __future__ import annotations

import numpy as np

from .session import close_all
from .view import Extents


def _shift(ex: Extents, by: int) -> Extents:
    return Extents(ex.starts + by, ex.ends + by, ex.depth, ex.kinds, ex.hosts)


class ConcatChain:
    """The guest views of `chains` back to back, with the read side of a Chain that convert
    uses (size, block status window by window, reads).  Closing it closes every chain."""

    def __init__(self, chains: list):
        self.chains = list(chains)
        sizes = [c.size for c in self.chains]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.warnings = [w for c in self.chains for w in c.warnings]

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    @property
    def top(self):
        return self.chains[0].top

    @property
    def layers(self) -> list:
        return [layer for c in self.chains for layer in c.layers]

    @property
    def salvage(self):
        return self.chains[0].salvage if self.chains else None

    @salvage.setter
    def salvage(self, fn) -> None:
        for c, off in zip(self.chains, self.offsets.tolist()):
            c.salvage = None if fn is None else (
                lambda s, n, msg, off=off: fn(s + off, n, msg))

    def close(self) -> None:
        chains, self.chains = self.chains, []
        close_all([c.close for c in chains])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def window_size(self) -> int:
        return min(c.window_size() for c in self.chains)

    def _parts(self, start: int, end: int):
        """(chain, its offset, start, end in its own guest view) of the chains [start, end)
        touches."""
        end = min(end, self.size)
        i = int(np.searchsorted(self.offsets, start, "right")) - 1
        while 0 <= i < len(self.chains) and int(self.offsets[i]) < end:
            off = int(self.offsets[i])
            a, b = max(start, off) - off, min(end, int(self.offsets[i + 1])) - off
            if b > a:
                yield self.chains[i], off, a, b
            i += 1

    def iter_extents(self, start: int = 0, end: int | None = None):
        """Block status window by window; a window never spans two chains (each extent's
        depth and host offset belong to its own chain)."""
        end = self.size if end is None else end
        for c, off, a, b in self._parts(start, end):
            for ex in c.iter_extents(a, b):
                yield _shift(ex, off)

    def extents(self, start: int = 0, end: int | None = None) -> Extents:
        parts = list(self.iter_extents(start, end))
        if not parts:
            z = np.zeros(0, np.int64)
            return Extents(z, z, z.astype(np.int32), z.astype(np.uint8), z)
        return Extents(*(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("starts", "ends", "depth", "kinds", "hosts")))

    def read_extents_into(self, out: np.ndarray, base: int, ex: Extents, data_only=None) -> None:
        if not len(ex):
            return
        cut = np.searchsorted(ex.starts, self.offsets[1:-1], "left")
        bounds = [0] + cut.tolist() + [len(ex)]
        for i, c in enumerate(self.chains):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                off = int(self.offsets[i])
                part = Extents(ex.starts[lo:hi] - off, ex.ends[lo:hi] - off, ex.depth[lo:hi],
                               ex.kinds[lo:hi], ex.hosts[lo:hi])
                c.read_extents_into(out, base - off, part)

    def read_into(self, out: np.ndarray, offset: int, zeroed: bool = False) -> None:
        end = offset + len(out)
        if not zeroed and end > self.size:
            out[max(self.size - offset, 0):] = 0
        for c, off, a, b in self._parts(offset, end):
            c.read_into(out[a + off - offset:b + off - offset], a, zeroed=zeroed)

    def read(self, offset: int, length: int) -> bytes:
        out = np.zeros(length, np.uint8)
        self.read_into(out, offset, zeroed=True)
        return out.tobytes()
