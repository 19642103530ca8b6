"""Hashes of files and trees (has a file changed, is a tree the same?)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256", "tree_hashes"]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_hashes(d: str | os.PathLike) -> dict[str, str]:
    """{path relative to d: sha256} of every file under d (sub-folders included)."""
    d = Path(d)
    return {str(p.relative_to(d)): file_sha256(p) for p in sorted(d.rglob("*")) if p.is_file()}
