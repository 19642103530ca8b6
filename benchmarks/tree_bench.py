"""Machine snapshot-tree benchmarks: the tree's verbs through the Python API against the plain
``qemu-img`` command sequence a script would run for the same result.

    python -m benchmarks.tree_bench [--quick] [--repeat N] [--only NAME ...] [--markdown]

(``python -m benchmarks.run`` runs the same cases as its ``tree-*`` workloads.)

A 4-disk machine (vda..vdd), each disk a 1 GiB qcow2 image holding ``data`` bytes (1 MiB
stripes spread over the disk; the ``tree-disks`` artifact, cached like every other).  For
every case both sides get, once, a starting state built from copies of those disks: the
engine's by the tree API (``Tree.define``, ``create_snapshot``, ...) plus the same ``qemu-io``
writes, with its state directory; qemu-img's by the equivalent ``qemu-img``/``qemu-io``
commands, with the same file names.  Each run (warm-up and timed) starts from a fresh copy
of that template (``cp -a --reflink=auto --sparse=always``, then ``sync``; untimed, and the
copy keeps the mtimes the tree's stamps record), in the path it was built in.

Timed:

- engine: one verb of ``Machine`` (``create_snapshot``, ``revert``, ``delete``), in this
  process, on a ``Tree`` opened (untimed) with ``backend=TimingBackend(OfflineBackend())``;
  the backend's time is summed, and the tree's own overhead is the verb's time minus it
  (database, journal, planning); the backend time is split into looking (probe, stamp,
  in_use, exists, allocated: the tree's consistency checks and facts) and steps;
- qemu-img: its processes one after the other (wall time from start to reaped, summed;
  started without ``/usr/bin/time``, so the numbers are the commands' own).

Rounds alternate (qemu-img, engine); one warm-up round, then the median of N.  After the
warm-up each side's result is checked: ``qemu-img compare`` of every disk's active image,
the same internal snapshot names in it, the same backing-chain depth, the same set of files
in the disks' folder, ``qemu-img check`` of every engine file, ``Machine.check()`` empty.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):          # python benchmarks/tree_bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks.harness.artifacts import Artifact, qemu_io_for, run_checked
from benchmarks.harness.compare import Target, Workload, WorkloadResult
from benchmarks.harness.report import fmt_s, format_table
from benchmarks.harness.runner import MiB, GiB, WARMUP, Runner, RunResult, Samples, log, \
    repeat_alternating

DISKS = ("vda", "vdb", "vdc", "vdd")
MACHINE = "m"
OVERHEAD_TARGET = 0.020          # seconds of the tree's own time per verb


# --------------------------------------------------------------------------- the disks
def build_tree_disks(d: Path, p: dict, qemu_img: str) -> None:
    """``disks`` qcow2 images of ``size`` bytes, each with ``data`` bytes written in 1 MiB
    stripes spread evenly over the disk (pattern: the disk's number)."""
    n = p["data"] // MiB
    step = p["size"] // n
    for i, disk in enumerate(DISKS[:p["disks"]]):
        img = d / (disk + ".qcow2")
        run_checked([qemu_img, "create", "-q", "-f", "qcow2", img, str(p["size"])])
        cmds = []
        for k in range(n):
            cmds += ["-c", "write -q -P %d %d 1M" % (0x10 + i, k * step)]
        run_checked([qemu_io_for(qemu_img), "-f", "qcow2", *cmds, img])


TREE_ARTIFACT = Artifact("tree-disks", build_tree_disks, {
    "full": {"disks": 4, "size": 1 * GiB, "data": 16 * MiB},
    "quick": {"disks": 4, "size": 1 * GiB, "data": 16 * MiB},
}, files={d: d + ".qcow2" for d in DISKS})

# Per-case data, per profile: written by qemu-io in the set-up (never timed).
CASE_PARAMS = {
    "full": {"commit_data": 64 * MiB, "merge_data": 8 * MiB, "tip_data": 4 * MiB},
    "quick": {"commit_data": 16 * MiB, "merge_data": 4 * MiB, "tip_data": 4 * MiB},
}


# --------------------------------------------------------------------------- timing backend
class TimingBackend:
    """Forwards every method to the wrapped backend and sums the time spent in them (an
    outer call only: a backend method calling another through the wrapper counts once)."""

    LOOKING = frozenset({"probe", "stamp", "in_use", "exists", "allocated"})

    def __init__(self, inner):
        self._inner = inner
        self._depth = 0
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.by_method: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @property
    def looking_seconds(self) -> float:
        return sum(v for k, v in self.by_method.items() if k in self.LOOKING)

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            if self._depth:
                return attr(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._depth -= 1
                self.seconds += dt
                self.by_method[name] = self.by_method.get(name, 0.0) + dt
                self.calls[name] = self.calls.get(name, 0) + 1
        timed.__name__ = name
        return timed


# --------------------------------------------------------------------------- the cases
class Side:
    """One side's files: the disks' folder and helpers for the set-up."""

    def __init__(self, root: Path, qemu_img: str, params: dict):
        self.root = root
        self.dir = root / "disks"
        self.qemu_img = qemu_img
        self.params = params

    def disk(self, d: str) -> str:
        return str(self.dir / (d + ".qcow2"))

    def ov(self, d: str, label: str) -> str:
        """The tree's default overlay name: <folder>/<machine>-<disk>.<label>.qcow2."""
        return str(self.dir / ("%s-%s.%s.qcow2" % (MACHINE, d, label)))

    def io(self, path: str, *cmds: str) -> None:
        argv = [qemu_io_for(self.qemu_img), "-f", "qcow2"]
        for c in cmds:
            argv += ["-c", c]
        run_checked(argv + [path])

    def img(self, *args: object) -> None:
        run_checked([self.qemu_img, *args])

    def create(self, path: str, backing: str) -> None:
        self.img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path)


def _write(side: Side, path: str, nbytes: int, pattern: int, offset: int = 0) -> None:
    side.io(path, "write -q -P %d %d %d" % (pattern, offset, nbytes))


Cmds = list[list[str]]


@dataclass(frozen=True)
class Baseline:
    """The qemu-img side of one table row: set-up (untimed) and the timed commands."""
    setup: Callable[[Side], None]
    commands: Callable[[Side, str], Cmds]          # (side, qemu_img) -> argvs
    active: Callable[[Side, str], str]             # (side, disk) -> the active image after
    same_files: bool = True                        # the same files as the engine's afterwards
    note: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Side, object], None]          # (side, machine) engine set-up
    verb: Callable[[object], object]               # machine -> TreeResult
    baselines: dict                                # row suffix -> Baseline


