"""Every write-side system call of the engine goes through here.

Keeping them in one module lets tests inject faults (an error or a simulated crash at the
N-th write or flush) by patching these functions; callers look them up at call time
(`fileio.pwrite(...)`).
"""
from __future__ import annotations

import os


def pwrite(fd: int, data, offset: int) -> None:
    """Write all of data at offset (loops over short writes)."""
    mv = memoryview(data).cast("B")
    done = 0
    n = len(mv)
    while done < n:
        w = os.pwrite(fd, mv[done:done + (1 << 30)], offset + done)
        if w <= 0:
            raise OSError(5, "short write")
        done += w


def fsync(fd: int) -> None:
    """A write barrier: data written before is on stable storage before anything after."""
    os.fdatasync(fd)


def ftruncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2); mode 0 allocates, FALLOC_FL_PUNCH_HOLE|KEEP_SIZE punches a hole."""
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if fn(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
