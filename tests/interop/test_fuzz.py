"""Issue 14's fuzzer in the test suite: seeded mutants of small base images through every
CLI command (tests/helpers/fuzz.py).  The normal run samples commands per mutant; set
QCOW2ENGINE_FUZZ=N for N mutants with every command each; QCOW2ENGINE_FUZZ_START=K starts at
seed K (a long run in slices); QCOW2ENGINE_FUZZ_LOG=FILE appends each mutant's result there
as it finishes (a run cut short keeps what it found)."""
from __future__ import annotations

import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import fuzz

N = int(os.environ.get("QCOW2ENGINE_FUZZ", "0") or 0)
FULL = N > 0
COUNT = N if FULL else 240
START = int(os.environ.get("QCOW2ENGINE_FUZZ_START", "0") or 0)
LOG = os.environ.get("QCOW2ENGINE_FUZZ_LOG")
# Open (issue 14): `snapshot -c` on an image whose active L1/L2 entries carry reserved bits
# or point at other metadata can still add corruption qemu-img counts; reported, not failed.
KNOWN_OPEN: set = set()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fuzz.build_bases(tmp_path_factory.mktemp("fuzzbase"))


def _sampled(seed):
    ro = fuzz.READ_ONLY[seed % len(fuzz.READ_ONLY)]
    mut = fuzz.MUTATING[(seed // len(fuzz.READ_ONLY)) % len(fuzz.MUTATING)]
    return [ro, mut]


def test_fuzz(bases, tmp_path):
    names = sorted(bases)
    jobs = [(bases[names[i % len(names)]], i) for i in range(START, START + COUNT)]
    lock = threading.Lock()

    def one(job):
        base, seed = job
        wd = tmp_path / ("w%d" % seed)
        wd.mkdir()
        dest = wd / ("mut_" + base.name)
        what = fuzz.make_mutant(base, seed, dest)
        fails = fuzz.run_mutant(dest, wd, None if FULL else _sampled(seed))
        if LOG:
            with lock, open(LOG, "a") as f:
                f.write("%s seed=%d (%s): %s\n" % (base.name, seed, what, fails or "ok"))
        return base.name, seed, what, fails

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(one, jobs))
    classes = Counter(c for *_, fails in results for c, _ in fails)
    print("\n".join("%s seed=%d (%s): %s" % (b, s, w, f) for b, s, w, f in results if f))
    results = [(b, s, w, [(c, d) for c, d in f if (c, d.split(":")[0].split()[0]) not in KNOWN_OPEN])
               for b, s, w, f in results]
    report = ["%s seed=%d (%s): %s" % (b, s, w, f) for b, s, w, f in results if f]
    print("fuzz: %d mutants, failures by class: %s" % (len(results), dict(classes)))
    assert not report, "\n".join(report[:40])