def _per_disk(f: Callable[[str], list[list[str]]]) -> Callable[[Side, str], Cmds]:
    def cmds(side: Side, qemu_img: str) -> Cmds:
        out = []
        for d in DISKS:
            out += [[qemu_img if a == "QEMU_IMG" else a for a in argv] for argv in f(d, side)]
        return out
    return cmds


# ---- create external
def _e_none(side, m):
    pass


def _q_none(side):
    pass


CREATE_EXT = Case(
    "create-external", _e_none,
    lambda m: m.create_snapshot("s1", disk_only=True),
    {"": Baseline(_q_none, _per_disk(lambda d, s: [[
        "QEMU_IMG", "create", "-q", "-f", "qcow2", "-b", s.disk(d), "-F", "qcow2",
        s.ov(d, "s1")]]), lambda s, d: s.ov(d, "s1"))})

# ---- create internal
CREATE_INT = Case(
    "create-internal", _e_none,
    lambda m: m.create_snapshot("s1"),
    {"": Baseline(_q_none, _per_disk(lambda d, s: [[
        "QEMU_IMG", "snapshot", "-c", "s1", s.disk(d)]]), lambda s, d: s.disk(d))})


# ---- revert reset external: undo since s1 (the tip's changes are thrown away)
def _e_reset_ext(side, m):
    m.create_snapshot("s1", disk_only=True)
    for d in DISKS:
        _write(side, side.ov(d, "s1"), side.params["tip_data"], 0x41)


