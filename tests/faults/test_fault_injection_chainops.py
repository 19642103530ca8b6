"""Fault injection at every fileio call of the chain operations: rebase (safe, onto the
base and onto nothing), commit (default, -d, -b through an intermediate layer, into a base
that has to grow, into compressed clusters) and stream (to nothing and to a base).

For each scenario (a small chain built with QEMU's tools -- 4k or 64k clusters, 4 to 16
MiB -- and one operation through qcow2engine.chainops) the operation first runs without
failure on a copy: that gives the number N of fileio calls and the state after success.
Then, for each call index i < N, on a fresh copy, call i fails with ``OSError(EIO)``
("error": the engine's error handling runs) or with a simulated crash ("crash": nothing
reaches the disk from that call on, the image fds are dropped).  QEMU's tools judge:

* every qcow2 file the operation touched passes ``qemu-img check`` without corruption or
  check error (leaks allowed), and ``qemu-img check -r all`` then leaves it clean with its
  guest view unchanged by the repair; every other file is byte for byte unchanged;
* the top image reads as before the operation -- through its old backing pointer or its
  new one (rebase, stream), and its backing pointer is the old or the new one;
* commit: the chain seen from the top reads as before at every point; the base alone may
  be partially updated, so it reads, unit by unit (the smallest cluster size of the
  chain), as before or as after the commit; its virtual size is the old or the new one;
* an operation that failed with the injected EIO reports it (raises, with the EIO in the
  exception chain; an EIO at a flush must never be swallowed), leaves no fd open and makes
  no write around fileio; one that returned normally left exactly the state after success.
"""
from __future__ import annotations

import gc
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.helpers.chains import ChainSpec, Layer, build_chain
from tests.helpers.faultinject import inject, injection_points, power_loss_failures, run_injected
from tests.helpers.files import tree_hashes
from tests.helpers.qemu import guest_bytes_or_error, par, qemu_img, qemu_img_check, qemu_img_info

KiB = 1024
MiB = 1024 * KiB

FIRST = int(os.environ.get("QCOW2ENGINE_FI_FIRST", "60"))
SAMPLE = int(os.environ.get("QCOW2ENGINE_FI_SAMPLE", "20"))

pytestmark = pytest.mark.usefixtures("no_disk_flush")


def _fmt(rel: str) -> str:
    return "raw" if rel.endswith(".raw") else "qcow2"


# -- chains --------------------------------------------------------------------

CHAINS = {
    # 4k clusters everywhere, 4 MiB, zero writes and discards in the middle
    "c4k": ChainSpec("fi_c4k", [
        Layer("base.qcow2", opts="cluster_size=4k", nops=6, maxlen=128 * KiB),
        Layer("mid.qcow2", opts="cluster_size=4k", kinds="PRZUD", nops=6, maxlen=128 * KiB),
        Layer("top.qcow2", opts="cluster_size=4k", kinds="PRZ", nops=6, maxlen=128 * KiB),
    ], seed=11),
    # raw base in a sub-folder, 64k clusters, each overlay larger than its backing file
    "c64k_raw": ChainSpec("fi_c64k_raw", [
        Layer("base/base.raw", fmt="raw", nops=4, kinds="PR"),
        Layer("l1/l1.qcow2", size=6 * MiB, kinds="PRZD", nops=6),
        Layer("top.qcow2", size=8 * MiB, kinds="PRZ", nops=6),
    ], seed=12),
    # 12 MiB, 64k clusters, a compressed base under two overlays
    "c64k_comp": ChainSpec("fi_c64k_comp", [
        Layer("base.qcow2", size=12 * MiB, kinds="C", nops=20,
              cmds=["write -c -P 0x71 0 2M"]),
        Layer("l1.qcow2", size=12 * MiB, kinds="PRZUD", nops=8, maxlen=1024 * KiB),
        Layer("top.qcow2", size=12 * MiB, kinds="PR", nops=8, maxlen=1024 * KiB),
    ], seed=13),
}


@dataclass
class Scenario:
    name: str
    chain: str
    kind: str                        # rebase | stream | commit
    op: Callable                     # run with cwd = the chain directory
    new_backing: tuple | None = None  # rebase / stream: (name, format) stored afterwards
    base: str | None = None           # commit: the image written
    drop: bool = False                # commit: the top is not emptied

    def __repr__(self) -> str:
        return self.name


