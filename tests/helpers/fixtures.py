"""pytest fixtures shared across the test folders (registered in tests/conftest.py)."""
from __future__ import annotations

import os

import pytest

__all__ = ["variant_images", "no_disk_flush"]


@pytest.fixture(scope="session")
def variant_images(tmp_path_factory):
    """name -> (Variant, path of its top image) for the image variants of
    tests/helpers/images.py, each built on first use, once per session (do not modify)."""
    from tests.helpers.images import VARIANTS_BY_NAME
    root = tmp_path_factory.mktemp("variants")
    failed: dict[str, BaseException] = {}

    class Built(dict):
        def directory(self, name: str):
            """The folder holding variant name's image and its backing / data files."""
            self[name]                  # built on first use
            return root / name

        def __missing__(self, name: str):
            if name in failed:
                raise RuntimeError(f"building variant {name} failed earlier") from failed[name]
            v = VARIANTS_BY_NAME[name]
            d = root / name
            d.mkdir()
            try:
                self[name] = (v, v.build(d))
            except BaseException as e:
                failed[name] = e
                raise
            return self[name]
    return Built()


def _fsync_fd_check_only(fd: int) -> None:
    os.fstat(fd)                 # EBADF still surfaces; the data is not forced to disk


@pytest.fixture
def no_disk_flush(monkeypatch):
    """fdatasync costs tens of ms on the test machine's disk and durability against power
    loss is not what the tests using this observe: the engine still makes every flush call
    (counted and injectable by tests/helpers/faultinject.py, which wraps fileio.fsync at call
    time), but the call only checks its fd.  qemu-img's own flushes are untouched.
    Use: ``pytestmark = pytest.mark.usefixtures("no_disk_flush")``."""
    from qcow2engine.host import fileio
    monkeypatch.setattr(fileio, "fsync", _fsync_fd_check_only)
