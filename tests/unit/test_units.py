"""The one size grammar (qcow2engine.units) and the one job vocabulary (qcow2engine.jobs)."""
from __future__ import annotations

import threading

import pytest

from qcow2engine.errors import InvalidRequestError, JobCancelled, JobError
from qcow2engine.jobs import CANCELLED, COMPLETED, OpResult, check_cancel
from qcow2engine.units import parse_size


@pytest.mark.parametrize("text,want", [
    ("512", 512), ("64k", 65536), ("64K", 65536), ("1M", 1 << 20), ("1.5G", 3 << 29),
    ("2T", 2 << 40), ("1P", 1 << 50), ("1E", 1 << 60), ("0x1000", 4096), ("100b", 100),
    ("100B", 100), (" 8m ", 8 << 20)])
def test_sizes(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "x", "-1", "b", "1Q", "1.2.3", "k"])
def test_bad_sizes(text):
    with pytest.raises(InvalidRequestError, match="Invalid speed"):
        parse_size(text, what="speed")
    with pytest.raises(ValueError):
        parse_size(text)


def test_cli_parsers_share_the_grammar():
    import argparse
    from qcow2engine.cli.main import _size
    from qcow2engine.image.create import parse_size as create_size
    from qmp_bridge.cli import _rate
    for t in ("64k", "1.5G", "0x200", "7b"):
        assert _size(t) == create_size(t) == _rate(t) == parse_size(t)
    with pytest.raises(argparse.ArgumentTypeError, match="Invalid speed '-5'"):
        _rate("-5")


def test_cancel_and_result():
    ev = threading.Event()
    check_cancel(None)
    check_cancel(ev)
    ev.set()
    with pytest.raises(JobCancelled) as e:
        check_cancel(ev)
    assert isinstance(e.value, JobError)
    r = OpResult("commit", CANCELLED, ("a",), bytes_copied=3)
    assert not r.completed and OpResult("commit", COMPLETED).completed
    with pytest.raises(Exception):
        r.outcome = COMPLETED          # frozen


def test_qmp_bridge_shares_the_progress_type():
    from qcow2engine.jobs import Progress
    from qmp_bridge.jobs import ProgressCallback
    assert ProgressCallback is Progress
