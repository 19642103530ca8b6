"""One open raw image file."""
from __future__ import annotations

import os

from ..errors import InvalidImageError


class RawFile:
    """An open raw image file."""
    format = "raw"

    def __init__(self, path: str, writable: bool = False, lock: bool = True):
        self.path = path
        self.writable = writable
        try:
            self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            raise InvalidImageError("Could not open '%s': %s" % (path, e.strerror)) from None
        self.locked = bool(lock)
        if lock:
            from ..host.locking import lock_for_read, lock_for_write
            try:
                (lock_for_write if writable else lock_for_read)(self.fd, path)
            except BaseException:
                os.close(self.fd)
                raise
        st = os.fstat(self.fd)
        self.file_size = st.st_size
        self.allocated_size = st.st_blocks * 512
        self.size = (st.st_size + 511) // 512 * 512

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def reopen_writable(self) -> None:
        """Turn a read-only open into a read-write one (same object, QEMU's write locks)."""
        if self.writable:
            return
        from ..host.locking import reopen_for_write
        fd = reopen_for_write(self.path, self.fd, locked=self.locked)
        os.close(self.fd)
        self.fd = fd
        self.writable = True
