"""How a backing file name becomes a path (QEMU's rules; no I/O)."""
from __future__ import annotations

import os


def has_protocol(name: str) -> bool:
    """True if a backing name uses a protocol prefix (a ':' before any '/'), as QEMU reads it."""
    return ":" in name.split("/", 1)[0]


def resolve_backing(image_path: str, backing: str) -> str:
    """The path of a backing file as QEMU forms it: relative names are joined to the image's dir."""
    if os.path.isabs(backing):
        return backing
    d = os.path.dirname(image_path)
    return os.path.join(d, backing) if d else backing
