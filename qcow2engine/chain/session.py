"""The one opener: a Session opens each file once per inode, with one lock policy.

Every image the engine opens comes through a Session (the module functions `open_file`,
`walk_chain`, `open_chain` make a private one).  Within a session a file seen twice — the
base of a commit that is also in the top's chain, the same backing file under two names — is
one object: one set of cached tables, one allocator, one set of locks.  A file opened
read-only and asked for again writable is reopened read-write in place (the same object).

Lock policy, one spelling: a session locks every file as QEMU would (readers: shared
"consistent read", "write" not shared; writers: QEMU's write locks); `force_share=True`
(qemu-img's -U) opens read-only files without locks and refuses writable opens.  Every
writable qcow2 open repairs an image left dirty by a crash (lazy refcounts) before use.

Backing names (numpy-free, so `info` starts fast): a name is resolved relative to the
directory of the image that names it; protocol prefixes (`json:`, `nbd:` …) are refused;
loops and chains deeper than MAX_CHAIN_DEPTH are errors; a missing backing format is probed
(qcow2 magic, else raw) with a warning.
"""
from __future__ import annotations

import logging
import os

from ..errors import ChainError, InvalidImageError, UnsupportedFeatureError
from ..image.qcow2 import Qcow2Image, probe_is_qcow2
from ..image.raw import RawFile
from ..host.paths import has_protocol, resolve_backing  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

MAX_CHAIN_DEPTH = 256


def file_key(path: str) -> tuple:
    """(device, inode) of a path: what makes two names one file."""
    st = os.stat(path)
    return st.st_dev, st.st_ino



def close_all(closers) -> None:
    """Call every closer, even after one fails; the first error is raised at the end."""
    err = None
    for close in closers:
        try:
            close()
        except BaseException as e:     # noqa: BLE001 - close the rest, then raise
            err = err or e
    if err is not None:
        raise err

def unlock_image(f, path: str, secrets=None, top: str | None = None, depth: int = 0) -> None:
    """Give an encrypted (LUKS or legacy AES) image its data cipher, from the secret named for it
    (secrets: a host.secrets.Secrets, the process-wide default when None)."""
    if getattr(f, "cipher", None) is not None:
        return
    from ..format import constants as C
    if secrets is None:
        from ..host.secrets import DEFAULT as secrets
    if f.header.crypt_method == C.CRYPT_AES:
        # legacy AES: the key is the passphrase itself (no key check, as in QEMU)
        from ..image.qcowaes import unlock as aes_unlock
        from ..errors import InvalidRequestError
        key = secrets.passphrase_for(path, top, depth)
        try:
            f.cipher = aes_unlock(key, secrets.key_secret_for(path, top, depth) or "")
        except InvalidRequestError as e:
            from ..host.secrets import open_failed
            raise InvalidRequestError(open_failed(path, top, depth, str(e))) from None
        return
    from ..image.luks import unlock, UnlockError
    key = secrets.passphrase_for(path, top, depth)
    try:
        f.cipher = unlock(f, key)
    except UnlockError as e:
        from ..host.secrets import open_failed
        raise UnlockError(open_failed(path, top, depth, str(e))) from None