def _q_reset_ext(side):
    for d in DISKS:
        side.create(side.ov(d, "s1"), side.disk(d))
        _write(side, side.ov(d, "s1"), side.params["tip_data"], 0x41)


RESET_EXT = Case(
    "revert-reset-external", _e_reset_ext,
    lambda m: m.revert("s1", mode="reset"),
    {"": Baseline(_q_reset_ext, _per_disk(lambda d, s: [
        ["QEMU_IMG", "create", "-q", "-f", "qcow2", "-b", s.disk(d), "-F", "qcow2",
         s.ov(d, "s1-2")],
        ["rm", s.ov(d, "s1")]]), lambda s, d: s.ov(d, "s1-2"))})


# ---- revert reset internal
def _e_reset_int(side, m):
    m.create_snapshot("s1")
    for d in DISKS:
        _write(side, side.disk(d), side.params["tip_data"], 0x42)


def _q_reset_int(side):
    for d in DISKS:
        side.img("snapshot", "-c", "s1", side.disk(d))
        _write(side, side.disk(d), side.params["tip_data"], 0x42)


RESET_INT = Case(
    "revert-reset-internal", _e_reset_int,
    lambda m: m.revert("s1", mode="reset"),
    {"": Baseline(_q_reset_int, _per_disk(lambda d, s: [[
        "QEMU_IMG", "snapshot", "-a", "s1", s.disk(d)]]), lambda s, d: s.disk(d))})


# ---- revert follow: back to where b's branch was left
# a, b external; b's tip written; reset to a (b's tip kept as an automatic snapshot, a new
# overlay on a's base), that tip written too; then follow b: a's tip becomes a second
# automatic snapshot (a label, no file step) and, as b's branch tip is held by the first
# automatic snapshot, a new overlay on it becomes active.
def _e_follow(side, m):
    m.create_snapshot("a", disk_only=True)
    for d in DISKS:
        _write(side, side.ov(d, "a"), 1 * MiB, 0x51)
    m.create_snapshot("b", disk_only=True)
    for d in DISKS:
        _write(side, side.ov(d, "b"), 1 * MiB, 0x52, 1 * MiB)
    r = m.revert("a", mode="reset")
    assert r.auto_snapshot, r
    for d in DISKS:
        _write(side, side.ov(d, "a-2"), 1 * MiB, 0x53, 2 * MiB)


def _q_follow(side):
    for d in DISKS:
        side.create(side.ov(d, "a"), side.disk(d))
        _write(side, side.ov(d, "a"), 1 * MiB, 0x51)
        side.create(side.ov(d, "b"), side.ov(d, "a"))
        _write(side, side.ov(d, "b"), 1 * MiB, 0x52, 1 * MiB)
        side.create(side.ov(d, "a-2"), side.disk(d))
        _write(side, side.ov(d, "a-2"), 1 * MiB, 0x53, 2 * MiB)


FOLLOW = Case(
    "revert-follow", _e_follow,
    lambda m: m.revert("b", mode="follow"),
    {"": Baseline(_q_follow, _per_disk(lambda d, s: [["QEMU_IMG", "info", s.ov(d, "b")]]),
                  lambda s, d: s.ov(d, "b"), same_files=False,
                  note="qemu side is `qemu-img info` per disk: a script that only switches "
                       "the disks to b's overlay runs no command, info is the minimal step "
                       "(the engine creates an overlay on it, as something depends on it)"),
     "-overlay": Baseline(_q_follow, _per_disk(lambda d, s: [[
         "QEMU_IMG", "create", "-q", "-f", "qcow2", "-b", s.ov(d, "b"), "-F", "qcow2",
         s.ov(d, "b-2")]]), lambda s, d: s.ov(d, "b-2"),
         note="qemu side is what the engine does for follow here: `qemu-img create -b "
              "B_OVERLAY` per disk (b's branch tip is kept by an automatic snapshot)")})


