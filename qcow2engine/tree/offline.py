"""The tree's steps on image files, for a machine that is shut off.

Every image is opened through a Session with QEMU's locks (a writable open takes the write
locks, so a running QEMU that holds the image makes the step fail before it writes, and QEMU
cannot take an image we are writing).  Each step is idempotent; see backend.py.
"""
from __future__ import annotations

import glob
import hashlib
import os
import threading
from typing import Optional

from ..chain.session import Session
from ..errors import JobCancelled
from ..host import fileio
from ..host.locking import held_by_other
from ..jobs import Progress
from .backend import ImageFacts
from .model import Stamp


def _rel(path: str, target: str) -> str:
    """The backing name stored in path for target: relative when in the same folder tree."""
    rel = os.path.relpath(target, os.path.dirname(path))
    return rel if not rel.startswith("..") else target


class OfflineBackend:
    """Steps on image files; every call opens and closes what it needs.

    Within one verb (between begin_verb() and end_verb()) what an image looks like is
    remembered: the consistency check, the planner and the journal ask about the same files
    many times.  Every step forgets all of it (it writes files), before and after it runs."""

    def __init__(self):
        self._memo = None
        # snapshots (by name) and memory files whose memory a QEMU that died never saved
        self.lost_memory: set = set()

    def begin_verb(self) -> None:
        self._memo = {}

    def end_verb(self) -> None:
        self._memo = None

    def _forget(self) -> None:
        if self._memo is not None:
            self._memo.clear()

    # ---------------------------------------------------------------- looking
    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def _look(self, path: str):
        """(ImageFacts, Stamp) of the image at path, from one open."""
        if self._memo is not None and path in self._memo:
            return self._memo[path]
        from ..host.paths import resolve_backing
        st = os.stat(path)
        h = hashlib.sha256()
        with Session(force_share=True) as s:
            f = s.open_file(path)
            if f.format == "raw":
                facts = ImageFacts(path, "raw", f.size, None, None, ())
            else:
                backing = None
                if f.backing_file:
                    backing = os.path.abspath(resolve_backing(path, f.backing_file))
                facts = ImageFacts(path, "qcow2", f.size, backing, f.backing_format,
                                   tuple(sn.name for sn in f.snapshots))
                h.update(b"%d|%s|" % (f.size, (f.backing_file or "").encode()))
                h.update(f.l1_table.tobytes())
        out = (facts, Stamp(facts.vsize, st.st_mtime_ns, st.st_size, h.hexdigest()))
        if self._memo is not None:
            self._memo[path] = out
        return out

    def probe(self, path: str) -> ImageFacts:
        return self._look(path)[0]

    def stamp(self, path: str) -> Stamp:
        return self._look(path)[1]

    def allocated(self, path: str) -> int:
        return os.stat(path).st_blocks * 512

    def in_use(self, path: str) -> bool:
        return held_by_other(path)

    # ---------------------------------------------------------------- steps
    def create_overlay(self, path: str, backing: str, backing_fmt: str, size: int) -> None:
        from ..image.create import create_from_options, parse_options
        if os.path.exists(path):
            try:
                facts = self.probe(path)
                if facts.backing == os.path.abspath(backing) and facts.vsize == size:
                    return                      # done before a crash
            except Exception:                   # noqa: BLE001 - a half-made file of ours
                pass
            fileio.unlink(path)
        o = parse_options(None)
        o.size = size
        o.backing_file = _rel(path, backing)
        o.backing_fmt = backing_fmt
        create_from_options(path, o)

    def remove_file(self, path: str) -> None:
        fileio.unlink(path)
        folder = os.path.dirname(path)
        for tmp in glob.glob(os.path.join(glob.escape(folder), ".%s.qcow2engine-*.tmp"
                                          % glob.escape(os.path.basename(path)))):
            fileio.unlink(tmp)

    def internal_create(self, path: str, tag: str) -> None:
        from ..image.snapshots import create_snapshot
        with Session() as s:
            img = s.open_file(path, "qcow2", writable=True)
            if any(sn.name == tag for sn in img.snapshots):
                return
            create_snapshot(img, tag)

    def internal_apply(self, path: str, tag: str) -> None:
        from ..image.snapshots import apply_snapshot
        with Session() as s:
            apply_snapshot(s.open_file(path, "qcow2", writable=True), tag)

    def internal_delete(self, path: str, tag: str) -> None:
        from ..image.snapshots import delete_snapshot
        with Session() as s:
            img = s.open_file(path, "qcow2", writable=True)
            if any(sn.name == tag for sn in img.snapshots):
                delete_snapshot(img, tag)

    def internal_to_overlay(self, overlay: str, path: str, tag: str,
                            progress: Optional[Progress] = None,
                            cancel: Optional[threading.Event] = None) -> None:
        """Make overlay (empty, on path) show path's snapshot tag: copy into it every range
        where the snapshot differs from path's current state.  path is not written."""
        from ..chain.copy import copy_into, view_differences
        from ..chain.view import Chain
        with Session() as s:
            top = s.open_chain(overlay, "qcow2", writable=True)
            snap = s.open_chain(path, "qcow2", snapshot=tag)
            now = Chain(top.layers[1:])                        # what it reads through today
            done = 0
            for data, zero in view_differences(snap, now):    # block status only: no reads
                done = copy_into(top, snap, data, zero, progress, snap.size, done, cancel)
            top.flush()

    def commit(self, top: str, base: str, progress: Optional[Progress] = None,
               cancel: Optional[threading.Event] = None) -> None:
        from ..chain.ops import plan_commit, run_commit
        plan = plan_commit(top, base)
        r = run_commit(plan, progress=progress, cancel=cancel)
        if not r.completed:
            raise JobCancelled("cancelled")

    def stream(self, path: str, base: Optional[str], base_fmt: Optional[str],
               progress: Optional[Progress] = None,
               cancel: Optional[threading.Event] = None) -> None:
        """Pull into path everything above base (None: the whole chain), then point it at
        base.  Done again after it completed, it finds path already on base: nothing to do."""
        from ..chain.ops import plan_rebase, run_rebase
        facts = self.probe(path)
        want = os.path.abspath(base) if base else None
        if facts.backing == want:
            return
        plan = plan_rebase(path, _rel(path, base) if base else None, base_fmt, op="stream")
        r = run_rebase(plan, progress=progress, cancel=cancel)
        if not r.completed:
            raise JobCancelled("cancelled")

    def rebase(self, path: str, backing: Optional[str], backing_fmt: Optional[str]) -> None:
        """Unsafe rebase: only the pointer changes (the new backing reads the same)."""
        from ..chain.ops import plan_rebase, run_rebase
        if self.probe(path).backing == (os.path.abspath(backing) if backing else None):
            return
        run_rebase(plan_rebase(path, _rel(path, backing) if backing else None, backing_fmt,
                               unsafe=True))

    def repair(self, path: str) -> None:
        """After an interrupted step: give back clusters it leaked and put the COPIED flags
        right (what `qemu-img check -r all` does), so every image checks clean again."""
        from ..refcounts.repair import repair_image
        if os.path.exists(path) and self.probe(path).fmt == "qcow2":
            repair_image(path, "all")

    def resize(self, path: str, size: int) -> None:
        from ..chain.ops import resize_chain
        with Session() as s:
            chain = s.open_chain(path, writable=True)
            if chain.size < size:
                resize_chain(chain, size)


    # ---------------------------------------------------------------- a running machine's
    # steps, finished offline after its QEMU died in the middle of them: the disks' part is
    # done on the files (the QEMU that starts next opens the chains the tree names); memory
    # that was not saved stays missing (reverting to the snapshot then says so)
    def live_switch(self, overlays=None, internal=None, memfile=None, live=False,
                    resume=None) -> None:
        for path, tag in (internal or {}).values():
            self.internal_create(path, tag)
        if memfile and not os.path.exists(memfile):
            self.lost_memory.add(memfile)
            if os.path.exists(memfile + ".part"):
                fileio.unlink(memfile + ".part")

    def live_save(self, tag: str, paths: dict, vmstate: str) -> None:
        for path in paths.values():
            self.internal_create(path, tag)
        self.lost_memory.add(tag)


def _forgetting(fn):
    """A step: what was remembered about the images is forgotten before and after it."""
    def step(self, *args, **kwargs):
        self._forget()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self._forget()
    step.__name__ = fn.__name__
    step.__doc__ = fn.__doc__
    return step


for _name in ("create_overlay", "remove_file", "internal_create", "internal_apply",
              "internal_delete", "internal_to_overlay", "commit", "stream", "rebase", "repair",
              "resize"):
    setattr(OfflineBackend, _name, _forgetting(getattr(OfflineBackend, _name)))
