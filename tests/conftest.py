"""Kinds of tests, by folder, and what each needs (markers registered in pyproject.toml):

    tests/unit/     no QEMU binary at all
    tests/interop/  qemu-img / qemu-io as the oracle              -> marker qemu
    tests/faults/   fault injection and process kills, judged by QEMU's tools -> qemu
    tests/live/     a running qemu-system-x86_64 over QMP          -> markers live and qemu
    tests/helpers/  what they share (no tests)

A test elsewhere in interop that boots qemu-system-x86_64 (the savevm image) carries `live`
too.  `pytest -m "not qemu and not live" tests` runs the unit tests alone, without QEMU; in any
run that selects a test needing a QEMU binary which is missing, the session stops with an
error (a missing QEMU is a failure, never a skip).
"""
import shutil
from pathlib import Path

import pytest

from tests.helpers.fixtures import no_disk_flush, variant_images  # noqa: F401  (fixtures)
from tests.helpers.qemu import QEMU_SYSTEM

TESTS = Path(__file__).resolve().parent
KINDS = {"unit": (), "interop": ("qemu",), "faults": ("qemu",), "live": ("live", "qemu")}
NEEDS = {"qemu": ("qemu-img", "qemu-io"), "live": (QEMU_SYSTEM,)}


@pytest.hookimpl(tryfirst=True)       # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            kind = Path(item.fspath).resolve().relative_to(TESTS).parts[0]
        except ValueError:            # not under tests/
            continue
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: a test belongs in one of tests/"
                                    f"{{{','.join(KINDS)}}}/")
        for name in KINDS[kind]:
            item.add_marker(name)


def pytest_collection_finish(session):
    needed = {m for item in session.items for m in NEEDS if item.get_closest_marker(m)}
    missing = [tool for m in sorted(needed) for tool in NEEDS[m] if shutil.which(tool) is None]
    if missing:
        raise pytest.UsageError("QEMU tools missing (%s): run the README's test command, which "
                                "installs qemu-utils and qemu-system-x86, or deselect the tests "
                                "that need them (-m \"not qemu and not live\")"
                                % ", ".join(missing))