# ---- revert commit: s1's overlay (commit_data written) merged into its base, s1 re-created
def _e_commit(side, m):
    m.create_snapshot("s1", disk_only=True)
    for d in DISKS:
        _write(side, side.ov(d, "s1"), side.params["commit_data"], 1)


def _q_commit(side):
    for d in DISKS:
        side.create(side.ov(d, "s1"), side.disk(d))
        _write(side, side.ov(d, "s1"), side.params["commit_data"], 1)


COMMIT = Case(
    "revert-commit", _e_commit,
    lambda m: m.revert("s1", mode="commit"),
    {"": Baseline(_q_commit, _per_disk(lambda d, s: [
        ["QEMU_IMG", "commit", "-q", "-d", s.ov(d, "s1")],
        ["QEMU_IMG", "create", "-q", "-f", "qcow2", "-b", s.disk(d), "-F", "qcow2",
         s.ov(d, "s1-2")],
        ["rm", s.ov(d, "s1")]]), lambda s, d: s.ov(d, "s1-2"),
        note="qemu side: `commit -d` (the overlay is removed afterwards, the engine does not "
             "empty it either), `create -b BASE`, `rm` of the old overlay")})


# ---- delete a middle external snapshot: s1, s2, s3; s2's file (s1's overlay) is merged
# with its only child (s2's overlay, the smaller: committed down), s3's overlay rebased.
def _e_delete_ext(side, m):
    md = side.params["merge_data"]
    m.create_snapshot("s1", disk_only=True)
    for d in DISKS:
        _write(side, side.ov(d, "s1"), 2 * md, 0x61)
    m.create_snapshot("s2", disk_only=True)
    for d in DISKS:
        _write(side, side.ov(d, "s2"), md, 0x62, 256 * MiB)
    m.create_snapshot("s3", disk_only=True)


def _q_delete_ext(side):
    md = side.params["merge_data"]
    for d in DISKS:
        side.create(side.ov(d, "s1"), side.disk(d))
        _write(side, side.ov(d, "s1"), 2 * md, 0x61)
        side.create(side.ov(d, "s2"), side.ov(d, "s1"))
        _write(side, side.ov(d, "s2"), md, 0x62, 256 * MiB)
        side.create(side.ov(d, "s3"), side.ov(d, "s2"))


DELETE_EXT = Case(
    "delete-external", _e_delete_ext,
    lambda m: m.delete("s2"),
    {"": Baseline(_q_delete_ext, _per_disk(lambda d, s: [
        ["QEMU_IMG", "commit", "-q", "-d", s.ov(d, "s2")],
        ["QEMU_IMG", "rebase", "-u", "-b", s.ov(d, "s1"), "-F", "qcow2", s.ov(d, "s3")],
        ["rm", s.ov(d, "s2")]]), lambda s, d: s.ov(d, "s3"),
        note="qemu side: `commit -d` of s2's overlay into s1's, `rebase -u` of s3's overlay "
             "onto s1's, `rm` of s2's")})


# ---- delete internal
def _e_delete_int(side, m):
    m.create_snapshot("s1")
    for d in DISKS:
        _write(side, side.disk(d), side.params["tip_data"], 0x71)


def _q_delete_int(side):
    for d in DISKS:
        side.img("snapshot", "-c", "s1", side.disk(d))
        _write(side, side.disk(d), side.params["tip_data"], 0x71)