def _rebase(b, f=None):
    return lambda C: C.rebase("top.qcow2", b, f)


def _commit(base=None, drop=False):
    return lambda C: C.commit("top.qcow2", base, drop=drop)


def _stream(base=None):
    return lambda C: C.stream("top.qcow2", base)


SCENARIOS = [
    Scenario("rebase_base_4k", "c4k", "rebase", _rebase("base.qcow2", "qcow2"),
             new_backing=("base.qcow2", "qcow2")),
    Scenario("rebase_flatten_4k", "c4k", "rebase", _rebase(None), new_backing=(None, None)),
    Scenario("commit_4k", "c4k", "commit", _commit(), base="mid.qcow2"),
    Scenario("commit_d_4k", "c4k", "commit", _commit(drop=True), base="mid.qcow2", drop=True),
    Scenario("commit_b_base_4k", "c4k", "commit", _commit("base.qcow2"), base="base.qcow2",
             drop=True),
    Scenario("stream_4k", "c4k", "stream", _stream(), new_backing=(None, None)),
    Scenario("stream_base_4k", "c4k", "stream", _stream("base.qcow2"),
             new_backing=("base.qcow2", "qcow2")),
    Scenario("rebase_base_raw", "c64k_raw", "rebase", _rebase("base/base.raw", "raw"),
             new_backing=("base/base.raw", "raw")),
    Scenario("rebase_flatten_raw", "c64k_raw", "rebase", _rebase(""),
             new_backing=(None, None)),
    Scenario("commit_grow_raw", "c64k_raw", "commit", _commit(), base="l1/l1.qcow2"),
    Scenario("commit_d_grow_raw", "c64k_raw", "commit", _commit(drop=True),
             base="l1/l1.qcow2", drop=True),
    Scenario("commit_b_into_raw", "c64k_raw", "commit", _commit("base/base.raw"),
             base="base/base.raw", drop=True),
    Scenario("stream_raw", "c64k_raw", "stream", _stream("base/base.raw"),
             new_backing=("base/base.raw", "raw")),
    Scenario("commit_b_compressed", "c64k_comp", "commit", _commit("base.qcow2"),
             base="base.qcow2", drop=True),
    Scenario("commit_comp", "c64k_comp", "commit", _commit(), base="l1.qcow2"),
    Scenario("rebase_base_comp", "c64k_comp", "rebase", _rebase("base.qcow2", "qcow2"),
             new_backing=("base.qcow2", "qcow2")),
    Scenario("stream_comp", "c64k_comp", "stream", _stream(), new_backing=(None, None)),
]
BY_NAME = {s.name: s for s in SCENARIOS}


# -- QEMU's view ---------------------------------------------------------------

def _guest(d: Path, rel: str) -> bytes | str:
    return guest_bytes_or_error(d / rel, fmt=_fmt(rel), force_share=True)


def _backing(d: Path, rel: str) -> tuple:
    try:
        j = qemu_img_info(d / rel, fmt=_fmt(rel), force_share=True)
    except RuntimeError as e:
        return ("info failed", str(e))
    return j.get("backing-filename"), j.get("backing-filename-format")


def _check(d: Path, rel: str) -> tuple[int, dict, str]:
    return qemu_img_check(d / rel)


def _top_allocated(d: Path, rel: str) -> list:
    p = qemu_img("map", "--output=json", "-U", d / rel)
    assert p.returncode == 0, p.stderr
    return [e for e in json.loads(p.stdout) if e["depth"] == 0]


# -- preparation -----------------------------------------------------------------

@dataclass
class Prepared:
    tdir: Path
    hashes: dict[str, str]            # template file hashes
    old_top: bytes
    old_backing: tuple
    old_base: bytes | None            # commit
    new_base: bytes | None
    unit: int                         # granularity of the base's old-or-new check
    ncalls: int
    changed: set[str] = field(default_factory=set)   # files a successful run changes
    calls: list = field(default_factory=list)        # the fileio calls of that run


_PREP: dict[str, Prepared] = {}
_TEMPLATES: dict[str, Path] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("fichain")
    (r / "random.bin").write_bytes(random.Random(99).randbytes(256 * KiB))
    return r


def _run_op(sc: Scenario, w: Path):
    from qcow2engine.chain import ops as chainops
    old = os.getcwd()
    os.chdir(w)
    try:
        return sc.op(chainops)
    finally:
        os.chdir(old)


