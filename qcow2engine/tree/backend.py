"""The steps a machine snapshot tree is built from, as one interface.

`tree.offline.OfflineBackend` carries them out on image files (machine shut off); a live
executor (qmp_bridge) implements the same methods on a running QEMU.  The journal records each
step as a dict `{"op": NAME, ...arguments}` and calls `backend.<op>(**arguments)`; every
step is idempotent (done again after a crash, it ends in the same state) and the journal
knows how to undo the reversible ones (journal.UNDO).  Long steps take progress(done, total)
and a cancel event, checked at window boundaries (jobs.check_cancel).
"""
from __future__ import annotations

import threading
from typing import Optional, Protocol

from ..jobs import Progress
from .model import Stamp


class ImageFacts:
    """What the tree needs to know of one image."""
    __slots__ = ("path", "fmt", "vsize", "backing", "backing_fmt", "tags")

    def __init__(self, path, fmt, vsize, backing, backing_fmt, tags):
        self.path = path
        self.fmt = fmt
        self.vsize = vsize
        self.backing = backing          # absolute path of the backing file, or None
        self.backing_fmt = backing_fmt
        self.tags = tags                # internal snapshot names (qcow2), else ()


class Backend(Protocol):
    # ---- looking (never writes)
    def probe(self, path: str) -> ImageFacts: ...
    def stamp(self, path: str) -> Stamp: ...
    def allocated(self, path: str) -> int: ...
    def in_use(self, path: str) -> bool: ...
    def exists(self, path: str) -> bool: ...

    # ---- steps
    def create_overlay(self, path: str, backing: str, backing_fmt: str, size: int) -> None: ...
    def remove_file(self, path: str) -> None: ...
    def internal_create(self, path: str, tag: str) -> None: ...
    def internal_apply(self, path: str, tag: str) -> None: ...
    def internal_delete(self, path: str, tag: str) -> None: ...
    def internal_to_overlay(self, overlay: str, path: str, tag: str,
                            progress: Optional[Progress] = None,
                            cancel: Optional[threading.Event] = None) -> None: ...
    def commit(self, top: str, base: str, progress: Optional[Progress] = None,
               cancel: Optional[threading.Event] = None) -> None: ...
    def stream(self, path: str, base: Optional[str], base_fmt: Optional[str],
               progress: Optional[Progress] = None,
               cancel: Optional[threading.Event] = None) -> None: ...
    def rebase(self, path: str, backing: Optional[str], backing_fmt: Optional[str]) -> None: ...
    def repair(self, path: str) -> None: ...