DELETE_INT = Case(
    "delete-internal", _e_delete_int,
    lambda m: m.delete("s1"),
    {"": Baseline(_q_delete_int, _per_disk(lambda d, s: [[
        "QEMU_IMG", "snapshot", "-d", "s1", s.disk(d)]]), lambda s, d: s.disk(d))})

CASES = {c.name: c for c in [CREATE_EXT, CREATE_INT, RESET_EXT, RESET_INT, FOLLOW, COMMIT,
                             DELETE_EXT, DELETE_INT]}

DESCRIPTIONS = {
    "create-external": "snapshot-create --disk-only (4 disks) vs qemu-img create -b ACTIVE",
    "create-internal": "snapshot-create, internal (4 disks) vs qemu-img snapshot -c",
    "revert-reset-external": "revert --reset to the current external snapshot vs "
                             "qemu-img create -b BASE + rm OLD",
    "revert-reset-internal": "revert --reset, internal vs qemu-img snapshot -a",
    "revert-follow": "revert --follow to another branch vs qemu-img info (minimal step)",
    "revert-follow-overlay": "the same revert --follow vs qemu-img create -b B_OVERLAY",
    "revert-commit": "revert --commit, {commit} per disk vs qemu-img commit -d + create + rm",
    "delete-external": "delete a middle external snapshot ({merge} merged per disk) vs "
                       "commit -d + rebase -u + rm",
    "delete-internal": "delete an internal snapshot vs qemu-img snapshot -d",
}


# --------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class TreeWorkload(Workload):
    """A row of the tree benchmark: the engine's verb of ``case`` against ``baseline``."""
    case: str = ""
    baseline: str = ""


@dataclass
class TreeWorkloadResult(WorkloadResult):
    overhead: Samples = field(default_factory=Samples)     # verb time - backend time
    looking: Samples = field(default_factory=Samples)      # backend probe/stamp/... time
    steps: Samples = field(default_factory=Samples)        # backend steps' time
    calls: dict = field(default_factory=dict)              # backend method -> calls per verb
    note: str = ""


def _workloads() -> list[TreeWorkload]:
    out = []
    for c in CASES.values():
        for suffix in c.baselines:
            name = c.name + suffix
            desc = DESCRIPTIONS[name].format(commit="64 MiB", merge="8 MiB")
            out.append(TreeWorkload("tree-" + name, desc, TREE_ARTIFACT.name, (),
                                    Target("ratio", 1.0), case=c.name, baseline=suffix,
                                    params=CASE_PARAMS))
    return out


TREE_WORKLOADS: list[TreeWorkload] = _workloads()


# --------------------------------------------------------------------------- running
def _copytree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    run_checked(["cp", "-a", "--reflink=auto", "--sparse=always", str(src), str(dst)])


def _fresh_dir(p: Path) -> Path:
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    return p


def _copy_disks(files: dict[str, Path], side: Side) -> None:
    side.dir.mkdir(parents=True)
    for d in DISKS:
        run_checked(["cp", "--reflink=auto", "--sparse=always", str(files[d]), side.disk(d)])


def _tree(state: Path, backend=None):
    from qcow2engine.tree import Tree
    return Tree(str(state), backend=backend)


def _build_engine(case: Case, files, root: Path, qemu_img: str, params: dict) -> None:
    side = Side(_fresh_dir(root), qemu_img, params)
    _copy_disks(files, side)
    t = _tree(root / "state")
    try:
        m = t.define(MACHINE, {d: side.disk(d) for d in DISKS})
        case.setup(side, m)
    finally:
        t.close()


def _build_qemu(b: Baseline, files, root: Path, qemu_img: str, params: dict) -> None:
    side = Side(_fresh_dir(root), qemu_img, params)
    _copy_disks(files, side)
    b.setup(side)


def _info(qemu_img: str, path: str, chain: bool = False):
    argv = [qemu_img, "info", "--output=json", "-U"] + (["--backing-chain"] if chain else [])
    return json.loads(subprocess.run(argv + [path], check=True, capture_output=True,
                                     text=True).stdout)


