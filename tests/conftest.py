import shutil

import pytest


def pytest_configure(config):
    missing = [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError("QEMU tools missing (%s): run the README's test command, which "
                                "installs qemu-utils and qemu-system-x86" % ", ".join(missing))


@pytest.fixture(scope="session")
def variant_images(tmp_path_factory):
    """Every image variant of tests/helpers/images.py, built once per session: name -> path."""
    from tests.helpers.images import VARIANTS
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for v in VARIANTS:
        d = root / v.name
        d.mkdir()
        out[v.name] = (v, v.build(d))
    return out
