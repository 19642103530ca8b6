"""Fault injection at every fileio call of snapshot create, apply and delete.

For each scenario (an image with data and QEMU-made internal snapshots, one engine
snapshot operation through the Python API) the operation is first run on a copy to
record its fileio calls and the new state.  Then, for every call index i, on a fresh copy,
call i fails with ``OSError(EIO)`` ("error": the engine's error handling runs) or with a
simulated crash ("crash": nothing reaches the disk from then on, the image fds are
dropped), and QEMU's tools judge the result:

* ``qemu-img check`` reports no corruption and no check error (leaks are allowed);
* the snapshot list (ID, name, VM state size) is the old one or the new one;
* the active disk reads as the old content or the new one (as a whole: the switch is one
  header write), and every listed snapshot as its content before the operation (a snapshot
  just created: the old active content);
* an operation that reported success left exactly the new state;
* ``qemu-img check -r all`` leaves the image clean, and the contents unchanged.
"""
from __future__ import annotations

import gc
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers.faultinject import inject, power_loss_failures, run_injected
from tests.helpers.files import tree_hashes
from tests.helpers.images import VARIANTS_BY_NAME, l2_entry_file_offset, read_header
from tests.helpers.qemu import (guest_bytes_or_error, qemu_img, qemu_img_check, qemu_img_info,
                                qemu_io, run)

KiB = 1024
MiB = 1024 * KiB


# -- template images (QEMU's tools) -------------------------------------------

def b_4k_one(d: Path) -> Path:
    """4k clusters, data, one snapshot, more data (shared and private clusters)."""
    d.mkdir(parents=True)
    img = d / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, 4 * MiB)
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x12 3M 100k", "write -P 0x13 2047k 8k")
    run("qemu-img", "snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x14 512k 1M", "write -z 3M 8k", "discard 3080k 16k",
            "write -P 0x15 4000000 5000")
    return img


def b_4k_two(d: Path) -> Path:
    """As b_4k_one, then a second snapshot and more data: s1's clusters are shared three
    ways (active, s1, s2), two ways, or private."""
    img = b_4k_one(d)
    run("qemu-img", "snapshot", "-c", "s2", img)
    qemu_io(img, "write -P 0x16 0 64k", "write -P 0x17 1500k 600k")
    return img


def b_extl2(d: Path) -> Path:
    """The extended_l2 variant (64k clusters, subcluster zero/alloc bits) with a snapshot."""
    img = VARIANTS_BY_NAME["extended_l2"].build(d)
    run("qemu-img", "snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x61 0 6k", "write -z 1M 64k", "write -P 0x62 3M 100k",
            f"discard {8 * MiB} 128k", "write -P 0x63 15M 2k")
    return img


TEMPLATES: dict[str, Callable[[Path], Path]] = {
    "4k_one": b_4k_one, "4k_two": b_4k_two, "extended_l2": b_extl2}


def op_create(name):
    return lambda S, q: S.create_snapshot(q, name)


def op_apply(key):
    return lambda S, q: S.apply_snapshot(q, key)


def op_delete(name):
    return lambda S, q: S.delete_snapshot(q, name)


@dataclass
class Scenario:
    name: str
    template: str
    op: Callable
    kind: str                          # create | apply | delete

    def __repr__(self) -> str:
        return self.name


SCENARIOS = [
    Scenario("create_4k", "4k_one", op_create("new"), "create"),
    Scenario("apply_4k", "4k_one", op_apply("s1"), "apply"),
    Scenario("delete_4k", "4k_one", op_delete("s1"), "delete"),
    Scenario("create_4k_two", "4k_two", op_create("new"), "create"),
    Scenario("apply_4k_two_by_id", "4k_two", op_apply("1"), "apply"),
    Scenario("delete_4k_two_middle", "4k_two", op_delete("s1"), "delete"),
    Scenario("create_extl2", "extended_l2", op_create("new"), "create"),
    Scenario("apply_extl2", "extended_l2", op_apply("s1"), "apply"),
    Scenario("delete_extl2", "extended_l2", op_delete("s1"), "delete"),
]
BY_NAME = {s.name: s for s in SCENARIOS}


# -- QEMU's view of an image ---------------------------------------------------

def _snap_list(img: Path) -> list[tuple[str, str, int]]:
    return [(s["id"], s["name"], s["vm-state-size"])
            for s in qemu_img_info(img).get("snapshots", [])]


def _guest(img: Path, snap_id: str | None = None) -> bytes | str:
    return guest_bytes_or_error(img, snapshot=None if snap_id is None
                                else f"snapshot.id={snap_id}")


COPIED_RE = re.compile(r"^ERROR OFLAG_COPIED (?:data cluster: l2_entry=([0-9a-f]+)|L2 cluster: "
                       r"l1_index=\d+ l1_entry=([0-9a-f]+)) refcount=(\d+)$")
