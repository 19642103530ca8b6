"""Fault injection for qcow2engine's write path.

Every write-side system call of the engine goes through the module-level
functions of :mod:`qcow2engine.fileio` (``pwrite``, ``fsync`` -- also used
for fdatasync --, ``ftruncate`` and, when present, ``fallocate``), looked up
as ``fileio.NAME`` at call time.  This module replaces those functions for
the duration of a ``with`` block and makes the N-th call (0-based, counting
all of them together) fail:

``kind="error"``
    the call raises ``OSError(EIO)`` and does nothing; every other call goes
    through.  This is an I/O error the engine is expected to handle: its
    ``except``/``finally`` blocks run and may write more.

``kind="crash"``
    models a killed process inside the Python process: the call raises
    :class:`SimulatedCrash` (a ``BaseException``, so ``except Exception``
    does not swallow it), and *every* later fileio call raises it too, so
    nothing more reaches the disk even though ``finally`` blocks run.  When
    the block exits, every image file descriptor is "dropped": ``dup2``-ed
    over by ``/dev/null``, which releases its OFD locks exactly as process
    death would, while leaving the descriptor number valid so that a later
    ``os.close`` by a half-dead engine object cannot close an unrelated file.

``kind="lose-all"`` / ``kind="lose-some"``
    a power failure with a volatile device write cache: like "crash", and then every write
    (pwrite, copy_range, ftruncate, fallocate) made to a file since that file's last
    completed fsync/fdatasync is undone ("lose-all"), or a seeded random subset of them is
    ("lose-some": the device wrote the others back, in any order; of two or more, the
    newest is always kept and the oldest always lost; the file size is metadata journaled
    in order, so it is the size after the newest write).  Completed flushes
    are the only durability.  ``fail_at`` one past the last call means the power goes
    after the operation returned: what it left unflushed is lost.

``kind="kill"``
    the call does ``os._exit(137)``.  Only meaningful in a child process:
    see :func:`run_killed` (fork) and :func:`run_killed_script` (a fresh
    interpreter running a small script).

Other helpers: :func:`count_calls` / :func:`trace_calls` run an operation
with no failure and report the calls it made; :func:`injection_points`
chooses the indices to test (all of the first ``first``, a deterministic
sample of the rest, and always the last one).

While injecting, the ``os`` level write functions (``os.pwrite``,
``os.write``, ``os.ftruncate``, ``os.fsync``, ``os.fdatasync``,
``os.posix_fallocate``, ...) are watched too: a call on an image file that
does not come through a fileio function is recorded in
``Injector.bypasses`` (and, after a simulated crash, refused) -- such a call
would escape the fault injection.

Nothing here imports qcow2engine at import time; pass ``module=`` to test
against a stand-in.
"""
from __future__ import annotations

import errno
import gc
import importlib
import multiprocessing
import os
import random
import stat
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "FILEIO_MODULE", "FILEIO_FUNCS", "KILL_EXIT_CODE", "SimulatedCrash", "Call",
    "Injector", "inject", "count_calls", "trace_calls", "injection_points",
    "run_killed", "run_killed_script", "drop_fds", "open_fds_under",
    "exception_chain", "Outcome", "run_injected", "power_loss_points", "power_loss_failures",
]

FILEIO_MODULE = "qcow2engine.host.fileio"
# Patched when present (fdatasync in case the module grows one).
FILEIO_FUNCS = ("pwrite", "copy_range", "fsync", "fdatasync", "ftruncate", "fallocate",
                "unlink", "db_commit")
KILL_EXIT_CODE = 137

# os-level functions watched for calls that bypass the fileio module (the
# first argument is the fd -- or a path for os.truncate; the destination fd
# is the 2nd argument of copy_file_range and the 1st of sendfile).
_OS_WATCH = ("pwrite", "pwritev", "write", "writev", "ftruncate", "truncate",
             "fsync", "fdatasync", "posix_fallocate", "sync_file_range",
             "copy_file_range", "sendfile")


