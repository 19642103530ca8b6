"""qemu-img's argument grammar (GNU getopt): options and operands in any order, `--` ends
the options.  Table-driven: for each verb, the same options and operands permuted (operands
keep their relative order), once with qemu-img and once with the engine, each in a fresh copy
of the same directory; both must end with the same exit code and the same result (the
output, or the images written).
"""
from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import pytest

from tests.helpers.engine import engine
from tests.helpers.qemu import qemu_img, qemu_io, assert_clean


def _setup_chain(d: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "4M", check=True)
    qemu_io(d / "base.qcow2", "write -P 0x11 0 1M", "write -P 0x22 2M 512k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2",
             check=True, cwd=d)
    qemu_io(d / "top.qcow2", "write -P 0x33 512k 1M")
    qemu_img("create", "-q", "-f", "qcow2", d / "other.qcow2", "4M", check=True)
    qemu_io(d / "other.qcow2", "write -P 0x44 0 64k")
    qemu_img("create", "-q", "-f", "raw", d / "plain.raw", "4M", check=True)


# (name, option groups, operands, what to compare: "out" (stdout), or the files written)
CASES = [
    ("info", [["-f", "qcow2"], ["--output=json"], ["--backing-chain"], ["-U"]],
     ["top.qcow2"], "out"),
    ("info", [["--output", "json"], ["-f", "qcow2"]], ["base.qcow2"], "out"),
    ("check", [["-f", "qcow2"], ["--output=json"], ["-U"]], ["top.qcow2"], "out"),
    ("check", [["-q"], ["-f", "qcow2"]], ["base.qcow2"], "out"),
    ("map", [["-f", "qcow2"], ["--output=json"], ["--start-offset", "512k"],
             ["--max-length", "2M"]], ["top.qcow2"], "out"),
    ("compare", [["-f", "qcow2"], ["-F", "qcow2"], ["-q"]], ["top.qcow2", "other.qcow2"], "out"),
    ("compare", [["-f", "qcow2"], ["-F", "qcow2"], ["-s"]], ["top.qcow2", "top.qcow2"], "out"),
    ("measure", [["-O", "qcow2"], ["--output=json"], ["-o", "cluster_size=4096"]],
     ["top.qcow2"], "out"),
    ("measure", [["-O", "qcow2"], ["--size", "1G"], ["--output=json"]], [], "out"),
    ("create", [["-f", "qcow2"], ["-b", "base.qcow2"], ["-F", "qcow2"], ["-q"]],
     ["new.qcow2", "8M"], ["new.qcow2"]),
    ("create", [["-f", "qcow2"], ["-o", "cluster_size=4096"], ["-q"]],
     ["new.qcow2", "3M"], ["new.qcow2"]),
    ("convert", [["-f", "qcow2"], ["-O", "qcow2"], ["-q"], ["-c"]],
     ["top.qcow2", "out.qcow2"], ["out.qcow2"]),
    ("convert", [["-O", "raw"], ["-S", "0"]], ["top.qcow2", "out.raw"], ["out.raw"]),
    ("resize", [["-f", "qcow2"], ["-q"]], ["other.qcow2", "+1M"], ["other.qcow2"]),
    ("resize", [["-f", "qcow2"], ["--shrink"], ["-q"]], ["other.qcow2", "-1M"],
     ["other.qcow2"]),
    ("resize", [["-f", "qcow2"], ["-q"]], ["other.qcow2", "-1M"], ["other.qcow2"]),
    ("amend", [["-f", "qcow2"], ["-o", "compat=0.10"], ["-q"]], ["other.qcow2"],
     ["other.qcow2"]),
    ("snapshot", [["-c", "s1"], ["-q"]], ["other.qcow2"], ["other.qcow2"]),
    ("snapshot", [["-c", "s1"], ["-U"], ["-q"]], ["other.qcow2"], ["other.qcow2"]),
    ("rebase", [["-f", "qcow2"], ["-b", "other.qcow2"], ["-F", "qcow2"], ["-q"]],
     ["top.qcow2"], ["top.qcow2"]),
    ("rebase", [["-u"], ["-b", ""], ["-q"]], ["top.qcow2"], ["top.qcow2"]),
    ("commit", [["-f", "qcow2"], ["-q"], ["-d"]], ["top.qcow2"], ["top.qcow2", "base.qcow2"]),
    ("commit", [["-q"], ["-b", "base.qcow2"]], ["top.qcow2"], ["top.qcow2", "base.qcow2"]),
]