def _verify(b: Baseline, eroot: Path, qroot: Path, qemu_img: str) -> str | None:
    """None when the engine's result and the script's agree."""
    es = Side(eroot, qemu_img, {})
    qs = Side(qroot, qemu_img, {})
    t = _tree(eroot / "state")
    try:
        m = t.machine(MACHINE)
        bad = m.check()
        if bad:
            return "tree check: %s" % bad[0]
        info = m.info()
    finally:
        t.close()
    for dd in info["disks"]:
        d, ea = dd["name"], dd["active"]
        qa = b.active(qs, d)
        r = subprocess.run([qemu_img, "compare", "-q", ea, qa], capture_output=True, text=True)
        if r.returncode != 0:
            return "%s: %s differs from %s" % (d, os.path.basename(ea), os.path.basename(qa))
        ei, qi = _info(qemu_img, ea, True), _info(qemu_img, qa, True)
        if len(ei) != len(qi) and b.same_files:
            return "%s: chain of %d images vs %d" % (d, len(ei), len(qi))
        tags = [sorted(s["name"] for s in x[0].get("snapshots", [])) for x in (ei, qi)]
        if tags[0] != tags[1]:
            return "%s: internal snapshots %s vs %s" % (d, tags[0], tags[1])
        for p in dd["chain"]:
            chk = subprocess.run([qemu_img, "check", "-q", p], capture_output=True, text=True)
            if chk.returncode != 0:
                return "%s: qemu-img check %s: %s" % (d, os.path.basename(p),
                                                     chk.stdout.strip()[-60:])
    if b.same_files:
        ef = sorted(os.listdir(es.dir))
        qf = sorted(os.listdir(qs.dir))
        if ef != qf:
            return "files %s vs %s" % (sorted(set(ef) - set(qf)), sorted(set(qf) - set(ef)))
    return None


_DONE: dict = {}      # (case, profile, workdir) -> {row suffix: TreeWorkloadResult}