class SimulatedCrash(BaseException):
    """The process 'died' at an injected fileio call (see kind="crash")."""


@dataclass
class Call:
    """One fileio call as seen by the injector."""
    index: int
    name: str
    fd: int | None
    path: str | None
    offset: int | None = None
    length: int | None = None
    extra: str = ""

    def __str__(self) -> str:
        where = os.path.basename(self.path) if self.path else f"fd {self.fd}"
        if self.name == "pwrite":
            return f"#{self.index} pwrite({where}, {self.length} bytes @ {self.offset:#x})"
        if self.name == "copy_range":
            return f"#{self.index} copy_range({where}, {self.length} bytes @ {self.offset:#x})"
        if self.name == "ftruncate":
            return f"#{self.index} ftruncate({where}, {self.offset:#x})"
        if self.name == "fallocate":
            return (f"#{self.index} fallocate({where}, {self.extra}, "
                    f"{self.offset:#x}, {self.length:#x})")
        return f"#{self.index} {self.name}({where})"


def _fd_path(fd: Any) -> str | None:
    if not isinstance(fd, int):
        return None
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _describe(index: int, name: str, args: tuple, kwargs: dict) -> Call:
    fd = args[0] if args else kwargs.get("fd")
    c = Call(index, name, fd if isinstance(fd, int) else None, _fd_path(fd))
    try:
        if name == "pwrite":
            data = args[1] if len(args) > 1 else kwargs.get("data")
            c.length = len(memoryview(data).cast("B")) if data is not None else None
            c.offset = args[2] if len(args) > 2 else kwargs.get("offset")
        elif name == "copy_range":      # (fd, offset, src_fd, src_offset, length)
            c.offset = args[1] if len(args) > 1 else kwargs.get("offset")
            c.length = args[4] if len(args) > 4 else kwargs.get("length")
        elif name == "ftruncate":
            c.offset = args[1] if len(args) > 1 else kwargs.get("size", kwargs.get("length"))
        elif name == "fallocate":
            mode = args[1] if len(args) > 1 else kwargs.get("mode")
            c.extra = f"mode={mode:#x}" if isinstance(mode, int) else f"mode={mode}"
            c.offset = args[2] if len(args) > 2 else kwargs.get("offset")
            c.length = args[3] if len(args) > 3 else kwargs.get("length")
    except Exception:           # description only; never break the call
        pass
    return c


def _is_regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def _list_fds() -> set[int]:
    try:
        listed = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:              # pragma: no cover - Linux only project
        return set()
    out = set()
    for fd in listed:            # drop the fd listdir itself used (now closed)
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.add(fd)
    return out


def _fd_table() -> dict[int, str | None]:
    return {fd: _fd_path(fd) for fd in _list_fds()}


def _under(path: str, roots: Sequence[str]) -> bool:
    for r in roots:
        if path == r or path.startswith(r.rstrip("/") + "/"):
            return True
    return False


def open_fds_under(roots: Iterable[str | os.PathLike]) -> dict[int, str]:
    """Open regular-file descriptors of this process whose path is one of
    ``roots`` or lies under one of them (fd -> path)."""
    rs = [os.path.realpath(os.fspath(r)) for r in roots]
    out = {}
    for fd in sorted(_list_fds()):
        p = _fd_path(fd)
        if p and _under(p, rs) and _is_regular(fd):
            out[fd] = p
    return out


def drop_fds(fds: Iterable[int]) -> list[int]:
    """Make each fd point to /dev/null (``dup2``): the file's open file
    description loses this reference (its OFD locks go when the last one
    does) while the fd number stays valid for whoever closes it later."""
    dropped = []
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in fds:
            if fd == null:
                continue
            try:
                os.dup2(null, fd, inheritable=False)
                dropped.append(fd)
            except OSError:
                pass
    finally:
        os.close(null)
    return dropped