class Session:
    """Open images, once per inode, under one lock policy.  Use as a context manager, or
    call close(); files are handed out with a use count (`release` gives one back)."""

    def __init__(self, *, force_share: bool = False, secrets=None):
        self.force_share = force_share
        if secrets is None:
            from ..host.secrets import DEFAULT as secrets
        self.secrets = secrets            # a secrets.Secrets: ids -> bytes, image -> key id
        self._files: dict = {}            # (dev, ino) -> [file, uses]

    # ------------------------------------------------------------ files
    def open_file(self, path: str, fmt: str | None = None, *, writable: bool = False):
        """One image (a Qcow2Image or RawFile; format probed when fmt is None)."""
        if writable and self.force_share:
            raise InvalidImageError("force-share=on can only be used with read-only images")
        try:
            key = file_key(path)
        except OSError as e:
            raise InvalidImageError("Could not open '%s': %s" % (path, e.strerror)) from None
        slot = self._files.get(key)
        if slot is not None:
            f = slot[0]
            if fmt is not None and fmt != f.format:
                raise InvalidImageError("'%s' is already open as %s, not %s" % (path, f.format, fmt))
            if writable and not f.writable:
                f.reopen_writable()
                self._repair_if_dirty(f, path)
            slot[1] += 1
            return f
        if fmt is None:
            fmt = "qcow2" if probe_is_qcow2(path) else "raw"
        lock = not self.force_share
        if fmt == "qcow2":
            f = Qcow2Image(path, lock=lock, writable=writable)
            if writable:
                self._repair_if_dirty(f, path)
        elif fmt == "raw":
            f = RawFile(path, writable=writable, lock=lock)
        else:
            raise UnsupportedFeatureError("Unknown driver '%s'" % fmt)
        self._files[key] = [f, 1]
        return f

    def _unlock(self, f, path: str, top: str | None = None, depth: int = 0) -> None:
        unlock_image(f, path, self.secrets, top, depth)

    @staticmethod
    def _repair_if_dirty(f, path: str) -> None:
        if isinstance(f, Qcow2Image) and f.dirty:
            # left dirty by a crash (lazy refcounts): repair before the first write, as QEMU does
            try:
                from ..refcounts.repair import repair_open_image
                repair_open_image(f, "all", path)
            except BaseException:
                f.close()
                raise

    def release(self, f) -> None:
        """Give back one use of f; the last one closes it (flushed first when writable)."""
        for key, slot in list(self._files.items()):
            if slot[0] is f:
                slot[1] -= 1
                if slot[1] <= 0:
                    del self._files[key]
                    f.close()
                return
        f.close()

    def close(self) -> None:
        """Close every file still open (the first error is raised once all are closed)."""
        files, self._files = self._files, {}
        close_all(f.close for f, _ in files.values())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ chains
    def walk_chain(self, path: str, fmt: str | None = None, *, backing: bool = True,
                   for_io: bool = True, writable: bool = False):
        """Open an image and (with backing) every image below it.  Returns (files, warnings).
        Only the top image is opened writable.  With for_io, encrypted (LUKS) images are unlocked with
        their secret (secrets.Secrets)."""
        files = []
        warnings = []
        seen = set()
        cur_path, cur_fmt = path, fmt
        try:
            while True:
                if len(files) >= MAX_CHAIN_DEPTH:
                    raise ChainError("Backing chain of '%s' is deeper than %d images"
                                     % (path, MAX_CHAIN_DEPTH))
                try:
                    key = file_key(cur_path)
                except OSError as e:
                    if files:
                        raise ChainError("Could not open backing file '%s': %s"
                                         % (cur_path, e.strerror)) from None
                    raise InvalidImageError("Could not open '%s': %s"
                                            % (cur_path, e.strerror)) from None
                if key in seen:
                    raise ChainError("Backing file loop: '%s' appears twice in the chain of '%s'"
                                     % (cur_path, path))
                seen.add(key)
                f = self.open_file(cur_path, cur_fmt, writable=writable and not files)
                files.append(f)
                is_qcow2 = isinstance(f, Qcow2Image)
                if for_io and is_qcow2 and f.encrypted:
                    self._unlock(f, cur_path, path, len(files) - 1)
                if not backing or not is_qcow2 or not f.backing_file:
                    break
                name = f.backing_file
                if has_protocol(name):
                    raise ChainError("Backing file '%s' of '%s' uses a protocol prefix; refusing "
                                     "to follow it" % (name, cur_path))
                nxt = resolve_backing(cur_path, name)
                nfmt = f.backing_format
                if nfmt is not None and nfmt not in ("qcow2", "raw"):
                    raise UnsupportedFeatureError("Backing file format '%s' of '%s' is not "
                                                  "supported" % (nfmt, cur_path))
                if nfmt is None:
                    nfmt = "qcow2" if probe_is_qcow2(nxt) else "raw"
                    msg = "Backing file '%s' has no format; probed as %s" % (nxt, nfmt)
                    log.warning(msg)
                    warnings.append(msg)
                cur_path, cur_fmt = nxt, nfmt
        except BaseException:
            for f in files:
                self.release(f)
            raise
        return files, warnings

    def open_chain(self, path: str, fmt: str | None = None, *, backing: bool = True,
                   for_io: bool = True, writable: bool = False, snapshot: str | None = None):
        """An image and its whole backing chain as a Chain (relative names resolved per
        image).  With for_io (the default) encrypted layers are unlocked.  snapshot ("NAME",
        "snapshot.name=NAME" or "snapshot.id=ID"): the read-only guest view of that
        internal snapshot of the top image.  Closing the chain gives its files back."""
        from .view import make_chain
        files, warnings = self.walk_chain(path, fmt, backing=backing, for_io=for_io,
                                          writable=writable)
        try:
            return make_chain(files, warnings, self, path=path, snapshot=snapshot)
        except BaseException:
            for f in files:
                self.release(f)
            raise


# ---------------------------------------------------------------- one-shot opens
def open_file(path: str, fmt: str | None = None, *, writable: bool = False,
              force_share: bool = False):
    """Open one image in a session of its own (closing the file ends it)."""
    return Session(force_share=force_share).open_file(path, fmt, writable=writable)


def walk_chain(path: str, fmt: str | None = None, *, backing: bool = True,
               force_share: bool = False, for_io: bool = True, writable: bool = False):
    """Session(force_share).walk_chain(...): the files, closed by the caller."""
    return Session(force_share=force_share).walk_chain(path, fmt, backing=backing,
                                                        for_io=for_io, writable=writable)


def open_chain(path: str, fmt: str | None = None, *, backing: bool = True,
               force_share: bool = False, for_io: bool = True, writable: bool = False,
               snapshot: str | None = None, secrets=None):
    """An image and its backing chain in a session of its own (closing the chain ends it).
    secrets: a host.secrets.Secrets for encrypted layers (default: the process-wide one)."""
    s = Session(force_share=force_share, secrets=secrets)
    chain = s.open_chain(path, fmt, backing=backing, for_io=for_io, writable=writable,
                         snapshot=snapshot)
    chain.owns_session = True
    return chain
