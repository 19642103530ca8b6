"""The Python API for embedding (what `import qcow2engine` exposes lazily); the CLI's
handlers call these.  Every image is opened through a Session (chain/session.py)."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .chain.session import Session, open_chain as _open_chain, open_file
from .jobs import OpResult, Progress

if TYPE_CHECKING:
    from .chain.view import Chain

__all__ = ["Session", "open_image", "open_chain", "info", "check", "compare", "convert_to_raw",
           "convert_to_qcow2", "create", "resize", "amend", "rebase", "commit", "stream",
           "snapshot_create", "snapshot_apply", "snapshot_delete", "snapshot_list"]


def open_image(path: str, *, writable: bool = False, force_share: bool = False):
    """Open one qcow2 file (no backing chain): header, snapshots, tables.  A writable open
    repairs an image left dirty by a crash first."""
    return open_file(path, "qcow2", writable=writable, force_share=force_share)


def open_chain(path: str, fmt: str | None = None, *, writable: bool = False,
               force_share: bool = False, snapshot: str | None = None,
               passphrase: str | bytes | None = None, secrets=None) -> "Chain":
    """Open an image and its backing chain; read(), extents(), and with writable=True
    write(), write_zeroes(), discard() on the top image.  snapshot ("NAME",
    "snapshot.name=NAME", "snapshot.id=ID") gives the read-only view of that snapshot.
    A LUKS-encrypted top image opens with passphrase; secrets (a host.secrets.Secrets)
    can name the secret of each encrypted image of the chain instead."""
    if passphrase is not None:
        from .host.secrets import Secrets
        secrets = Secrets({"passphrase": passphrase})
        secrets.set_key_secret(path, "passphrase")
    return _open_chain(path, fmt, writable=writable, force_share=force_share, snapshot=snapshot,
                       secrets=secrets)


def info(path: str, fmt: str | None = None, *, backing_chain: bool = False,
         force_share: bool = False):
    """qemu-img info documents (a dict, or a list with backing_chain=True)."""
    from .image.info import image_info
    with Session(force_share=force_share) as s:
        files, _ = s.walk_chain(path, fmt, backing=backing_chain, for_io=False)
        docs = [image_info(f, path if i == 0 else f.path) for i, f in enumerate(files)]
    return docs if backing_chain else docs[0]


def check(path: str, repair: str | None = None, *, force_share: bool = False):
    """Check (and with repair="leaks" or "all", repair) a qcow2 image; a CheckResult."""
    from .refcounts.check import check_image
    if repair:
        from .refcounts.repair import repair_image
        return repair_image(path, repair)
    with Session(force_share=force_share) as s:
        return check_image(s.open_file(path, "qcow2"), path)


def compare(path1: str, path2: str, fmt1: str | None = None, fmt2: str | None = None,
            strict: bool = False):
    """Compare guest contents like qemu-img compare; a CompareResult."""
    from .chain.compare import compare_chains
    with open_chain(path1, fmt1) as a, open_chain(path2, fmt2) as b:
        return compare_chains(a, b, strict=strict)


def convert_to_raw(src: str, dst: str, fmt: str | None = None, progress: Progress | None = None,
                   cancel: threading.Event | None = None) -> OpResult:
    """The guest view of src into a sparse raw file dst."""
    from .chain.convert import convert_to_raw as _convert
    with open_chain(src, fmt) as chain:
        return _convert(chain, dst, progress=progress, cancel=cancel)


def convert_to_qcow2(src: str, dst: str, fmt: str | None = None, options=None, *,
                     compress: bool = False, progress: Progress | None = None,
                     cancel: threading.Event | None = None) -> OpResult:
    """The guest view of src into a new qcow2 image dst (options as for create)."""
    from .chain.convert import convert_to_qcow2 as _convert
    with open_chain(src, fmt) as chain:
        return _convert(chain, dst, options, compress=compress, progress=progress, cancel=cancel)


def backing_size_for_create(path: str, o) -> None:
    """Open the backing file named in create options o (relative to path) as qemu-img does,
    without locks; fill in o.size from it when none is given."""
    from .errors import ChainError, InvalidImageError
    from .host.paths import has_protocol, resolve_backing
    if has_protocol(o.backing_file):
        raise ChainError("Backing file '%s' uses a protocol prefix; refusing" % o.backing_file)
    try:
        with Session(force_share=True) as s:
            f = s.open_file(resolve_backing(path, o.backing_file), o.backing_fmt)
            if o.size is None:
                o.size = f.size
    except InvalidImageError as e:
        raise ChainError("Could not open backing image: %s" % e) from None


def create(path: str, size: int | None = None, options=None, *, fmt: str = "qcow2",
           backing_file: str | None = None, backing_fmt: str | None = None):
    """Create an image like `qemu-img create` (options: dict or "k=v,k=v"); returns the
    effective options.  Without a size, an image with a backing file takes its size."""
    from .errors import CreateError
    from .image.create import RAW_FORMATS, check_format, create_from_options, parse_options
    check_format(path, fmt)
    o = parse_options(options)
    if size is not None:
        o.size = size
    if backing_file is not None:
        o.backing_file = backing_file
    if backing_fmt is not None:
        o.backing_fmt = backing_fmt
    if fmt in RAW_FORMATS:
        if o.size is None:
            raise CreateError("Image creation needs a size parameter")
        create_from_options(path, o, fmt)
        return o
    if o.backing_file and not o.backing_fmt:
        raise CreateError("Backing file specified without backing format")
    if o.backing_file:
        backing_size_for_create(path, o)
    if o.size is None:
        raise CreateError("Image creation needs a size parameter")
    create_from_options(path, o)
    return o


def resize(path: str, size: int, *, shrink: bool = False, fmt: str | None = None) -> None:
    """Change the virtual size of an image (shrinking needs shrink=True)."""
    from .chain.ops import resize_chain
    with Session() as s:
        resize_chain(s.open_chain(path, fmt, writable=True), size, shrink=shrink)


def amend(path: str, options, *, force: bool = False, secrets=None) -> None:
    """Change options of a qcow2 image in place (compat, lazy_refcounts, refcount_bits, size;
    LUKS key slots with encrypt.state=active|inactive, encrypt.new-secret/old-secret/keyslot/
    iter-time, the image's own secret and the named ones from secrets, a
    host.secrets.Secrets, or the --object registry).  force: allow erasing the last key slot."""
    from .image.amend import amend_qcow2, parse_amend_options
    spec = parse_amend_options(options)
    with Session(secrets=secrets) as s:
        f = s.open_file(path, "qcow2", writable=True)
        if spec.encrypt_amend and f.encrypted:
            from .chain.session import unlock_image
            unlock_image(f, path, s.secrets)
        amend_qcow2(f, spec, secrets=s.secrets, force=force)


def rebase(path: str, backing: str | None, backing_fmt: str | None = None, *,
           unsafe: bool = False, progress: Progress | None = None,
           cancel: threading.Event | None = None) -> OpResult:
    """Change the backing file (safe: the guest view does not change)."""
    from .chain.ops import rebase as _rebase
    return _rebase(path, backing, backing_fmt, unsafe=unsafe, progress=progress, cancel=cancel)


def commit(path: str, base: str | None = None, *, drop: bool = False,
           progress: Progress | None = None, cancel: threading.Event | None = None) -> OpResult:
    """Merge path (and the layers above base) into base, like qemu-img commit."""
    from .chain.ops import commit as _commit
    return _commit(path, base, drop=drop, progress=progress, cancel=cancel)


def stream(path: str, base: str | None = None, *, progress: Progress | None = None,
           cancel: threading.Event | None = None) -> OpResult:
    """Pull the layers between path and base into path."""
    from .chain.ops import stream as _stream
    return _stream(path, base, progress=progress, cancel=cancel)


def snapshot_list(path: str, *, force_share: bool = False) -> list:
    """The internal snapshots of a qcow2 image (SnapshotEntry objects)."""
    with Session(force_share=force_share) as s:
        return list(s.open_file(path, "qcow2").snapshots)


def snapshot_create(path: str, name: str):
    """Create an internal snapshot (no VM state)."""
    from .image.snapshots import create_snapshot
    with Session() as s:
        return create_snapshot(s.open_file(path, "qcow2", writable=True), name)


def snapshot_apply(path: str, key: str):
    """Revert the image to an internal snapshot (by ID, then name)."""
    from .image.snapshots import apply_snapshot
    with Session() as s:
        return apply_snapshot(s.open_file(path, "qcow2", writable=True), key)


def snapshot_delete(path: str, name: str):
    """Delete an internal snapshot (by name)."""
    from .image.snapshots import delete_snapshot
    with Session() as s:
        return delete_snapshot(s.open_file(path, "qcow2", writable=True), name)
