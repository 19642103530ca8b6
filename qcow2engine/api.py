"""The Python API for embedding (what `import qcow2engine` exposes lazily)."""
from __future__ import annotations

from .chain.view import Chain


def open_image(path: str, *, writable: bool = False, force_share: bool = False):
    """Open one qcow2 file (no backing chain): header, snapshots, tables."""
    from .image.qcow2 import Qcow2Image
    return Qcow2Image(path, writable=writable, lock=not force_share)


def open_chain(path: str, fmt: str | None = None, *, writable: bool = False,
               force_share: bool = False, snapshot: str | None = None) -> Chain:
    """Open an image and its backing chain; read(), extents(), and with writable=True
    write(), write_zeroes(), discard() on the top image.  snapshot ("NAME",
    "snapshot.name=NAME", "snapshot.id=ID") gives the read-only view of that snapshot."""
    from .chain.view import open_chain as _open
    return _open(path, fmt, writable=writable, lock=not force_share, snapshot=snapshot)


def info(path: str, fmt: str | None = None, *, backing_chain: bool = False,
         force_share: bool = False):
    """qemu-img info documents (a dict, or a list with backing_chain=True)."""
    from .chain.session import walk_chain
    from .image.info import image_info
    files, _ = walk_chain(path, fmt, backing=backing_chain, lock=not force_share, for_io=False)
    try:
        docs = [image_info(f, path if i == 0 else f.path) for i, f in enumerate(files)]
    finally:
        for f in files:
            f.close()
    return docs if backing_chain else docs[0]


def check(path: str, repair: str | None = None, *, force_share: bool = False):
    """Check (and with repair="leaks" or "all", repair) a qcow2 image; a CheckResult."""
    from .image.qcow2 import Qcow2Image
    from .refcounts.check import check_image
    if repair:
        from .refcounts.repair import repair_image
        return repair_image(path, repair)
    img = Qcow2Image(path, lock=not force_share)
    try:
        return check_image(img, path)
    finally:
        img.close()


def compare(path1: str, path2: str, fmt1: str | None = None, fmt2: str | None = None,
            strict: bool = False):
    """Compare guest contents like qemu-img compare; a CompareResult."""
    from .chain.compare import compare_chains
    with open_chain(path1, fmt1) as a, open_chain(path2, fmt2) as b:
        return compare_chains(a, b, strict=strict)


def convert_to_raw(src: str, dst: str, fmt: str | None = None, progress=None) -> None:
    """The guest view of src into a sparse raw file dst."""
    from .chain.convert import convert_to_raw as _convert
    with open_chain(src, fmt) as chain:
        _convert(chain, dst, progress=progress)


def create(path: str, size: int | None = None, options=None, *, fmt: str = "qcow2",
           backing_file: str | None = None, backing_fmt: str | None = None):
    """Create an image like qemu-img create (options: dict or "k=v,k=v")."""
    from .image.create import create as _create
    return _create(path, size, options, fmt=fmt, backing_file=backing_file, backing_fmt=backing_fmt)


def resize(path: str, size: int, *, shrink: bool = False) -> None:
    """Change the virtual size of a qcow2 image (shrinking needs shrink=True)."""
    from .image.resize import resize_image
    resize_image(path, size, shrink=shrink)
