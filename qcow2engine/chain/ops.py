"""Backing-chain operations offline: rebase (safe and unsafe), commit, stream.

Each is a plan (computed without writing: what a journal records) and a run.  Every data
movement goes through the crash-safe write path a window at a time (copy.py), and the guest
view of the chain is the same before, during and after the operation; backing pointers
change only at the end, with one write of the header cluster.  A run reports progress as
progress(done_bytes, total_bytes) and stops at the next window boundary when its cancel
event is set: the result then says "cancelled", every image is valid, the guest view is
unchanged (a cancelled commit has written part of the top into the base, as QEMU's does),
and running the same plan again completes it.

All files of one operation are opened in one Session: a file seen twice (the base of a
commit is in the top's chain too) is one object, with one cache and one allocator.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from ..errors import ChainError, JobCancelled, UnsupportedFeatureError
from ..format import entries as E
from ..host.paths import has_protocol, resolve_backing
from ..image.metadata import set_backing
from ..jobs import CANCELLED, COMPLETED, OpResult, Progress
from .copy import copy_into, rebase_copy, runs_of
from .session import Session, file_key
from .view import Chain


# ---------------------------------------------------------------- rebase / stream
@dataclass(frozen=True)
class RebasePlan:
    """Point `path` at `backing` (None: no backing); safe mode copies where they differ."""
    path: str
    backing: str | None
    backing_fmt: str | None
    unsafe: bool
    backing_before: str | None
    op: str = "rebase"


def plan_rebase(path: str, backing: str | None, backing_fmt: str | None = None, *,
                unsafe: bool = False, op: str = "rebase") -> RebasePlan:
    """Check a rebase and describe it (nothing is written)."""
    backing = backing or None
    if backing and not backing_fmt:
        # refused before anything is copied (qemu-img 7.2 refuses only after the copy)
        raise ChainError("backing format must be specified (-F)")
    if backing and has_protocol(backing):
        raise ChainError("Backing file '%s' uses a protocol prefix; refusing" % backing)
    if backing_fmt not in (None, "qcow2", "raw"):
        raise UnsupportedFeatureError("Unknown driver '%s'" % backing_fmt)
    with Session(force_share=True) as s:
        img = s.open_file(path, "qcow2")
        before = img.backing_file
    if backing and not unsafe and _same_file(resolve_backing(path, backing), path):
        raise ChainError("Cannot rebase '%s' onto itself" % path)
    return RebasePlan(path, backing, backing_fmt if backing else None, unsafe, before, op)


def run_rebase(plan: RebasePlan, *, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> OpResult:
    """Carry out a rebase plan."""
    done = 0
    with Session() as s:
        if plan.unsafe:
            img = s.open_file(plan.path, "qcow2", writable=True)
            set_backing(img, plan.backing, plan.backing_fmt)
        else:
            top = s.open_chain(plan.path, "qcow2", writable=True)
            new = None
            if plan.backing:
                new = s.open_chain(resolve_backing(plan.path, plan.backing), plan.backing_fmt)
            try:
                done = rebase_copy(top, new, progress, cancel)
            except JobCancelled:
                return OpResult(plan.op, CANCELLED, (plan.path,), plan.backing_before,
                                plan.backing_before, done)
            set_backing(top.top.image, plan.backing, plan.backing_fmt)
    return OpResult(plan.op, COMPLETED, (plan.path,), plan.backing_before, plan.backing, done)


def rebase(path: str, backing: str | None, backing_fmt: str | None = None, *,
           unsafe: bool = False, progress: Progress | None = None,
           cancel: threading.Event | None = None) -> OpResult:
    """Change the backing file of path.  Safe mode first copies into path every range where
    the old and the new backing files differ, so the guest view does not change."""
    return run_rebase(plan_rebase(path, backing, backing_fmt, unsafe=unsafe),
                      progress=progress, cancel=cancel)


def plan_stream(path: str, base: str | None = None) -> RebasePlan:
    """Streaming is a safe rebase onto base (a name in path's chain) or onto nothing."""
    with Session(force_share=True) as s:
        chain = s.open_chain(path, "qcow2")
        if base is None:
            new_name, new_fmt = None, None
        else:
            layer = chain.layers[find_in_chain(chain, path, base)]
            new_fmt = layer.format
            if os.path.isabs(base):
                new_name = base
            else:
                new_name = os.path.relpath(layer.path, os.path.dirname(os.path.abspath(path)))
    return plan_rebase(path, new_name, new_fmt, op="stream")


def stream(path: str, base: str | None = None, *, progress: Progress | None = None,
           cancel: threading.Event | None = None) -> OpResult:
    """Pull into path the data of the layers between it and base (all of them by default),
    then point path at base (or at nothing).  The guest view never changes."""
    return run_rebase(plan_stream(path, base), progress=progress, cancel=cancel)


# ---------------------------------------------------------------- commit
@dataclass(frozen=True)
class CommitPlan:
    """Write the layers of `top` above `base` (depth `depth` in its chain) into base; then
    empty top unless drop."""
    top: str
    base: str
    base_fmt: str
    depth: int
    drop: bool
    grow_to: int | None          # base is shorter than top: grown to this size first
    op: str = "commit"


def plan_commit(path: str, base: str | None = None, *, drop: bool = False) -> CommitPlan:
    """Find the base (by default the immediate backing file) and describe the commit."""
    with Session(force_share=True) as s:
        chain = s.open_chain(path, "qcow2")
        if len(chain.layers) < 2:
            raise ChainError("Image does not have a backing file")
        k = 1
        if base is not None:
            k = find_in_chain(chain, path, base)
            drop = True
        b = chain.layers[k]
        grow = chain.size if b.size < chain.size else None
        return CommitPlan(path, b.path, b.format, k, drop, grow)


def run_commit(plan: CommitPlan, *, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> OpResult:
    """Carry out a commit plan."""
    done = 0
    written = (plan.base,) if plan.drop else (plan.base, plan.top)
    with Session() as s:
        # the base first, writable: the top's chain then shares that one object
        dst = s.open_chain(plan.base, plan.base_fmt, writable=True)
        top = s.open_chain(plan.top, "qcow2", writable=not plan.drop)
        if file_key(top.layers[plan.depth].path) != file_key(plan.base):
            raise ChainError("'%s' is no longer in the backing chain of '%s'"
                             % (plan.base, plan.top))
        if plan.grow_to is not None and dst.size < plan.grow_to:
            resize_chain(dst, plan.grow_to)
        src = Chain(top.layers[:plan.depth])
        total = top.size
        try:
            for ex in src.iter_extents(0, top.size):
                # only what the layers above the base hold; the rest already reads from it
                above = E.ALLOCATED_KINDS[ex.kinds]
                zero = above & E.ZERO_KINDS[ex.kinds]
                done = copy_into(dst, top, runs_of(above & ~zero, ex.starts, ex.ends),
                                 runs_of(zero, ex.starts, ex.ends), progress, total, done, cancel)
        except JobCancelled:
            return OpResult(plan.op, CANCELLED, written, None, None, done, plan.base)
        dst.flush()
        if not plan.drop:
            top.writer().make_empty()
    return OpResult(plan.op, COMPLETED, written, None, None, done, plan.base)


def resize_chain(chain: Chain, size: int, *, shrink: bool = False) -> None:
    """Resize the top image of chain (opened writable); growing over a longer backing file
    makes the new part read as zeros, as QEMU does."""
    from ..image.resize import resize_qcow2, resize_raw
    f = chain.top.file
    if f.format == "qcow2":
        backing = chain.layers[1].size if len(chain.layers) > 1 else 0
        if backing <= f.size or size <= f.size:
            resize_qcow2(f, size, shrink=shrink)
            return
        # the zeros that hide the longer backing file are no guest write: QEMU's dirty
        # bitmaps do not see them, ours do not either
        writer = chain.writer()
        saved, writer.bitmaps = writer.bitmaps, None
        try:
            resize_qcow2(f, size, shrink=shrink, backing_size=backing,
                         write_zeroes=chain.write_zeroes)
        finally:
            writer.bitmaps = saved
    else:
        resize_raw(f, size, shrink=shrink)


def commit(path: str, base: str | None = None, *, drop: bool = False,
           progress: Progress | None = None, cancel: threading.Event | None = None) -> OpResult:
    """Write the data of path (and of the layers between it and base) into base — by default
    its immediate backing file — and, unless drop (or base given), empty path afterwards.
    The result's `target` is the base's path."""
    return run_commit(plan_commit(path, base, drop=drop), progress=progress, cancel=cancel)


# ---------------------------------------------------------------- names in a chain
def _same_file(a: str, b: str) -> bool:
    try:
        return file_key(a) == file_key(b)
    except OSError:
        return False



def find_in_chain(chain: Chain, path: str, name: str) -> int:
    """Depth of the layer that name designates, as qemu-img matches -b: the name stored in
    the image above it, or a path (relative to the current directory or to that image)."""
    keys = {}
    for cand in (name, resolve_backing(path, name)):
        try:
            keys[file_key(cand)] = True
        except OSError:
            pass
    for d, layer in enumerate(chain.layers[1:], start=1):
        above = chain.layers[d - 1]
        stored = getattr(getattr(above, "image", None), "backing_file", None)
        if stored == name:
            return d
        try:
            keys.setdefault(file_key(resolve_backing(above.path, name)), True)
        except OSError:
            pass
        if file_key(layer.path) in keys:
            return d
    raise ChainError("'%s' is not in the backing chain of '%s'" % (name, path))