def run_case(case: Case, files: dict[str, Path], work: Path, qemu_img: str, repeat: int,
             timeout: float | None, budget: float | None, params: dict,
             profile: str) -> dict[str, TreeWorkloadResult]:
    """Every row of one case: {baseline suffix: result}."""
    from qcow2engine.tree.offline import OfflineBackend

    base = work / case.name
    root = {"engine": base / "run-engine"}
    for suffix in case.baselines:
        root["qemu" + suffix] = base / ("run-qemu" + suffix)
    tpl = {k: base / ("tpl-" + k) for k in root}
    t0 = time.perf_counter()
    _build_engine(case, files, root["engine"], qemu_img, params)
    for suffix, b in case.baselines.items():
        _build_qemu(b, files, root["qemu" + suffix], qemu_img, params)
    for k in root:                  # built where they run (the paths inside are absolute)
        if tpl[k].exists():
            shutil.rmtree(tpl[k])
        root[k].rename(tpl[k])
    log("    %s: templates built in %.1f s" % (case.name, time.perf_counter() - t0))

    runner = Runner(use_gnu_time=False, fork_for_rss=False)
    names = ["qemu" + s for s in case.baselines] + ["engine"]
    cmds = {"qemu" + s: b.commands(Side(root["qemu" + s], qemu_img, params), qemu_img)
            for s, b in case.baselines.items()}
    parts: dict[str, list] = {"overhead": [], "looking": [], "steps": []}
    calls: dict = {}
    stdout = base / "qemu.stdout"

    def once(name: str, i: int) -> RunResult:
        _copytree(tpl[name], root[name])
        os.sync()
        what = "warm-up" if i == WARMUP else "run %d" % (i + 1)
        if name != "engine":
            r = runner.run(cmds[name], stdout, timeout)
            log("    %-8s %-14s %8.4f s%s" % (what, name, r.seconds,
                                              "  " + r.error if r.error else ""))
            return r
        tb = TimingBackend(OfflineBackend())
        tree = _tree(root[name] / "state", tb)
        try:
            m = tree.machine(MACHINE)
            tb.reset()
            t1 = time.perf_counter()
            res = case.verb(m)
            dt = time.perf_counter() - t1
        except Exception as exc:  # noqa: BLE001 - report, don't crash
            log("    %-8s engine         error: %s" % (what, exc))
            return RunResult(0.0, None, None, ("error: %s" % exc)[:70])
        finally:
            tree.close()
        if not res.completed:
            return RunResult(dt, None, None, "error: %s" % res.outcome)
        log("    %-8s %-14s %8.4f s  (backend %.4f s: looking %.4f, steps %.4f; "
            "own %.1f ms)" % (what, name, dt, tb.seconds, tb.looking_seconds,
                              tb.seconds - tb.looking_seconds, (dt - tb.seconds) * 1e3))
        if i != WARMUP:
            parts["overhead"].append(dt - tb.seconds)
            parts["looking"].append(tb.looking_seconds)
            parts["steps"].append(tb.seconds - tb.looking_seconds)
            calls.clear()
            calls.update(tb.calls)
        return RunResult(dt, None, 0, None)

    verified: dict[str, str] = {}

    def after_warmup() -> None:
        for s, b in case.baselines.items():
            try:
                verified[s] = _verify(b, root["engine"], root["qemu" + s],
                                      qemu_img) or "ok"
            except Exception as exc:  # noqa: BLE001 - report, don't crash
                verified[s] = "verify error: %s" % exc
            log("    outputs (%s): %s" % ("qemu" + s, verified[s]))

    samples = repeat_alternating(names, repeat, once, warmup=1, budget=budget,
                                 after_warmup=after_warmup)
    out = {}
    for s, b in case.baselines.items():
        w = next(w for w in TREE_WORKLOADS if w.case == case.name and w.baseline == s)
        w = _described(w, params)
        # no RSS: the engine runs in this process, and a vforked qemu-img's ru_maxrss
        # includes this process's high-water mark
        q = samples["qemu" + s]
        stats = {"qemu-img": Samples(q.times, [], q.error), "engine": samples["engine"]}
        out[s] = TreeWorkloadResult(
            w, stats, verify=verified.get(s, "n/a"),
            overhead=Samples(list(parts["overhead"])), looking=Samples(list(parts["looking"])),
            steps=Samples(list(parts["steps"])), calls=dict(calls), note=b.note)
    shutil.rmtree(base, ignore_errors=True)
    return out