LEAK_RE = re.compile(r"^Leaked cluster (\d+) refcount=(\d+) reference=(\d+)$")
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def _real_corruptions(img: Path, corruptions: int) -> tuple[int, list[str]]:
    """(corruptions that are not leak artefacts, their first lines).

    qemu-img check counts every OFLAG_COPIED flag that disagrees with "refcount == 1" as a
    corruption.  Two such states are harmless and unavoidable in a window of snapshot
    create/delete (QEMU's own qcow2_update_snapshot_refcount() has the same windows):
    COPIED set on a cluster whose refcount is above 1 only because it is leaked (reference
    count 1: writes in place are right), and COPIED clear on a cluster of refcount 1 (a
    write copies needlessly).  Everything else counts."""
    p = qemu_img("check", img)
    lines = (p.stdout + p.stderr).splitlines()
    leaks = {}
    for ln in lines:
        m = LEAK_RE.match(ln)
        if m:
            leaks[int(m[1])] = (int(m[2]), int(m[3]))
    cbits = read_header(img)["cluster_bits"]
    benign = 0
    real = []
    for ln in lines:
        m = COPIED_RE.match(ln)
        if m:
            entry = int(m[1] or m[2], 16)
            rc = int(m[3])
            copied = bool(entry >> 63)
            cluster = (entry & OFFSET_MASK) >> cbits
            if (rc == 1 and not copied) or (rc > 1 and copied
                                             and leaks.get(cluster, (0, 0))[1] == 1):
                benign += 1
                continue
        if ln.startswith("ERROR") or ln.startswith("Warning"):
            real.append(ln)
    return corruptions - benign, real[:4]


@dataclass
class State:
    snaps: list[tuple[str, str, int]]
    active: bytes
    contents: dict[str, bytes]         # snapshot ID -> guest content


def _state(img: Path) -> State:
    snaps = _snap_list(img)
    active = _guest(img)
    assert not isinstance(active, str), active
    contents = {}
    for i, _, _ in snaps:
        c = _guest(img, i)
        assert not isinstance(c, str), c
        contents[i] = c
    return State(snaps, active, contents)


# -- preparation ---------------------------------------------------------------

@dataclass
class Prepared:
    tdir: Path
    old: State
    new: State
    ncalls: int
    calls: list = None                # the fileio calls of the successful run


_PREP: dict[str, Prepared] = {}
_TEMPLATES: dict[str, Path] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fisnap")


def _run_op(sc: Scenario, img: Path):
    from qcow2engine.image import snapshots as S
    from qcow2engine.image.qcow2 import Qcow2Image
    q = Qcow2Image(str(img), writable=True)
    try:
        return sc.op(S, q)
    finally:
        q.close()


def _prepare(sc: Scenario, root: Path) -> Prepared:
    if sc.name in _PREP:
        return _PREP[sc.name]
    if sc.template not in _TEMPLATES:
        _TEMPLATES[sc.template] = TEMPLATES[sc.template](root / "t" / sc.template)
    timg = _TEMPLATES[sc.template]
    old = _state(timg)
    w = root / f"baseline-{sc.name}"
    shutil.copytree(timg.parent, w)
    with inject(None, paths=[w]) as inj:
        _run_op(sc, w / timg.name)
    assert inj.calls and not inj.bypasses, inj.bypasses
    gc.collect()
    assert not inj.leaked_fds()
    rc, data, err = qemu_img_check(w / timg.name)
    assert rc == 0, f"after a successful {sc.name}: check rc={rc} {data} {err}"
    new = _state(w / timg.name)
    shutil.rmtree(w)
    # the new state is what the operation means
    if sc.kind == "create":
        nid = str(max(int(i) for i, _, _ in old.snaps) + 1)
        assert new.snaps == old.snaps + [(nid, "new", 0)]
        assert new.active == old.active and new.contents[nid] == old.active
    elif sc.kind == "apply":
        assert new.snaps == old.snaps
        sid = next(i for i, n, _ in old.snaps if n == "s1")
        assert new.active == old.contents[sid] and new.active != old.active
    else:
        assert new.snaps == [s for s in old.snaps if s[1] != "s1"]
        assert new.active == old.active
    for i, c in new.contents.items():
        if i in old.contents:
            assert c == old.contents[i], f"{sc.name}: snapshot {i} changed"
    p = Prepared(timg.parent, old, new, len(inj.calls), list(inj.calls))
    _PREP[sc.name] = p
    return p


# -- one injection point ---------------------------------------------------------

