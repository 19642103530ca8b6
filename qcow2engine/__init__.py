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

__all__ = ["open_image", "open_chain", "check", "compare", "convert_to_raw", "info", "create",
           "resize",
           "Qcow2Error", "InvalidImageError", "UnsupportedFeatureError", "CorruptImageError",
           "ImageInUseError", "ChainError", "SnapshotError", "JobError"]

from .errors import (Qcow2Error, InvalidImageError, UnsupportedFeatureError, CorruptImageError,
                     ImageInUseError, ChainError, SnapshotError, JobError)


def __getattr__(name):
    if name in ("open_image", "open_chain", "check", "compare", "convert_to_raw", "info", "create",
                "resize"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
