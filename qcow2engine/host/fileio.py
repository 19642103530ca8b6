"""Every write-side system call of the engine goes through here.

Keeping them in one module lets tests inject faults (an error or a simulated crash at the
N-th write or flush) by patching these functions; callers look them up at call time
(`fileio.pwrite(...)`).
"""
from __future__ import annotations

import errno
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


def copy_range(fd: int, offset: int, src_fd: int, src_offset: int, length: int) -> None:
    """Write length bytes at offset, copied inside the kernel from src_fd at src_offset
    (copy_file_range: no trip through user memory); past the end of the source: zeros.
    OSError EXDEV/EINVAL/ENOSYS/EOPNOTSUPP means "not possible here": write the bytes."""
    done = 0
    while done < length:
        n = os.copy_file_range(src_fd, fd, length - done, src_offset + done, offset + done)
        if n <= 0:
            pwrite(fd, bytes(length - done), offset + done)
            return
        done += n


COPY_UNSUPPORTED = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def fsync(fd: int) -> None:
    """A write barrier: data written before is on stable storage before anything after."""
    os.fdatasync(fd)


def ftruncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)


_libc = None


def _c():
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_uint]
    return _libc


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2); mode 0 allocates, FALLOC_FL_PUNCH_HOLE|KEEP_SIZE punches a hole."""
    import ctypes
    if _c().fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to start writing dirty pages of [offset, offset+length) (0: to the end
    of the file) to the device now, without waiting: a later flush then has less left to do.
    Not a barrier and not a write: errors surface at the next flush, so they are ignored."""
    try:
        _c().sync_file_range(fd, offset, length, 2)      # SYNC_FILE_RANGE_WRITE
    except (OSError, AttributeError):
        pass


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def db_commit(conn) -> None:
    """Commit a database transaction (the state database's one durability point)."""
    conn.commit()


def unlink(path: str) -> None:
    """Remove a file (a no-op when it is already gone: removal steps are redone after a crash)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