@dataclass
class _Write:
    """One write-side call on a file, with the bytes of [lo, hi) before and after it."""
    path: str
    name: str
    lo: int
    hi: int
    size_before: int
    before: bytes
    size_after: int = 0
    after: bytes = b""
    mode: int = 0                # fallocate's mode


def _pread_path(path: str, lo: int, hi: int) -> bytes:
    if hi <= lo:
        return b""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = bytearray()
        while len(out) < hi - lo:
            b = os.pread(fd, hi - lo - len(out), lo + len(out))
            if not b:
                break
            out += b
        return bytes(out)
    finally:
        os.close(fd)


class DeviceCache:
    """A disk's volatile write cache, per file: the writes since its last completed flush.
    :meth:`lose` puts the files back as the device could have left them at a power cut."""

    def __init__(self, seed: Any = 0) -> None:
        self.pending: dict[str, list[_Write]] = {}
        self.rng = random.Random(f"device-cache:{seed}")

    def before(self, call: Call) -> "_Write | str | None":
        path = call.path
        if not path:
            return None
        if call.name in ("fsync", "fdatasync"):
            return path
        size = os.fstat(call.fd).st_size
        if call.name in ("pwrite", "copy_range", "fallocate"):
            if call.offset is None or call.length is None:
                return None
            lo, hi = call.offset, call.offset + call.length
        elif call.name == "ftruncate":
            lo, hi = min(size, call.offset), max(size, call.offset)
        else:
            return None
        w = _Write(path, call.name, lo, hi, size, _pread_path(path, lo, min(hi, size)))
        if call.name == "fallocate":
            try:
                w.mode = int(call.extra.split("=", 1)[1], 0)
            except (IndexError, ValueError):
                w.mode = 0
        return w

    def after(self, rec: "_Write | str") -> None:
        if isinstance(rec, str):              # a completed flush: all before it is durable
            self.pending.pop(rec, None)
            return
        rec.size_after = os.stat(rec.path).st_size
        if rec.name in ("pwrite", "copy_range"):      # exactly the bytes this call set
            rec.after = _pread_path(rec.path, rec.lo, min(rec.hi, rec.size_after))
        self.pending.setdefault(rec.path, []).append(rec)

    def lose(self, some: bool) -> dict[str, int]:
        """Undo every pending write (some=False) or a random subset of them; returns how
        many were undone per file."""
        lost = {}
        for path, recs in self.pending.items():
            keep = [some and self.rng.random() < 0.5 for _ in recs]
            if some and len(recs) > 1:
                # the adversary's order: the newest write reached the platter, the oldest
                # did not (a later write that depends on an earlier one without a flush
                # between them is then caught every time)
                keep[0], keep[-1] = False, True
            if all(keep) or not os.path.exists(path):
                continue
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                for r in reversed(recs):          # back to the state of the last flush
                    if os.fstat(fd).st_size != r.size_before:
                        os.ftruncate(fd, r.size_before)
                    if r.before:
                        os.pwrite(fd, r.before, r.lo)
                for r, k in zip(recs, keep):      # then what the device did write back
                    if not k:
                        continue
                    if r.name == "ftruncate":
                        pass                      # sizes: below
                    elif r.name == "fallocate":
                        if r.mode & 0x12:                 # punch hole / zero range: zeros
                            end = min(r.hi, os.fstat(fd).st_size) if r.mode & 0x1 else r.hi
                            if end > r.lo:
                                os.pwrite(fd, bytes(end - r.lo), r.lo)
                        elif not r.mode & 0x1 and os.fstat(fd).st_size < r.hi:
                            os.ftruncate(fd, r.hi)        # plain allocation extends the file
                    elif r.after:
                        os.pwrite(fd, r.after, r.lo)
                if some:
                    # the file's size is file-system metadata, journaled in order: the
                    # journal reached the newest write (which the adversary always keeps)
                    os.ftruncate(fd, recs[-1].size_after)
            finally:
                os.close(fd)
            lost[path] = keep.count(False)
        self.pending.clear()
        return lost


