"""Bad input: every command on every damaged image ends with a documented exit code, one line
of error, bounded time and memory, and never a changed byte."""
from __future__ import annotations

import time
import tracemalloc

import pytest

from tests.helpers.corpus import build_corpus, case_names
from tests.helpers.engine import engine
from tests.helpers.files import file_sha256

COMMANDS = {
    "info": (["info", "--output=json"], {0, 1}),
    "info-human": (["info"], {0, 1}),
    "chain": (["info", "--backing-chain", "--output=json"], {0, 1}),
    "check": (["check", "--output=json"], {0, 1, 2, 3, 63}),
    "map": (["map", "--output=json"], {0, 1}),
    "convert": (["convert", "-O", "raw"], {0, 1}),
    "compare": (["compare"], {0, 1, 2, 3, 4}),     # 3: block status failed (qemu-img too)
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return {c.name: c for c in build_corpus(d)}


def _digest(paths) -> list:
    return [file_sha256(p) for p in paths]


@pytest.mark.parametrize("name", case_names())
def test_damaged_image(corpus, name, tmp_path):
    case = corpus[name]
    files = [case.path, *case.companions]
    before = _digest(files)
    for cmd, (argv, codes) in COMMANDS.items():
        args = list(argv) + [case.path]
        if cmd == "convert":
            args.append(tmp_path / "out.raw")
        if cmd == "compare":
            args.append(case.path)
        tracemalloc.start()
        t0 = time.monotonic()
        rc, out, err = engine(*args)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert "internal error" not in err and "Traceback" not in err, (cmd, err)
        assert rc in codes, (cmd, rc, err)
        failed = rc not in (0, 2, 3) if cmd == "check" else rc not in (0,) if cmd != "compare" else rc >= 2
        if failed:
            assert err.count("\n") == 1 and err.strip(), (cmd, err)
        assert elapsed < 5.0, (cmd, elapsed)          # a hang detector, not a benchmark
        assert peak < 300 << 20, (cmd, peak)
    assert _digest(files) == before


# Where we differ from qemu-img on purpose: case -> (our exit code, why)
DIVERGENCES = {
    "rt_clusters_0": (1, "a header without a refcount table is refused at open (qemu-img "
                         "info refuses it too; only its check tolerates it)"),
    "backing_json_base": (1, "json: backing names are refused by design (safety rule)"),
    "crypt_method_1": (0, "we check refcounts of encrypted images without needing the key"),
}


@pytest.mark.parametrize("name", case_names())
def test_check_agrees_with_qemu(corpus, name):
    """Where qemu-img check completes (0/2/3/63), our check gives the same exit code; where it
    cannot open the image, we fail too."""
    case = corpus[name]
    rc, out, err = engine("check", "--output=json", case.path)
    q = case.qemu_check_rc
    if name in DIVERGENCES:
        assert rc == DIVERGENCES[name][0], err
    elif q in (0, 2, 3, 63):
        assert rc == q, (rc, q, err, case.runs["check"].stderr)
    else:
        assert rc != 0 or q == 0, (rc, err, case.runs["check"].stderr)
