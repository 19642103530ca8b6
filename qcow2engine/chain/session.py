"""Resolving backing chains without touching guest data (numpy-free, so `info` starts fast).

A backing name is resolved relative to the directory of the image that names it; protocol
prefixes (`json:`, `nbd:` …) are refused; loops and chains deeper than MAX_CHAIN_DEPTH are
errors; a missing backing format is probed (qcow2 magic, else raw) with a warning.
"""
from __future__ import annotations

import logging
import os

from ..errors import ChainError, InvalidImageError, UnsupportedFeatureError
from ..image.qcow2 import Qcow2Image, probe_is_qcow2

log = logging.getLogger(__name__)

MAX_CHAIN_DEPTH = 256


def has_protocol(name: str) -> bool:
    """True if a backing name uses a protocol prefix (a ':' before any '/'), as QEMU reads it."""
    return ":" in name.split("/", 1)[0]


def resolve_backing(image_path: str, backing: str) -> str:
    """The path of a backing file as QEMU forms it: relative names are joined to the image's dir."""
    if os.path.isabs(backing):
        return backing
    d = os.path.dirname(image_path)
    return os.path.join(d, backing) if d else backing


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


def open_file(path: str, fmt: str | None, *, lock: bool = True, writable: bool = False):
    """Open one image: a Qcow2Image or a RawFile (format probed when fmt is None)."""
    if fmt is None:
        if not os.path.exists(path):
            raise InvalidImageError("Could not open '%s': No such file or directory" % path)
        fmt = "qcow2" if probe_is_qcow2(path) else "raw"
    if fmt == "qcow2":
        img = Qcow2Image(path, lock=lock, writable=writable)
        if writable and img.dirty:
            # left dirty by a crash (lazy refcounts): repair before the first write, as QEMU does
            try:
                from ..refcounts.repair import repair_open_image
                repair_open_image(img, "all", path)
            except BaseException:
                img.close()
                raise
        return img
    if fmt == "raw":
        return RawFile(path, writable=writable, lock=lock)
    raise UnsupportedFeatureError("Unknown driver '%s'" % fmt)


def walk_chain(path: str, fmt: str | None = None, *, backing: bool = True, lock: bool = True,
               for_io: bool = True, writable: bool = False):
    """Open an image and (with backing) every image below it.  Returns (files, warnings).

    Only the top image is opened writable.  With for_io, encrypted images are refused.
    lock=True locks every image as QEMU would; lock="top" only the top one.
    """
    if writable and lock is False:
        raise InvalidImageError("force-share=on can only be used with read-only images")
    files = []
    warnings = []
    seen = set()
    cur_path, cur_fmt = path, fmt
    try:
        while True:
            if len(files) >= MAX_CHAIN_DEPTH:
                raise ChainError("Backing chain of '%s' is deeper than %d images" % (path, MAX_CHAIN_DEPTH))
            try:
                st = os.stat(cur_path)
            except OSError as e:
                if files:
                    raise ChainError("Could not open backing file '%s': %s" % (cur_path, e.strerror)) from None
                raise InvalidImageError("Could not open '%s': %s" % (cur_path, e.strerror)) from None
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ChainError("Backing file loop: '%s' appears twice in the chain of '%s'" % (cur_path, path))
            seen.add(key)
            f = open_file(cur_path, cur_fmt, lock=(lock is True) or (lock == "top" and not files),
                          writable=writable and not files)
            files.append(f)
            is_qcow2 = isinstance(f, Qcow2Image)
            if for_io and is_qcow2 and f.encrypted:
                raise UnsupportedFeatureError(
                    "'%s' is encrypted; reading encrypted images is not supported" % cur_path)
            if not backing or not is_qcow2 or not f.backing_file:
                break
            name = f.backing_file
            if has_protocol(name):
                raise ChainError("Backing file '%s' of '%s' uses a protocol prefix; refusing to follow it"
                                 % (name, cur_path))
            nxt = resolve_backing(cur_path, name)
            nfmt = f.backing_format
            if nfmt is not None and nfmt not in ("qcow2", "raw"):
                raise UnsupportedFeatureError("Backing file format '%s' of '%s' is not supported"
                                              % (nfmt, cur_path))
            if nfmt is None:
                nfmt = "qcow2" if probe_is_qcow2(nxt) else "raw"
                msg = "Backing file '%s' has no format; probed as %s" % (nxt, nfmt)
                log.warning(msg)
                warnings.append(msg)
            cur_path, cur_fmt = nxt, nfmt
    except BaseException:
        for f in files:
            f.close()
        raise
    return files, warnings