class Injector:
    """Wraps the fileio functions; see :func:`inject`."""

    def __init__(self, fail_at: int | None, kind: str = "error", *,
                 module: ModuleType | str | None = None,
                 paths: Iterable[str | os.PathLike] | None = None,
                 err: int = errno.EIO, watch_os: bool = True, seed: Any = None) -> None:
        if kind not in ("error", "crash", "kill", "lose-all", "lose-some"):
            raise ValueError(f"unknown kind {kind!r}")
        self.cache = DeviceCache(seed=fail_at if seed is None else seed) \
            if kind.startswith("lose") else None
        self.lose_some = kind == "lose-some"
        self.lost: dict[str, int] = {}       # path -> writes undone (lose-* modes)
        if isinstance(module, str) or module is None:
            module = importlib.import_module(module or FILEIO_MODULE)
        self.module: ModuleType = module
        self.fail_at = fail_at
        self.kind = kind
        self.err = err
        self.paths = None if paths is None else [os.path.realpath(os.fspath(p)) for p in paths]
        self.watch_os = watch_os
        self.calls: list[Call] = []
        self.triggered: Call | None = None   # the call that failed
        self.crashed = False
        self.bypasses: list[str] = []        # os-level writes that skipped fileio
        self.dropped: list[int] = []         # fds dropped at exit (crash mode)
        self.patched: list[str] = []
        self._baseline: dict[int, str | None] = {}
        self._saved: dict[str, Any] = {}
        self._saved_os: dict[str, Any] = {}
        self._local = threading.local()
        self._lock = threading.RLock()
        self._active = False

    # -- bookkeeping -----------------------------------------------------
    @property
    def count(self) -> int:
        return len(self.calls)

    def _in_scope_fd(self, fd: Any) -> bool:
        if not isinstance(fd, int) or fd < 0:
            return False
        if self.paths is not None:
            p = _fd_path(fd)
            return bool(p) and _under(p, self.paths) and _is_regular(fd)
        return self._is_new(fd) and _is_regular(fd)

    def _in_scope_path(self, path: Any) -> bool:
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:
            return False
        if self.paths is not None:
            return _under(p, self.paths)
        return True

    def image_fds(self) -> dict[int, str]:
        """Open regular-file fds that belong to the operation: those under
        ``paths`` if given, else those opened since the block was entered
        plus those passed to a fileio call."""
        if self.paths is not None:
            return open_fds_under(self.paths)
        out = {}
        cand = {fd for fd in _list_fds() if self._is_new(fd)}
        cand |= {c.fd for c in self.calls if c.fd is not None}
        for fd in sorted(cand):
            p = _fd_path(fd)
            if p and not p.startswith("/dev/") and _is_regular(fd):
                out[fd] = p
        return out

    def leaked_fds(self) -> dict[int, str]:
        """Image fds still open now that were not open when the block was
        entered (call after the operation's objects are gone)."""
        return {fd: p for fd, p in self.image_fds().items() if self._is_new(fd)}

    def _is_new(self, fd: int) -> bool:
        """fd was not open when the block was entered (or now names another file)."""
        return fd not in self._baseline or self._baseline[fd] != _fd_path(fd)

    def drop(self) -> list[int]:
        """Drop every image fd (see :func:`drop_fds`)."""
        d = drop_fds(self.image_fds())
        self.dropped.extend(d)
        return d

    # -- the wrappers ----------------------------------------------------
    def _fail(self, call: Call):
        self.triggered = call
        if self.kind == "kill":
            os._exit(KILL_EXIT_CODE)
        if self.kind == "crash" or self.cache is not None:
            self.crashed = True
            raise SimulatedCrash(f"simulated crash at fileio call {call}")
        raise OSError(self.err, f"{os.strerror(self.err)} (injected at fileio call {call})")

    def _wrap(self, name: str, orig: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth:               # a fileio function calling another one
                return orig(*args, **kwargs)
            with self._lock:
                if self.crashed:
                    raise SimulatedCrash(f"fileio.{name} after the simulated crash")
                call = _describe(len(self.calls), name, args, kwargs)
                self.calls.append(call)
                if self.fail_at is not None and call.index == self.fail_at:
                    self._fail(call)
            self._local.depth = depth + 1
            rec = None
            if self.cache is not None and call.fd is not None and self._in_scope_fd(call.fd):
                rec = self.cache.before(call)
            try:
                out = orig(*args, **kwargs)
            finally:
                self._local.depth = depth
            if rec is not None:
                self.cache.after(rec)
            return out
        wrapper.__name__ = name
        wrapper.__wrapped__ = orig
        return wrapper

    def _wrap_os(self, name: str, orig: Callable) -> Callable:
        def watcher(*args, **kwargs):
            if not getattr(self._local, "depth", 0) and args:
                target = args[0]
                if name == "truncate" and not isinstance(target, int):
                    hit = self._in_scope_path(target)
                elif name in ("copy_file_range", "sendfile"):
                    # (src, dst, ...) for copy_file_range; (out, in, ...) for sendfile
                    dst = args[1] if name == "copy_file_range" and len(args) > 1 else target
                    hit = self._in_scope_fd(dst)
                else:
                    hit = self._in_scope_fd(target)
                if hit:
                    self.bypasses.append(f"os.{name} on {_fd_path(target) or target!r}")
                    if self.crashed:
                        raise SimulatedCrash(f"os.{name} after the simulated crash")
            return orig(*args, **kwargs)
        watcher.__name__ = name
        watcher.__wrapped__ = orig
        return watcher

    # -- context manager -------------------------------------------------
    def __enter__(self) -> "Injector":
        if self._active:
            raise RuntimeError("Injector is not re-entrant")
        self._baseline = _fd_table()
        for name in FILEIO_FUNCS:
            orig = getattr(self.module, name, None)
            if callable(orig):
                self._saved[name] = orig
                setattr(self.module, name, self._wrap(name, orig))
                self.patched.append(name)
        if not self.patched:
            raise RuntimeError(f"{self.module.__name__} defines none of {FILEIO_FUNCS}")
        if self.watch_os:
            for name in _OS_WATCH:
                orig = getattr(os, name, None)
                if callable(orig):
                    self._saved_os[name] = orig
                    setattr(os, name, self._wrap_os(name, orig))
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self._saved.items():
            setattr(self.module, name, orig)
        for name, orig in self._saved_os.items():
            setattr(os, name, orig)
        self._saved.clear()
        self._saved_os.clear()
        self._active = False
        if self.crashed:
            if self.cache is not None:
                self.lost = self.cache.lose(self.lose_some)
            self.drop()
        return None          # never swallow the exception

    def power_off(self) -> None:
        """The power goes now (lose-* kinds, after the operation returned): what is not
        flushed is lost, the files are dropped."""
        self.crashed = True
        if self.cache is not None:
            self.lost = self.cache.lose(self.lose_some)
        self.drop()


def inject(fail_at: int | None, kind: str = "error", *,
           module: ModuleType | str | None = None,
           paths: Iterable[str | os.PathLike] | None = None,
           err: int = errno.EIO, watch_os: bool = True, seed: Any = None) -> Injector:
    """Context manager: make the ``fail_at``-th fileio call (0-based,
    counting pwrite/fsync/ftruncate/fallocate together) fail.

    ``fail_at=None`` only records the calls.  ``paths`` (files or
    directories) says which open files are "the image" for fd dropping,
    leak and bypass detection; without it, files opened inside the block
    and fds passed to fileio calls are.  The yielded :class:`Injector`
    records ``calls``, ``triggered``, ``crashed``, ``bypasses``, ``dropped``.
    """
    return Injector(fail_at, kind, module=module, paths=paths, err=err, watch_os=watch_os,
                    seed=seed)


def trace_calls(fn: Callable[[], Any], *, module: ModuleType | str | None = None,
                paths: Iterable[str | os.PathLike] | None = None) -> list[Call]:
    """Run ``fn()`` with nothing failing; return the fileio calls it made."""
    with inject(None, module=module, paths=paths) as inj:
        fn()
    return inj.calls


def count_calls(fn: Callable[[], Any], *, module: ModuleType | str | None = None,
                paths: Iterable[str | os.PathLike] | None = None) -> int:
    """How many fileio calls ``fn()`` makes."""
    return len(trace_calls(fn, module=module, paths=paths))


def exception_chain(e: BaseException | None):
    """e, then its cause or context, and so on."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


@dataclass
class Outcome:
    """How an operation ended under one injected fault (see :func:`run_injected`)."""
    injector: "Injector"
    succeeded: bool             # returned normally and did not report a failure
    problems: list


def run_injected(op: Callable[[], Any], fail_at: int, kind: str, *, paths,
                 baseline: int, reported_failure: Callable[[Any], bool] | None = None,
                 any_eio_must_surface: bool = False) -> Outcome:
    """Run op() with the fileio call fail_at failing (kind "error" or "crash") and judge
    how it ended.  Problems: the fault never came (fewer calls than the baseline), a crash
    that did not end the operation or ended it with another exception, an exception not
    caused by the injected EIO, an EIO swallowed (of a flush; of any call with
    any_eio_must_surface), fds left open after an error, writes that bypassed fileio."""
    exc: BaseException | None = None
    result = None
    lose = kind.startswith("lose")
    with inject(fail_at, kind, paths=paths) as inj:
        try:
            result = op()
        except (SimulatedCrash, Exception) as e:     # noqa: BLE001 - judged below
            exc = e
    if lose and fail_at >= baseline and exc is None:
        gc.collect()                     # the operation's objects closed their files
        inj.power_off()
        succeeded = not (reported_failure and reported_failure(result))
        probs = [f"writes bypassing fileio: {inj.bypasses[:3]}"] if inj.bypasses else []
        return Outcome(inj, succeeded, probs)
    chain = list(exception_chain(exc))
    desc = [repr(x) for x in chain]
    injected = any(isinstance(x, OSError) and x.errno == errno.EIO for x in chain)
    succeeded = not chain and not (reported_failure and reported_failure(result))
    crash_first = bool(chain) and isinstance(chain[0], SimulatedCrash)
    del exc, result, chain
    gc.collect()
    probs: list[str] = []
    if inj.triggered is None:
        probs.append(f"only {inj.count} fileio calls this time (baseline {baseline})"
                     + (f", raising {desc[0]}" if desc else ""))
    elif kind == "crash" or lose:
        if not desc:
            probs.append("the SimulatedCrash was swallowed: the operation returned normally")
            succeeded = True
        elif not crash_first:
            probs.append(f"{desc[0]} raised instead of the SimulatedCrash")
    else:
        if desc and not injected:
            probs.append(f"unexpected exception {desc[0]} (the injected EIO is not in its "
                         f"cause chain)")
        if succeeded and (any_eio_must_surface or inj.triggered.name in ("fsync", "fdatasync")):
            # (an EIO elsewhere may be worked around -- e.g. zeroing by writes when
            # fallocate fails -- the caller then checks for exactly the new state)
            probs.append(f"the injected EIO at {inj.triggered} was swallowed: the operation "
                         f"reported success")
        leaked = inj.leaked_fds()
        if leaked:
            probs.append(f"fds left open after the error: {sorted(leaked.values())}")
            inj.drop()
    if inj.bypasses:
        probs.append(f"writes bypassing fileio: {inj.bypasses[:3]}")
    return Outcome(inj, succeeded, probs)


def injection_points(n: int, first: int = 40, sample: int = 20, seed: int = 0) -> list[int]:
    """Indices to inject at for an operation making ``n`` calls: all of the
    first ``first``, a deterministic sample of ``sample`` of the rest, and
    the last one."""
    if n <= first + sample:
        return list(range(n))
    rest = range(first, n - 1)
    picked = random.Random(f"{seed}:{n}").sample(rest, min(sample, len(rest)))
    return sorted(set(range(first)) | set(picked) | {n - 1})


def power_loss_points(calls: Sequence[Call], flushes: int = 12, others: int = 4,
                      seed: int = 0) -> list[int]:
    """Where to cut the power for an operation that made ``calls``: at its flushes (the
    moments with the most writes pending; a deterministic sample of ``flushes`` of them,
    the last always), at ``others`` other calls, and one past the last call (after the
    operation returned)."""
    n = len(calls)
    rng = random.Random(f"power:{seed}:{n}")
    fl = [c.index for c in calls if c.name in ("fsync", "fdatasync")]
    pick = set(fl if len(fl) <= flushes else rng.sample(fl[:-1], flushes - 1) + fl[-1:])
    rest = [c.index for c in calls if c.index not in set(fl)]
    pick |= set(rng.sample(rest, min(others, len(rest))))
    return sorted(pick | {n})


def power_loss_failures(calls: Sequence[Call], run_point: Callable[[int], list],
                        flushes: int = 12, others: int = 4) -> tuple[list[int], list]:
    """run_point(i) at every power_loss_points of calls: (the points, all the problems)."""
    points = power_loss_points(calls, flushes, others)
    failures: list = []
    for i in points:
        failures += run_point(i)
    return points, failures


# --------------------------------------------------------------------------
# Real process death
# --------------------------------------------------------------------------

def _child(fn: Callable[[], Any], fail_at: int, module: str, paths) -> None:
    try:
        with inject(fail_at, "kill", module=module, paths=paths):
            fn()
    except BaseException:       # the operation failed without being killed
        os._exit(1)
    os._exit(0)


def run_killed(fn: Callable[[], Any], fail_at: int, *, module: str = FILEIO_MODULE,
               paths: Iterable[str | os.PathLike] | None = None,
               timeout: float = 60) -> int:
    """Run ``fn()`` in a forked child that calls ``os._exit(137)`` at its
    ``fail_at``-th fileio call; return the child's exit code (137 killed,
    0 finished without reaching that call, 1 raised)."""
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_child, args=(fn, fail_at, module,
                                         None if paths is None else [os.fspath(x) for x in paths]))
    p.start()
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise TimeoutError(f"child did not finish in {timeout}s")
    return p.exitcode


_BOOTSTRAP_HEAD = """\
import os, sys
sys.path.insert(0, %r)
from tests.helpers.faultinject import inject
_inj = inject(int(sys.argv[1]), "kill", module=%r)
_inj.__enter__()
try:
"""
_BOOTSTRAP_TAIL = """\
except SystemExit as e:
    os._exit(e.code if isinstance(e.code, int) else 1)
except BaseException:
    import traceback; traceback.print_exc()
    os._exit(1)
os._exit(0)
"""


def run_killed_script(script: str, fail_at: int, *, module: str = FILEIO_MODULE,
                      cwd: str | os.PathLike | None = None, timeout: float = 60,
                      env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` (Python source) in a fresh interpreter whose
    ``fail_at``-th fileio call does ``os._exit(137)``; ``SystemExit(n)``
    from the script exits with n.  Returns the CompletedProcess."""
    tests_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    body = textwrap.indent(textwrap.dedent(script).strip("\n") + "\n", "    ")
    code = _BOOTSTRAP_HEAD % (tests_parent, module) + body + "    pass\n" + _BOOTSTRAP_TAIL
    return subprocess.run([sys.executable, "-c", code, str(fail_at)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
