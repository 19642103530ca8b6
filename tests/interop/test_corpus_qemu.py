"""Run QEMU's own tools over the damaged-image corpus (tests/helpers/corpus.py).

* every case: qemu-img info / check must terminate (no hang / timeout);
* with ``WRITE_CORPUS_REF=1`` the summary is (re)written to
  tests/interop/corpus_qemu_reference.txt (the table of QEMU's exit codes and first
  error lines we decide to mirror);
* otherwise, if that reference exists and was produced by the same QEMU
  version, the exit codes of info/check must still match it.

Does not import qcow2engine.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.helpers import corpus

REFERENCE = Path(__file__).with_name("corpus_qemu_reference.txt")
WRITE_REF = os.environ.get("WRITE_CORPUS_REF") == "1"



@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    t0 = time.monotonic()
    cases = corpus.build_corpus(d)
    elapsed = time.monotonic() - t0
    by_name = {c.name: c for c in cases}
    if WRITE_REF:
        REFERENCE.write_text(corpus.format_reference(cases, d))
    return d, by_name, elapsed


def _parse_reference() -> tuple[str, dict[str, dict[str, str]]]:
    """(qemu version line, {name: {column: rc string}}) of the reference."""
    text = REFERENCE.read_text()
    version = ""
    m = re.search(r"^# (qemu-img version [^;]*);", text, re.M)
    if m:
        version = m.group(1)
    cols = list(corpus.COMMANDS)
    rows: dict[str, dict[str, str]] = {}
    in_table = False
    for line in text.splitlines():
        if line.startswith("name ") and "message" in line:
            in_table = True
            continue
        if in_table:
            if not line.strip():
                break
            parts = line.split()
            rows[parts[0]] = dict(zip(cols, parts[1:1 + len(cols)]))
    return version, rows


def test_corpus_shape(built):
    d, by_name, elapsed = built
    assert list(by_name) == corpus.case_names()
    paths = [c.path for c in by_name.values()]
    assert len(set(paths)) == len(paths), "case paths must be distinct"
    for c in by_name.values():
        assert c.path.parent == d and c.path.is_file(), c.name
        for comp in c.companions:
            assert comp.parent == d and comp.is_file(), (c.name, comp)
    assert len(by_name) >= 150
    # generous bound (the build is ~5-11 s on 2 CPUs, mostly qemu-img runs)
    assert elapsed < 60, f"corpus build took {elapsed:.1f}s"


def test_controls_are_clean(built):
    _, by_name, _ = built
    for name in ("valid_v3", "valid_v2", "valid_snapshot", "valid_backing"):
        c = by_name[name]
        assert (c.qemu_info_rc, c.qemu_check_rc) == (0, 0), (
            name, c.stderr_first_line("info"), c.stderr_first_line("check"))


@pytest.mark.parametrize("name", corpus.case_names())
def test_qemu_terminates(built, name):
    _, by_name, _ = built
    c = by_name[name]
    assert c.qemu_info_rc is not None, f"qemu-img info timed out on {name}"
    assert c.qemu_check_rc is not None, f"qemu-img check timed out on {name}"
    for key, run in c.runs.items():
        assert run.rc is not None, f"{key} timed out on {name}"


@pytest.mark.parametrize("name", corpus.case_names())
def test_matches_reference(built, name):
    assert REFERENCE.exists(), "no reference file; run with WRITE_CORPUS_REF=1"
    version, rows = _parse_reference()
    current = corpus._first_line(corpus._run(["qemu-img", "--version"])[1])
    assert not version or version in current, f"reference made with {version}, running {current}"
    assert name in rows, "case not in the reference; regenerate it with WRITE_CORPUS_REF=1"
    _, by_name, _ = built
    c = by_name[name]
    ref = rows[name]
    got = {"info": corpus._rc(c.qemu_info_rc),
           "check": corpus._rc(c.qemu_check_rc)}
    assert got == {k: ref[k] for k in got}, (
        c.stderr_first_line("info"), c.stderr_first_line("check"))


def test_reference_lists_every_case(built):
    _, rows = _parse_reference()
    assert list(rows) == corpus.case_names()