def _described(w: TreeWorkload, params: dict) -> TreeWorkload:
    import dataclasses
    desc = DESCRIPTIONS[w.name[len("tree-"):]].format(
        commit="%d MiB" % (params["commit_data"] // MiB),
        merge="%d MiB" % (params["merge_data"] // MiB))
    return dataclasses.replace(w, description=desc)


def run_tree_workload(w: TreeWorkload, files: dict[str, Path], run_dir: Path, qemu_img: str,
                      repeat: int, timeout: float | None, budget: float | None,
                      profile: str) -> TreeWorkloadResult:
    """One row (``benchmarks.run``'s entry): runs the row's case, all its rows at once."""
    key = (w.case, profile, str(run_dir))
    if key not in _DONE:
        params = w.params[profile]
        try:
            _DONE[key] = run_case(CASES[w.case], files, run_dir / "tree", qemu_img, repeat,
                                  timeout, budget, params, profile)
        except Exception as exc:  # noqa: BLE001 - report, don't crash the suite
            log("    %s failed: %s" % (w.case, exc))
            shutil.rmtree(run_dir / "tree" / w.case, ignore_errors=True)
            _DONE[key] = {s: TreeWorkloadResult(
                _described(next(x for x in TREE_WORKLOADS
                                if x.case == w.case and x.baseline == s), params),
                {"qemu-img": Samples(), "engine": Samples()},
                error=("error: %s" % exc)[:90]) for s in CASES[w.case].baselines}
    return _DONE[key][w.baseline]


# --------------------------------------------------------------------------- reporting
OVERHEAD_HEADERS = ["workload", "engine s", "backend looking s", "backend steps s",
                    "tree overhead ms", "target", "result", "backend calls per verb"]


def overhead_rows(results: list) -> list[list[str]]:
    rows = []
    seen = set()
    for r in results:
        if not isinstance(r, TreeWorkloadResult) or r.workload.case in seen:
            continue
        seen.add(r.workload.case)
        o = r.overhead.median
        ok = "-" if o is None else ("PASS" if o <= OVERHEAD_TARGET else "FAIL")
        rows.append([
            "tree-" + r.workload.case,
            fmt_s(r.stats["engine"].median),
            fmt_s(r.looking.median),
            fmt_s(r.steps.median),
            "-" if o is None else "%.1f" % (o * 1e3),
            "<= %.0f ms" % (OVERHEAD_TARGET * 1e3),
            ok,
            " ".join("%s=%d" % kv for kv in sorted(r.calls.items())),
        ])
    return rows


def format_overhead(results: list, markdown: bool = False) -> str:
    """The tree's own time per verb, and the notes of the tree rows ('' without any)."""
    rows = overhead_rows(results)
    if not rows:
        return ""
    head = ("Tree overhead per verb (median verb time through the API minus the time spent "
            "in the backend's methods; backend = looking + steps):")
    out = [head, "", format_table(OVERHEAD_HEADERS, rows, markdown=markdown,
                                  align="lrrrrlll")]
    notes = [(r.workload.name, r.note) for r in results
             if isinstance(r, TreeWorkloadResult) and r.note]
    notes.append(("tree-*", "engine time: the Machine verb in one Python process (Tree "
                            "opened beforehand); qemu-img time: its processes' wall time, "
                            "summed; fresh copies of the same starting files for every run"))
    out += [""] + [("- " if markdown else "note: ") + "%s: %s" % n for n in notes]
    return "\n".join(out)


def overhead_json(results: list) -> dict:
    return {r.workload.name: {"overhead": r.overhead.times, "looking": r.looking.times,
                              "steps": r.steps.times, "calls": r.calls}
            for r in results if isinstance(r, TreeWorkloadResult)}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from benchmarks.harness.artifacts import ensure_artifact
    from benchmarks.harness.report import format_results, machine_info

    ap = argparse.ArgumentParser(prog="python -m benchmarks.tree_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 runs, less data to commit/merge")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs (default 5, quick 3)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="rows whose name (without tree-) starts with NAME")
    ap.add_argument("--workdir", default="/var/tmp/qcow2engine-bench")
    ap.add_argument("--qemu-img", default="qemu-img")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    profile = "quick" if a.quick else "full"
    repeat = a.repeat or (3 if a.quick else 5)
    qemu_img = shutil.which(a.qemu_img) or a.qemu_img
    workdir = Path(a.workdir).resolve()
    sel = [w for w in TREE_WORKLOADS
           if not a.only or any(w.name[5:].startswith(p.removeprefix("tree-")) for p in a.only)]
    files, _ = ensure_artifact(TREE_ARTIFACT, profile, workdir, qemu_img)
    run_dir = workdir / profile / "_run"
    run_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(workdir, qemu_img)
    t0 = time.perf_counter()
    results = []
    for w in sel:
        log("  %s: %s" % (w.name, w.description))
        results.append(run_tree_workload(w, files, run_dir, qemu_img, repeat, None, None,
                                         profile))
    log("tree benchmarks ran in %.1f s" % (time.perf_counter() - t0))
    print(format_results(results, info, profile, repeat, "not measured (engine in process)",
                         markdown=a.markdown))
    print()
    print(format_overhead(results, a.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