def _min_cluster(spec: ChainSpec) -> int:
    return min(L.cluster for L in spec.layers if L.fmt == "qcow2")


def _prepare(sc: Scenario, root: Path) -> Prepared:
    if sc.name in _PREP:
        return _PREP[sc.name]
    spec = CHAINS[sc.chain]
    if sc.chain not in _TEMPLATES:
        _TEMPLATES[sc.chain] = build_chain(spec, root / "t" / sc.chain, root / "random.bin",
                                            others=False)
    tdir = _TEMPLATES[sc.chain]
    hashes = tree_hashes(tdir)
    old_top = _guest(tdir, "top.qcow2")
    assert isinstance(old_top, bytes), old_top
    old_backing = _backing(tdir, "top.qcow2")
    old_base = _guest(tdir, sc.base) if sc.base else None
    # a successful run
    w = root / f"baseline-{sc.name}"
    shutil.copytree(tdir, w)
    with inject(None, paths=[w]) as inj:
        _run_op(sc, w)
    gc.collect()
    assert inj.calls, "the operation made no fileio call"
    assert not inj.bypasses, inj.bypasses
    assert not inj.leaked_fds(), inj.leaked_fds()
    after = tree_hashes(w)
    changed = {k for k in hashes if after.get(k) != hashes[k]}
    for rel in sorted(after):
        if _fmt(rel) == "qcow2" and rel.endswith(".qcow2"):
            rc, data, err = _check(w, rel)
            assert rc == 0, f"after a successful {sc.name}: check {rel} rc={rc} {data} {err}"
    assert _guest(w, "top.qcow2") == old_top, f"{sc.name} changed the guest view"
    new_base = None
    if sc.kind == "commit":
        assert _backing(w, "top.qcow2") == old_backing
        new_base = _guest(w, sc.base)
        assert isinstance(new_base, bytes), new_base
        # the base now holds everything the chain above it showed
        assert new_base[:len(old_top)] == old_top, f"{sc.name}: base is not the top's view"
        if sc.drop:
            assert "top.qcow2" not in changed
        else:
            assert _top_allocated(w, "top.qcow2") == [], "the top was not emptied"
        assert changed <= {"top.qcow2", sc.base}, changed
    else:
        assert _backing(w, "top.qcow2") == sc.new_backing
        assert changed == {"top.qcow2"}, changed
    shutil.rmtree(w)
    p = Prepared(tdir, hashes, old_top, old_backing, old_base, new_base, _min_cluster(spec),
                 len(inj.calls), changed, list(inj.calls))
    _PREP[sc.name] = p
    return p


# -- one injection point -----------------------------------------------------------