def _content_problems(prep: Prepared, img: Path, succeeded: bool, label: str) -> list[str]:
    probs = []
    snaps = _snap_list(img)
    old, new = prep.old, prep.new
    if snaps not in (old.snaps, new.snaps):
        return [f"{label}snapshot list {snaps} is neither old {old.snaps} nor new {new.snaps}"]
    if succeeded and snaps != new.snaps:
        probs.append(f"{label}reported success but the snapshot list is the old one")
    active = _guest(img)
    if isinstance(active, str):
        return probs + [label + active]
    if active not in (old.active, new.active):
        probs.append(f"{label}active disk is neither the old nor the new content")
    elif succeeded and active != new.active:
        probs.append(f"{label}reported success but the active disk is the old content")
    for i, _, _ in snaps:
        c = _guest(img, i)
        want = old.contents.get(i, new.contents.get(i))
        if c != want:
            probs.append(f"{label}snapshot ID {i} does not read as its content"
                         + (f" ({c})" if isinstance(c, str) else ""))
    return probs


def _run_point(sc: Scenario, prep: Prepared, root: Path, i: int, mode: str) -> list[str]:
    w = root / f"{sc.name}-{mode}-{i}"
    shutil.copytree(prep.tdir, w)
    img = w / "img.qcow2"
    out = run_injected(lambda: _run_op(sc, img), i, mode, paths=[w], baseline=prep.ncalls,
                       any_eio_must_surface=True)
    inj, succeeded, probs = out.injector, out.succeeded, out.problems
    rc, data, err = qemu_img_check(img)
    real, lines = _real_corruptions(img, data.get("corruptions", 0)) if rc == 2 else (0, [])
    if rc not in (0, 2, 3) or real or data.get("check-errors"):
        probs.append(f"qemu-img check rc={rc} corruptions={data.get('corruptions')} "
                     f"(not leak artefacts: {real}) check-errors={data.get('check-errors')} "
                     f"leaks={data.get('leaks')}: " + " | ".join(lines or err.splitlines()[:4]))
    else:
        probs += _content_problems(prep, img, succeeded, "")
        before = tree_hashes(w)
        r = qemu_img("check", "-r", "all", img)
        if r.returncode != 0:
            probs.append(f"qemu-img check -r all rc={r.returncode}: "
                         + " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:]))
        elif rc != 0 or tree_hashes(w) != before:
            rc2, data2, err2 = qemu_img_check(img)
            if rc2 != 0:
                probs.append(f"after check -r all: check rc={rc2} {data2} {err2}")
            probs += _content_problems(prep, img, succeeded, "after check -r all: ")
    shutil.rmtree(w)
    where = inj.triggered or f"#{i}"
    return [f"{mode} at {where}: {p}" for p in probs]


# -- the tests ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["error", "crash"])
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_fault_injection_snapshot_ops(root, name, mode):
    sc = BY_NAME[name]
    prep = _prepare(sc, root)
    failures: list[str] = []
    for i in range(prep.ncalls):
        failures += _run_point(sc, prep, root, i, mode)
    assert not failures, (f"{name}: {len(failures)} failure(s) over {prep.ncalls} fileio "
                          f"calls:\n" + "\n".join(failures[:30]))


@pytest.mark.parametrize("mode", ["lose-all", "lose-some"])
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_power_loss_snapshot_ops(root, name, mode):
    """A power cut with a volatile device cache (faultinject lose-*) at the operation's
    flushes, a few other calls and after it returned: old or new, never corrupt."""
    sc = BY_NAME[name]
    prep = _prepare(sc, root)
    points, failures = power_loss_failures(
        prep.calls, lambda i: _run_point(sc, prep, root, i, mode), 10, 3)
    assert not failures, (f"{name}: {len(failures)} failure(s) over {len(points)} power-loss "
                          f"points of {prep.ncalls} calls:\n" + "\n".join(failures[:30]))


def test_corruption_classifier(tmp_path):
    """_real_corruptions() forgives only the two harmless OFLAG_COPIED states."""
    img = tmp_path / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, 1 * MiB)
    qemu_io(img, "write -P 1 0 64k")
    run("qemu-img", "snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 2 64k 64k")        # private clusters (COPIED), shared L2 copied

    def flip(guest: int, copied: bool) -> None:
        off = l2_entry_file_offset(img, guest)
        with open(img, "r+b") as f:
            f.seek(off)
            e = int.from_bytes(f.read(8), "big")
            e = e | (1 << 63) if copied else e & ~(1 << 63)
            f.seek(off)
            f.write(e.to_bytes(8, "big"))

    assert qemu_img_check(img)[0] == 0
    flip(64 * KiB, False)                     # refcount 1, COPIED clear: harmless
    rc, data, _ = qemu_img_check(img)
    assert rc == 2 and data["corruptions"] == 1
    assert _real_corruptions(img, 1)[0] == 0
    flip(0, True)                             # shared (refcount 2, 2 references), COPIED set
    rc, data, _ = qemu_img_check(img)
    assert rc == 2 and data["corruptions"] == 2
    real, lines = _real_corruptions(img, 2)
    assert real == 1 and "OFLAG_COPIED" in lines[0]
