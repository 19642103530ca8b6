"""qcow2engine: a standalone qcow2 backing-chain engine.

The public API is imported lazily so that `import qcow2engine` stays cheap:

    from qcow2engine import open_image, open_chain, check
    with open_chain("disk.qcow2") as chain:
        data = chain.read(0, 4096)
        for e in chain.map():
            ...
"""
from __future__ import annotations

__version__ = "0.1.0"

_API = ("Session", "open_image", "open_chain", "check", "compare", "convert_to_raw",
        "convert_to_qcow2", "info", "create", "resize", "amend", "rebase", "commit", "stream",
        "snapshot_list", "snapshot_create", "snapshot_apply", "snapshot_delete")

__all__ = [*_API,
           "Qcow2Error", "InvalidImageError", "UnsupportedFeatureError", "CorruptImageError",
           "ImageInUseError", "ChainError", "SnapshotError", "JobError"]

from .errors import (Qcow2Error, InvalidImageError, UnsupportedFeatureError, CorruptImageError,
                     ImageInUseError, ChainError, SnapshotError, JobError)


def __getattr__(name):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