def _orders(groups, operands, n, seed):
    """Up to n argument lists: the items (option groups and operands) in orders where the
    operands keep their order; the first is options-first, the second operands-first; each
    also once with `--` before the operands that follow the last option."""
    items = [("o", g) for g in groups] + [("p", [x]) for x in operands]
    seen, out, kept = set(), [], []
    perms = list(itertools.permutations(range(len(items))))
    rnd = random.Random(seed)
    rnd.shuffle(perms)
    first = tuple(range(len(items)))
    last = tuple(range(len(groups), len(items))) + tuple(range(len(groups)))
    opts, pos = list(range(len(groups))), list(range(len(groups), len(items)))
    mixed = tuple(x for pair in itertools.zip_longest(pos, opts) for x in pair if x is not None)
    for perm in [first, last, mixed] + perms:
        ops = [i for i in perm if items[i][0] == "p"]
        if ops != sorted(ops) or perm in seen:
            continue
        seen.add(perm)
        kept.append(perm)
        out.append([t for i in perm for t in items[i][1]])
        if len(out) >= n:
            break
    with_dashdash = []
    for perm in kept[:2]:
        kinds = [items[i][0] for i in perm]
        if "p" not in kinds:
            continue
        k = max([j for j, kind in enumerate(kinds) if kind == "o"], default=-1) + 1
        if k < len(perm):
            args = [t for i in perm[:k] for t in items[i][1]] + ["--"]
            args += [t for i in perm[k:] for t in items[i][1]]
            # a resize size like -1M is qemu-img's last argument, `--` or not
            with_dashdash.append(args)
    return out + with_dashdash


def _ids():
    return ["%s-%d" % (c[0], i) for i, c in enumerate(CASES)]


def _image_state(d: Path, name: str):
    p = d / name
    if not p.exists():
        return None
    info = json.loads(qemu_img("info", "--output=json", "-U", name, cwd=d, check=True).out)
    info.pop("actual-size", None)
    for s in info.get("snapshots", []):
        for k in ("date-sec", "date-nsec"):
            s.pop(k, None)
    return info


@pytest.mark.parametrize("case", CASES, ids=_ids())
def test_options_and_operands_in_any_order(case, tmp_path):
    verb, groups, operands, compare = case
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    _setup_chain(seed_dir)
    for n, argv in enumerate(_orders(groups, operands, 6, verb)):
        qd, ed = tmp_path / ("q%d" % n), tmp_path / ("e%d" % n)
        shutil.copytree(seed_dir, qd)
        shutil.copytree(seed_dir, ed)
        q = qemu_img(verb, *argv, cwd=qd)
        rc, out, err = engine(verb, *argv, cwd=ed)
        assert rc == q.rc, (argv, q, (rc, out, err))
        if compare == "out":
            assert out.replace("qcow2engine", "qemu-img") == q.out, argv
            continue
        for name in compare:
            assert _image_state(ed, name) == _image_state(qd, name), (argv, name)
            if (qd / name).exists():
                r = qemu_img("compare", "-U", qd / name, ed / name, cwd=ed)
                assert r.rc == 0, (argv, name, r)
                if name.endswith(".qcow2"):
                    assert_clean(ed / name)
        shutil.rmtree(qd)
        shutil.rmtree(ed)


def test_orders_cover_intermixed():
    """The generator really intermixes: some order puts an option after an operand."""
    orders = _orders([["-f", "qcow2"], ["-q"]], ["a", "b"], 6, "x")
    assert ["a", "b", "-f", "qcow2", "-q"] in orders
    assert any(o.index("a") < o.index("-f") < o.index("b") for o in orders if "--" not in o)
    assert ["-f", "qcow2", "-q", "--", "a", "b"] in orders