def _base_problems(prep: Prepared, got: bytes, succeeded: bool) -> list[str]:
    old, new = prep.old_base, prep.new_base
    if len(got) not in (len(old), len(new)):
        return [f"base size {len(got)} is neither {len(old)} nor {len(new)}"]
    if succeeded:
        return [] if got == new else ["reported success but the base is not the new content"]
    n = max(len(old), len(new), len(got))
    u = prep.unit
    n = -(-n // u) * u

    def pad(b):
        a = np.zeros(n, np.uint8)
        a[:len(b)] = np.frombuffer(b, np.uint8)
        return a.reshape(-1, u)
    g, o, w = pad(got), pad(old), pad(new)
    bad = np.flatnonzero(~((g == o).all(axis=1) | (g == w).all(axis=1)))
    if len(bad):
        return [f"base unit(s) {[hex(int(x) * u) for x in bad[:5]]} ({len(bad)} in all, "
                f"unit {u}) read neither as before nor as after the commit"]
    return []


def _content_problems(sc: Scenario, prep: Prepared, w: Path, succeeded: bool,
                      label: str) -> list[str]:
    probs = []
    jobs = [lambda: _guest(w, "top.qcow2"), lambda: _backing(w, "top.qcow2")]
    if sc.kind == "commit":
        jobs.append(lambda: _guest(w, sc.base))
    res = par(jobs)
    top, backing = res[0], res[1]
    if isinstance(top, str):
        probs.append(label + top)
    elif top != prep.old_top:
        d = np.flatnonzero(np.frombuffer(top[:len(prep.old_top)], np.uint8)
                           != np.frombuffer(prep.old_top[:len(top)], np.uint8))
        probs.append(f"{label}the top's guest view changed (size {len(top)} vs "
                     f"{len(prep.old_top)}, first difference at "
                     f"{hex(int(d[0])) if len(d) else 'the end'}) with backing {backing}")
    if sc.kind == "commit":
        if backing != prep.old_backing:
            probs.append(f"{label}commit changed the top's backing pointer to {backing}")
        base = res[2]
        if isinstance(base, str):
            probs.append(label + base)
        else:
            probs += [label + p for p in _base_problems(prep, base, succeeded)]
    else:
        want = (prep.old_backing, sc.new_backing)
        if backing not in want:
            probs.append(f"{label}backing pointer {backing} is neither {want[0]} nor {want[1]}")
        elif succeeded and backing != sc.new_backing:
            probs.append(f"{label}reported success but the backing pointer is {backing}")
    return probs


def _run_point(sc: Scenario, prep: Prepared, root: Path, i: int, mode: str) -> list[str]:
    w = root / f"{sc.name}-{mode}-{i}"
    shutil.copytree(prep.tdir, w)
    out = run_injected(lambda: _run_op(sc, w), i, mode, paths=[w], baseline=prep.ncalls)
    inj, succeeded, probs = out.injector, out.succeeded, out.problems
    now = tree_hashes(w)
    touched = sorted(k for k in prep.hashes if now.get(k) != prep.hashes[k])
    stray = [k for k in touched if k not in prep.changed]
    if stray:
        probs.append(f"files changed that a successful run leaves alone: {stray}")
    if set(now) != set(prep.hashes):
        probs.append(f"files appeared or vanished: {sorted(set(now) ^ set(prep.hashes))}")
    qcows = [k for k in touched if k.endswith(".qcow2")]
    checks = dict(zip(qcows, par([lambda k=k: _check(w, k) for k in qcows])))
    corrupt = False
    for k, (rc, data, err) in checks.items():
        if rc not in (0, 3) or data.get("corruptions") or data.get("check-errors"):
            corrupt = True
            probs.append(f"{k}: qemu-img check rc={rc} corruptions={data.get('corruptions')} "
                         f"check-errors={data.get('check-errors')} leaks={data.get('leaks')}: "
                         + " | ".join(err.splitlines()[:4]))
    if not corrupt:
        probs += _content_problems(sc, prep, w, succeeded, "")
        leaky = [k for k, (rc, _, _) in checks.items() if rc != 0]
        if leaky:
            before = tree_hashes(w)
            for k in leaky:
                r = qemu_img("check", "-r", "all", w / k)
                if r.returncode != 0:
                    probs.append(f"{k}: qemu-img check -r all rc={r.returncode}: "
                                 + " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:]))
                    continue
                rc2, data2, err2 = _check(w, k)
                if rc2 != 0:
                    probs.append(f"{k}: after check -r all: check rc={rc2} {data2} {err2}")
            if tree_hashes(w) != before:
                probs += _content_problems(sc, prep, w, succeeded, "after check -r all: ")
    shutil.rmtree(w)
    where = inj.triggered or f"#{i}"
    return [f"{mode} at {where}: {p}" for p in probs]


# -- the tests -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["error", "crash"])
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_fault_injection_chain_ops(root, name, mode):
    sc = BY_NAME[name]
    prep = _prepare(sc, root)
    failures: list[str] = []
    points = injection_points(prep.ncalls, first=FIRST, sample=SAMPLE)
    for i in points:
        failures += _run_point(sc, prep, root, i, mode)
    assert not failures, (f"{name}: {len(failures)} failure(s) over {len(points)} of "
                          f"{prep.ncalls} fileio calls:\n" + "\n".join(failures[:30]))


@pytest.mark.parametrize("mode", ["lose-all", "lose-some"])
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_power_loss_chain_ops(root, name, mode):
    """A power cut with a volatile device cache (faultinject lose-*) at the operation's
    flushes, a few other calls and after it returned: old or new, never corrupt."""
    sc = BY_NAME[name]
    prep = _prepare(sc, root)
    points, failures = power_loss_failures(
        prep.calls, lambda i: _run_point(sc, prep, root, i, mode), 10, 3)
    assert not failures, (f"{name}: {len(failures)} failure(s) over {len(points)} power-loss "
                          f"points of {prep.ncalls} calls:\n" + "\n".join(failures[:30]))


def test_scenarios_make_enough_calls(root):
    """Every scenario writes in several steps (else the injection proves little)."""
    for sc in SCENARIOS:
        assert _prepare(sc, root).ncalls >= 8, sc.name
