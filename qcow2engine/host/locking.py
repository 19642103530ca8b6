"""QEMU-compatible image locking with OFD byte-range locks.

QEMU (block/file-posix.c behaviour, documented in our notes) holds a shared lock on byte
100+i for every permission it takes and on byte 200+i for every permission it does not
share with others; i: 0 consistent read, 1 write, 2 write unchanged, 3 resize.
"""
from __future__ import annotations

import fcntl
import os
import struct

from ..errors import ImageInUseError

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
ALL_PERMS = (0, 1, 2, 3)

LOCK_BASE_PERM = 100
LOCK_BASE_SHARED = 200

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"


def _lock(fd: int, op: int, start: int, ltype: int) -> bytes:
    return fcntl.fcntl(fd, op, struct.pack(_FLOCK, ltype, os.SEEK_SET, start, 1, 0))


def _held_by_other(fd: int, byte: int) -> bool:
    res = _lock(fd, F_OFD_GETLK, byte, fcntl.F_WRLCK)
    return struct.unpack(_FLOCK, res)[0] != fcntl.F_UNLCK


def apply_locks(fd: int, perms: set, unshared: set, path: str) -> None:
    """Take QEMU's lock bytes for `perms` held and `unshared` permissions; raise on conflict."""
    for p in sorted(perms):
        if _held_by_other(fd, LOCK_BASE_SHARED + p):
            raise ImageInUseError('Failed to get "%s" lock: is another process using the image '
                                  '[%s]?' % (PERM_NAMES[p], path))
    for p in sorted(unshared):
        if _held_by_other(fd, LOCK_BASE_PERM + p):
            raise ImageInUseError('Failed to get shared "%s" lock: is another process using the '
                                  'image [%s]?' % (PERM_NAMES[p], path))
    try:
        for p in perms:
            _lock(fd, F_OFD_SETLK, LOCK_BASE_PERM + p, fcntl.F_RDLCK)
        for p in unshared:
            _lock(fd, F_OFD_SETLK, LOCK_BASE_SHARED + p, fcntl.F_RDLCK)
    except OSError as e:
        raise ImageInUseError("Failed to lock image [%s]: %s" % (path, e.strerror)) from None


def lock_for_read(fd: int, path: str) -> None:
    """Read-only consumer that must see consistent data: no writer may share the image."""
    apply_locks(fd, {PERM_CONSISTENT_READ}, {PERM_WRITE}, path)


def lock_for_write(fd: int, path: str) -> None:
    """Exclusive writer, like a qemu-img command that modifies the image."""
    apply_locks(fd, {PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE},
                {PERM_WRITE, PERM_RESIZE}, path)


def upgrade_lock(old_fd: int, new_fd: int, path: str, *, locked: bool = True) -> None:
    """Move a reader's locks (on old_fd) to a writer's (on new_fd, a new description of the
    same file): the reader's own "write not shared" byte would block the writer, so it is
    released first and taken back if the writer's locks cannot be had.  With locked=False
    the reader held no locks (force-share) and new_fd simply takes the writer's."""
    if not locked:
        lock_for_write(new_fd, path)
        return
    byte = LOCK_BASE_SHARED + PERM_WRITE
    _lock(old_fd, F_OFD_SETLK, byte, fcntl.F_UNLCK)
    try:
        lock_for_write(new_fd, path)
    except BaseException:
        try:
            _lock(old_fd, F_OFD_SETLK, byte, fcntl.F_RDLCK)
        except OSError:
            pass
        raise


def reopen_for_write(path: str, old_fd: int, *, locked: bool) -> int:
    """A new read-write file description of path that takes over a reader's locks from
    old_fd (upgrade_lock); the caller closes old_fd.  Nothing changes on failure."""
    from ..errors import InvalidImageError
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidImageError("Could not open '%s': %s" % (path, e.strerror)) from None
    try:
        upgrade_lock(old_fd, fd, path, locked=locked)
    except BaseException:
        os.close(fd)
        raise
    return fd


def held_by_other(path: str) -> bool:
    """Does another open file description (a running QEMU, say) hold any of QEMU's lock
    bytes on path?  Opens the file read-only and takes nothing."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return any(_held_by_other(fd, LOCK_BASE_PERM + p) or
                   _held_by_other(fd, LOCK_BASE_SHARED + p) for p in PERM_NAMES)
    finally:
        os.close(fd)
