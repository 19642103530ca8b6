"""The machine snapshot-tree CLI (issue 11) end to end: `qcow2engine [--state-dir DIR] machine
...` and virsh's `snapshot-*` verbs, called in-process through `qcow2engine.cli.main.main`
(stdout/stderr by capsys) and as real processes, on 4 MiB qcow2 disks written by qemu-io.

Guest data is read back with qemu-img (guest_bytes) from each disk's active image as `machine
info --output=json` names it.  Every refused command is checked for exit 1, nothing on stdout,
exactly one line on stderr (no traceback), and an unchanged world: the database's rows (an SQL
dump), `machine info`/`snapshot-list` JSON and the bytes of every image file.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcow2engine.cli.main import main
from tests.helpers.qemu import QemuIoHolder, guest_bytes, qemu_img, qemu_img_info, qemu_io

MiB = 1 << 20
SIZE = 4 * MiB
SLOT = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]
QCOW2ENGINE = ROOT / ".venv" / "bin" / "qcow2engine"
SNAPSHOT_KEYS = {"name", "parent", "created", "state", "current", "auto", "description",
                 "memory", "disks"}


# ---------------------------------------------------------------- harness
class Env:
    """One state directory and the images of its machines, under tmp_path."""

    def __init__(self, tmp_path: Path, capsys):
        self.root = tmp_path
        self.state = str(tmp_path / "state")
        self.capsys = capsys

    # ---- images
    def image(self, rel: str, size: int = SIZE) -> str:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        qemu_img("create", "-q", "-f", "qcow2", str(p), size, check=True)
        return str(p)

    def write(self, path: str, slot: int, pattern: int) -> None:
        qemu_io(path, "write -P %d %d %d" % (pattern, slot * SLOT, SLOT))

    def active(self, machine: str = "m") -> dict:
        return {d["name"]: d["active"] for d in self.info(machine)["disks"]}

    def put(self, disk: str, slot: int, pattern: int, machine: str = "m") -> None:
        """Write a slot of a disk through its active image (as the guest would)."""
        self.write(self.active(machine)[disk], slot, pattern)

    def data(self, machine: str = "m") -> dict:
        """disk -> {slot: pattern} of every slot that is not zero, read from the active
        image by qemu-img."""
        return {d: slots(p) for d, p in self.active(machine).items()}

    # ---- the CLI, in-process
    def cli(self, *args) -> tuple:
        self.capsys.readouterr()
        rc = main(["--state-dir", self.state, *map(str, args)])
        out, err = self.capsys.readouterr()
        return rc, out, err

    def ok(self, *args) -> str:
        rc, out, err = self.cli(*args)
        assert rc == 0, (args, rc, out, err)
        return out

    def quiet_ok(self, *args) -> str:
        rc, out, err = self.cli(*args)
        assert (rc, err) == (0, ""), (args, rc, out, err)
        return out

    def json(self, *args):
        return json.loads(self.quiet_ok(*args, "--output=json"))

    def info(self, machine: str = "m") -> dict:
        return self.json("machine", "info", machine)

    def snaps(self, machine: str = "m", *flags) -> list:
        return self.json("snapshot-list", machine, *flags)

    def snap(self, name: str, machine: str = "m") -> dict:
        return next(s for s in self.snaps(machine) if s["name"] == name)

    def names(self, *flags, machine: str = "m") -> list:
        out = self.quiet_ok("snapshot-list", machine, "--name", *flags)
        assert out.endswith("\n\n") or out == "\n", out
        return out.split("\n")[:-2] if out != "\n" else []

    def fail(self, *args, match: str = "") -> str:
        """A refused command: exit 1, nothing on stdout, one line on stderr."""
        rc, out, err = self.cli(*args)
        assert rc == 1, (args, rc, out, err)
        assert out == "", (args, out)
        one_line(err)
        assert re.search(match, err), (args, match, err)
        return err

    # ---- the CLI, as a process
    def proc(self, *args, module: bool = False) -> subprocess.CompletedProcess:
        argv = ([sys.executable, "-m", "qcow2engine"] if module else [str(QCOW2ENGINE)])
        return subprocess.run(argv + ["--state-dir", self.state, *map(str, args)],
                              capture_output=True, text=True, timeout=60, cwd=str(self.root),
                              stdin=subprocess.DEVNULL)

    # ---- everything a refused command must leave as it was
    def world(self, machines=("m",)) -> dict:
        con = sqlite3.connect(os.path.join(self.state, "machines.db"))
        try:
            dump = [line for line in con.iterdump()]
        finally:
            con.close()
        files = {}
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and "state" not in p.relative_to(self.root).parts[:1]:
                files[str(p)] = p.read_bytes()
        return {"db": dump, "files": files,
                "machines": self.json("machine", "list"),
                "info": {m: self.info(m) for m in machines},
                "snapshots": {m: self.snaps(m) for m in machines}}


def one_line(err: str) -> None:
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert err.startswith("qcow2engine: "), repr(err)
    assert "Traceback" not in err, err


def slots(path: str) -> dict:
    data = guest_bytes(path)
    assert len(data) == SIZE
    out = {}
    for off in range(0, len(data), SLOT):
        chunk = data[off:off + SLOT]
        if chunk != bytes(SLOT):
            assert chunk == bytes([chunk[0]]) * SLOT, (path, off)
            out[off // SLOT] = chunk[0]
    return out


def tags(path: str) -> list:
    return [s["name"] for s in qemu_img_info(path, force_share=True).get("snapshots", [])]


def backing(path: str):
    info = qemu_img_info(path, force_share=True)
    return info.get("full-backing-filename")


def when(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


@pytest.fixture
def env(tmp_path, capsys):
    return Env(tmp_path, capsys)


def define(env: Env, name: str = "m") -> dict:
    """A machine with two disks, each in its own folder: {disk: image path}."""
    disks = {d: env.image("%s/%s/%s.qcow2" % (name, d, d)) for d in ("vda", "vdb")}
    out = env.quiet_ok("machine", "define", name, *[x for d, p in disks.items()
                                                     for x in ("--disk", "%s=%s" % (d, p))])
    assert out == "Machine %s defined\n" % name
    return disks


def build_tree(env: Env) -> dict:
    """The small tree: a, b child of a, c child of b, d child of a -- a and c internal, b and
    d external (--disk-only).  Returns what the test needs to know about it."""
    disks = define(env)
    t = {"disks": disks, "t0": int(time.time())}
    env.put("vda", 0, 1); env.put("vdb", 0, 11)
    assert env.quiet_ok("snapshot-create-as", "m", "a", "--description",
                        "first one") == "Domain snapshot a created\n"
    env.put("vda", 1, 2)
    assert env.quiet_ok("snapshot-create-as", "m", "b", "--disk-only") == \
        "Domain snapshot b created\n"
    t["b_overlay"] = env.active()
    env.put("vdb", 1, 12)
    assert env.quiet_ok("snapshot-create-as", "m", "c") == "Domain snapshot c created\n"
    t["c_data"] = env.data()
    # the tip has not changed since c: going back to a takes no automatic snapshot
    assert env.quiet_ok("snapshot-revert", "m", "a") == ""
    assert env.data() == {"vda": {0: 1}, "vdb": {0: 11}}
    env.put("vda", 2, 3)
    t["d_base"] = env.active()
    assert env.quiet_ok("snapshot-create-as", "m", "d", "--disk-only") == \
        "Domain snapshot d created\n"
    t["t1"] = int(time.time())
    t["states"] = {"a": {"vda": {0: 1}, "vdb": {0: 11}},
                   "b": {"vda": {0: 1, 1: 2}, "vdb": {0: 11}},
                   "c": {"vda": {0: 1, 1: 2}, "vdb": {0: 11, 1: 12}},
                   "d": {"vda": {0: 1, 2: 3}, "vdb": {0: 11}}}
    assert t["c_data"] == t["states"]["c"]
    return t


def auto_names(env: Env) -> list:
    return [d["name"] for d in env.snaps() if d["auto"]]


TREE = (
    "a\n"
    "  |\n"
    "  +- b\n"
    "  |   |\n"
    "  |   +- c\n"
    "  |     \n"
    "  +- d\n"
    "    \n"
    "\n")


# ---------------------------------------------------------------- 1. machines
def test_machine_define_list_info_undefine(env, monkeypatch):
    monkeypatch.chdir(env.root)
    for rel in ("m/vda/vda.qcow2", "m/vdb/vdb.qcow2", "Alpha/vda.qcow2"):
        env.image(rel)
    # relative paths at define: absolute everywhere afterwards
    assert env.quiet_ok("machine", "define", "m", "--disk", "vda=m/vda/vda.qcow2",
                        "--disk", "vdb=m/vdb/vdb.qcow2") == "Machine m defined\n"
    assert env.quiet_ok("machine", "define", "Alpha", "--disk",
                        "vda=Alpha/vda.qcow2") == "Machine Alpha defined\n"
    vda, vdb = str(env.root / "m/vda/vda.qcow2"), str(env.root / "m/vdb/vdb.qcow2")
    assert env.quiet_ok("machine", "list") == (
        " Id   Name    State\n"
        "------------------------\n"
        " -    Alpha   shut off\n"
        " -    m       shut off\n"
        "\n")
    assert env.json("machine", "list") == [{"name": "Alpha", "state": "shut off"},
                                           {"name": "m", "state": "shut off"}]
    assert env.info() == {
        "name": "m", "state": "shut off", "current": None, "qmp": None, "pid": None,
        "serial": None, "launch": None,
        "disks": [{"name": "vda", "format": "qcow2", "active": vda, "chain": [vda]},
                  {"name": "vdb", "format": "qcow2", "active": vdb, "chain": [vdb]}],
        "operation": None}
    human = env.quiet_ok("machine", "info", "m")
    assert human.splitlines()[0].split() == ["Name:", "m"]
    assert "shut off" in human and vda in human and vdb in human
    # the chain grows with an external snapshot, and is shown through the whole chain
    env.quiet_ok("snapshot-create-as", "m", "s", "--disk-only")
    ov = str(env.root / "m/vda/m-vda.s.qcow2")
    assert env.info()["disks"][0] == {"name": "vda", "format": "qcow2", "active": ov,
                                      "chain": [ov, vda]}
    assert env.info()["current"] == "s"
    # the real program, end to end
    p = env.proc("machine", "list")
    assert (p.returncode, p.stderr) == (0, "")
    assert p.stdout.splitlines()[2:4] == [" -    Alpha   shut off", " -    m       shut off"]
    p = env.proc("machine", "info", "m", "--output=json")
    assert (p.returncode, p.stderr) == (0, "") and json.loads(p.stdout) == env.info()
    # undefine forgets the machine and touches no file
    files = {p: Path(p).read_bytes() for p in (vda, vdb, ov)}
    assert env.quiet_ok("machine", "undefine", "m") == "Machine m has been undefined\n"
    assert env.json("machine", "list") == [{"name": "Alpha", "state": "shut off"}]
    assert {p: Path(p).read_bytes() for p in files} == files
    env.fail("machine", "info", "m", match="'m'")
    env.fail("snapshot-list", "m", match="'m'")
    # the images are free again: a new machine can be defined on them
    env.quiet_ok("machine", "define", "m", "--disk", "vda=" + ov)
    assert env.info()["disks"][0]["chain"] == [ov, vda]


# ---------------------------------------------------------------- 2. snapshot-create-as
def test_create_as_kinds_names_and_files(env, monkeypatch):
    disks = define(env)
    vda, vdb = disks["vda"], disks["vdb"]
    env.put("vda", 0, 1); env.put("vdb", 0, 2)
    assert env.quiet_ok("snapshot-create-as", "m", "s1", "--description",
                        "hello world") == "Domain snapshot s1 created\n"
    s1 = env.snap("s1")
    assert s1["description"] == "hello world" and s1["current"] and s1["parent"] is None
    assert s1["disks"] == {"vda": {"snapshot": "internal", "file": vda},
                           "vdb": {"snapshot": "internal", "file": vdb}}
    assert s1["state"] == "shutoff" and s1["memory"] == "no" and s1["auto"] is False
    assert tags(vda) == ["s1"] and tags(vdb) == ["s1"]
    assert env.active() == disks                      # internal: no new file

    # --disk-only: external everywhere, <folder>/<machine>-<disk>.<snapshot>.qcow2
    env.put("vda", 1, 3)
    assert env.quiet_ok("snapshot-create-as", "m", "s2", "--disk-only") == \
        "Domain snapshot s2 created\n"
    ov = {d: os.path.join(os.path.dirname(p), "m-%s.s2.qcow2" % d) for d, p in disks.items()}
    assert env.active() == ov
    for d in disks:
        assert os.path.exists(ov[d]) and backing(ov[d]) == disks[d]
    s2 = env.snap("s2")
    assert s2["parent"] == "s1" and s2["state"] == "disk-snapshot"
    assert s2["disks"] == {"vda": {"snapshot": "external", "file": vda},
                           "vdb": {"snapshot": "external", "file": vdb}}
    assert env.data() == {"vda": {0: 1, 1: 3}, "vdb": {0: 2}}

    # --diskspec: file= honoured (a relative one too), snapshot=no leaves the disk alone
    other = env.root / "elsewhere"
    other.mkdir()
    env.put("vda", 2, 4)
    monkeypatch.chdir(env.root)
    assert env.quiet_ok("snapshot-create-as", "m", "s3", "--diskspec",
                        "vda,snapshot=external,file=elsewhere/top.qcow2",
                        "--diskspec", "vdb,snapshot=no") == "Domain snapshot s3 created\n"
    assert env.active() == {"vda": str(other / "top.qcow2"), "vdb": ov["vdb"]}
    assert backing(str(other / "top.qcow2")) == ov["vda"]
    s3 = env.snap("s3")
    assert s3["disks"]["vda"] == {"snapshot": "external", "file": ov["vda"]}
    assert s3["disks"]["vdb"]["snapshot"] == "no"
    assert env.info()["disks"][0]["chain"] == [str(other / "top.qcow2"), ov["vda"], vda]
    assert env.info()["disks"][1]["chain"] == [ov["vdb"], vdb]

    # mixed: internal on one disk, external on the other (in the active image's folder)
    env.put("vdb", 3, 5)
    env.quiet_ok("snapshot-create-as", "m", "s4", "--diskspec", "vda,snapshot=internal",
                 "--diskspec", "vdb,snapshot=external")
    assert tags(str(other / "top.qcow2")) == ["s4"]
    assert env.active()["vdb"] == os.path.join(os.path.dirname(ov["vdb"]), "m-vdb.s4.qcow2")
    s4 = env.snap("s4")
    assert s4["disks"] == {"vda": {"snapshot": "internal", "file": str(other / "top.qcow2")},
                           "vdb": {"snapshot": "external", "file": ov["vdb"]}}
    assert [s["name"] for s in env.snaps()] == ["s1", "s2", "s3", "s4"]
    assert [s["current"] for s in env.snaps()] == [False, False, False, True]
    assert env.data() == {"vda": {0: 1, 1: 3, 2: 4}, "vdb": {0: 2, 3: 5}}
    for p in [vda, vdb, *ov.values(), str(other / "top.qcow2"), env.active()["vdb"]]:
        assert qemu_img("check", p).rc == 0, p


# ---------------------------------------------------------------- 3. snapshot-list
def test_snapshot_list_views(env):
    t = build_tree(env)
    vda, vdb = t["disks"]["vda"], t["disks"]["vdb"]
    assert env.quiet_ok("snapshot-list", "m", "--tree") == TREE
    docs = env.snaps()
    assert [d["name"] for d in docs] == ["a", "b", "c", "d"]       # in creation order
    for d in docs:
        assert SNAPSHOT_KEYS <= set(d), d
        assert t["t0"] - 1 <= d["created"] <= t["t1"] + 1 and isinstance(d["created"], int)
    created = {d["name"]: d["created"] for d in docs}
    expect = {
        "a": dict(parent=None, state="shutoff", current=False, description="first one",
                  disks={"vda": {"snapshot": "internal", "file": vda},
                         "vdb": {"snapshot": "internal", "file": vdb}}),
        "b": dict(parent="a", state="disk-snapshot", current=False, description="",
                  disks={"vda": {"snapshot": "external", "file": vda},
                         "vdb": {"snapshot": "external", "file": vdb}}),
        "c": dict(parent="b", state="shutoff", current=False, description="",
                  disks={d: {"snapshot": "internal", "file": t["b_overlay"][d]}
                         for d in ("vda", "vdb")}),
        "d": dict(parent="a", state="disk-snapshot", current=True, description="",
                  disks={d: {"snapshot": "external", "file": t["d_base"][d]}
                         for d in ("vda", "vdb")}),
    }
    for d in docs:
        want = dict(expect[d["name"]], name=d["name"], created=d["created"], auto=False,
                    memory="no")
        assert {k: d[k] for k in SNAPSHOT_KEYS} == want
    # d's overlays: the default names in each disk's folder, on the images at d
    for disk, base in t["d_base"].items():
        ov = os.path.join(os.path.dirname(t["disks"][disk]), "m-%s.d.qcow2" % disk)
        assert env.active()[disk] == ov and backing(ov) == base

    row = " %s      %s   %s"
    assert env.quiet_ok("snapshot-list", "m") == (
        " Name   Creation Time               State\n"
        "---------------------------------------------------\n"
        + "".join((row % (n, when(created[n]), expect[n]["state"])).rstrip() + "\n"
                  for n in "abcd") + "\n")
    prow = " %s      %s   %-13s   %s\n"
    assert env.quiet_ok("snapshot-list", "m", "--parent") == (
        " Name   Creation Time               State           Parent\n"
        "------------------------------------------------------------\n"
        + "".join(prow % (n, when(created[n]), expect[n]["state"], expect[n]["parent"] or "")
                  for n in "abcd") + "\n")
    assert env.quiet_ok("snapshot-list", "m", "--name") == "a\nb\nc\nd\n\n"
    assert env.names("--roots") == ["a"]
    assert env.names("--leaves") == ["c", "d"]
    assert env.names("--no-leaves") == ["a", "b"]
    assert env.names("--from", "a") == ["b", "d"]
    assert env.names("--from", "a", "--descendants") == ["b", "c", "d"]
    assert env.names("--from", "b") == ["c"]
    assert env.names("--from", "c") == []
    assert env.names("--internal") == ["a", "c"]
    assert env.names("--external") == ["b", "d"]
    assert env.names("--roots", "--external") == []
    assert env.names("--leaves", "--internal") == ["c"]
    assert [d["name"] for d in env.snaps("m", "--leaves")] == ["c", "d"]
    assert [d["name"] for d in env.snaps("m", "--from", "a", "--descendants")] == \
        ["b", "c", "d"]
    assert env.quiet_ok("snapshot-list", "m", "--tree", "--from", "b") == (
        "b\n"
        "  |\n"
        "  +- c\n"
        "    \n"
        "\n")
    assert env.quiet_ok("snapshot-list", "m", "--tree", "--from", "a") == TREE
    env.fail("snapshot-list", "m", "--from", "zz", match="zz")
    # the real program prints the same tree
    p = env.proc("snapshot-list", "m", "--tree", module=True)
    assert (p.returncode, p.stdout, p.stderr) == (0, TREE, "")


# ---------------------------------------------------------------- 4. info, current, parent
def test_snapshot_info_current_parent(env):
    t = build_tree(env)
    assert env.quiet_ok("snapshot-info", "m", "b") == (
        "Name:           b\n"
        "Domain:         m\n"
        "Current:        no\n"
        "State:          disk-snapshot\n"
        "Location:       external\n"
        "Parent:         a\n"
        "Children:       1\n"
        "Descendants:    1\n"
        "Metadata:       yes\n"
        "\n")
    assert env.quiet_ok("snapshot-info", "m", "a") == (
        "Name:           a\n"
        "Domain:         m\n"
        "Current:        no\n"
        "State:          shutoff\n"
        "Location:       internal\n"
        "Parent:         -\n"
        "Children:       2\n"
        "Descendants:    3\n"
        "Metadata:       yes\n"
        "\n")
    assert env.quiet_ok("snapshot-info", "m", "--current") == (
        "Name:           d\n"
        "Domain:         m\n"
        "Current:        yes\n"
        "State:          disk-snapshot\n"
        "Location:       external\n"
        "Parent:         a\n"
        "Children:       0\n"
        "Descendants:    0\n"
        "Metadata:       yes\n"
        "\n")
    listed = {d["name"]: d for d in env.snaps()}
    for name, kids, desc in (("a", 2, 3), ("b", 1, 1), ("c", 0, 0), ("d", 0, 0)):
        doc = env.json("snapshot-info", "m", name)
        assert doc == dict(listed[name], children=kids, descendants=desc)
    assert env.json("snapshot-info", "m", "--current") == env.json("snapshot-info", "m", "d")

    assert env.quiet_ok("snapshot-current", "m", "--name") == "d\n"
    assert env.quiet_ok("snapshot-parent", "m", "c") == "b\n"
    assert env.quiet_ok("snapshot-parent", "m", "d") == "a\n"
    env.fail("snapshot-parent", "m", "a", match="parent")

    # setting the current snapshot moves no file and no byte
    before = env.world()
    assert env.quiet_ok("snapshot-current", "m", "b") == "Snapshot b set as current\n"
    after = env.world()
    assert after["files"] == before["files"]
    assert env.quiet_ok("snapshot-current", "m", "--name") == "b\n"
    assert env.info()["current"] == "b"
    assert env.info()["disks"] == before["info"]["m"]["disks"]
    assert [d["name"] for d in env.snaps() if d["current"]] == ["b"]
    assert env.json("snapshot-info", "m", "--current")["name"] == "b"
    assert env.quiet_ok("snapshot-info", "m", "b").splitlines()[2] == "Current:        yes"
    assert env.data() == {"vda": {0: 1, 2: 3}, "vdb": {0: 11}}       # d's tip, untouched
    env.fail("snapshot-current", "m", "zz", match="zz")
    p = env.proc("snapshot-current", "m", "--name")
    assert (p.returncode, p.stdout, p.stderr) == (0, "b\n", "")


def test_every_snapshot_of_the_tree_reverts_to_its_state(env):
    t = build_tree(env)
    for name in ("b", "c", "a", "d", "c", "b", "d"):
        assert env.quiet_ok("snapshot-revert", "m", name) == "", name
        assert env.data() == t["states"][name], name
        assert env.quiet_ok("snapshot-current", "m", "--name") == name + "\n"
    assert auto_names(env) == []                # the tip never changed
    assert env.quiet_ok("snapshot-list", "m", "--tree") == TREE
    frozen = {p: Path(p).read_bytes() for p in t["disks"].values()}
    env.put("vdb", 9, 99)
    out = env.quiet_ok("snapshot-revert", "m", "c")
    auto = re.fullmatch(r"Domain snapshot (auto-\d{8}-\d{6}) keeps the tip\n", out).group(1)
    assert env.data() == t["states"]["c"]
    assert {p: Path(p).read_bytes() for p in frozen} == frozen
    assert env.snap(auto)["parent"] == "d" and env.snap(auto)["auto"] is True
    assert env.quiet_ok("snapshot-revert", "m", auto, "--follow") == ""
    assert env.data() == {"vda": {0: 1, 2: 3}, "vdb": {0: 11, 9: 99}}
    for d in env.info()["disks"]:
        for p in d["chain"]:
            assert qemu_img("check", p).rc == 0, p


# ---------------------------------------------------------------- 5. snapshot-revert
def test_revert_reset_follow_auto_current(env):
    disks = define(env)
    env.put("vda", 0, 1); env.put("vdb", 0, 11)
    env.quiet_ok("snapshot-create-as", "m", "a", "--disk-only")
    env.put("vda", 1, 2); env.put("vdb", 1, 12)
    env.quiet_ok("snapshot-create-as", "m", "b", "--disk-only")
    env.put("vda", 2, 3)                                    # the tip goes on after b
    a_state = {"vda": {0: 1}, "vdb": {0: 11}}
    b_state = {"vda": {0: 1, 1: 2}, "vdb": {0: 11, 1: 12}}
    b_tip = {"vda": {0: 1, 1: 2, 2: 3}, "vdb": {0: 11, 1: 12}}
    base = {p: Path(p).read_bytes() for p in disks.values()}  # a's bases: frozen

    # the default is --reset; the changed tip is kept as an automatic snapshot
    out = env.quiet_ok("snapshot-revert", "m", "a")
    m = re.fullmatch(r"Domain snapshot (auto-\d{8}-\d{6}) keeps the tip\n", out)
    assert m, out
    auto = m.group(1)
    assert auto_names(env) == [auto]
    doc = env.snap(auto)
    assert doc["auto"] is True and doc["parent"] == "b" and doc["current"] is False
    assert env.quiet_ok("snapshot-current", "m", "--name") == "a\n"
    assert env.data() == a_state
    assert {p: Path(p).read_bytes() for p in base} == base
    for d, p in disks.items():
        assert backing(env.active()[d]) == p               # a new overlay on a's base

    # --follow: b's branch where it was left (its tip); nothing changed since a: no auto
    assert env.quiet_ok("snapshot-revert", "m", "b", "--follow") == ""
    assert env.data() == b_tip and auto_names(env) == [auto]
    assert env.quiet_ok("snapshot-current", "m", "--name") == "b\n"

    # --no-auto-snapshot: the changed tip is thrown away
    env.put("vda", 3, 4)
    assert env.quiet_ok("snapshot-revert", "m", "a", "--no-auto-snapshot") == ""
    assert env.data() == a_state and auto_names(env) == [auto]

    # --current: back to the current snapshot (undo since a), no automatic snapshot
    env.put("vdb", 4, 5); env.put("vda", 5, 6)
    assert env.data() != a_state
    assert env.quiet_ok("snapshot-revert", "m", "--current") == ""
    assert env.data() == a_state and auto_names(env) == [auto]

    # --reset (explicit) to b, with -p: progress on stderr only
    rc, out, err = env.cli("snapshot-revert", "m", "b", "--reset", "-p")
    assert (rc, out) == (0, "")
    assert "100.00/100%" in err and "Traceback" not in err
    assert env.data() == b_state
    assert env.quiet_ok("snapshot-current", "m", "--name") == "b\n"
    # b's branch tip is still there, as the automatic snapshot: follow it
    assert env.quiet_ok("snapshot-revert", "m", auto, "--follow") == ""
    assert env.data() == b_tip
    assert env.quiet_ok("snapshot-current", "m", "--name") == auto + "\n"
    # every file the tree knows is clean
    for d in env.info()["disks"]:
        for p in d["chain"]:
            assert qemu_img("check", p).rc == 0, p
    # the real program: a revert that prints nothing
    p = env.proc("snapshot-revert", "m", "a")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert env.data() == a_state


def test_revert_commit_and_discard(env):
    disks = define(env)
    vda = disks["vda"]
    env.put("vda", 0, 1); env.put("vdb", 0, 11)
    env.quiet_ok("snapshot-create-as", "m", "a", "--disk-only")
    overlay = env.active()
    env.put("vda", 1, 2); env.put("vdb", 1, 12)
    tip = {"vda": {0: 1, 1: 2}, "vdb": {0: 11, 1: 12}}

    # --commit -p: the overlay is merged down into a's base; a names the merged state,
    # a new empty overlay is active; the chain is as short as before a
    rc, out, err = env.cli("snapshot-revert", "m", "a", "--commit", "-p")
    assert rc == 0 and "Traceback" not in err
    assert "100.00/100%" in err
    assert env.data() == tip
    assert slots(vda) == tip["vda"] and slots(disks["vdb"]) == tip["vdb"]
    for d in env.info()["disks"]:
        assert len(d["chain"]) == 2 and d["chain"][1] == disks[d["name"]], d
        assert slots(d["active"]) == slots(disks[d["name"]])
    assert [s["name"] for s in env.snaps()] == ["a"]
    a = env.snap("a")
    assert a["current"] and a["disks"]["vda"] == {"snapshot": "external", "file": vda}
    known = {p for d in env.info()["disks"] for p in d["chain"]}
    on_disk = {str(p) for p in (env.root / "m").rglob("*.qcow2")}
    assert on_disk == known, on_disk ^ known               # the old overlays are gone
    for p in known:
        assert qemu_img("check", p).rc == 0

    # --commit --discard: merged again, a is gone, its base is the active image again
    env.put("vda", 2, 3)
    tip = {"vda": {0: 1, 1: 2, 2: 3}, "vdb": {0: 11, 1: 12}}
    env.ok("snapshot-revert", "m", "a", "--commit", "--discard")
    assert env.snaps() == []
    assert env.info()["current"] is None
    assert env.active() == disks
    assert [d["chain"] for d in env.info()["disks"]] == [[vda], [disks["vdb"]]]
    assert env.data() == tip
    assert {str(p) for p in (env.root / "m").rglob("*.qcow2")} == set(disks.values())
    assert not os.path.exists(overlay["vda"]) and not os.path.exists(overlay["vdb"])


def test_revert_commit_refused_on_shared_base_then_forced(env):
    disks = define(env)
    env.put("vda", 0, 1)
    env.quiet_ok("snapshot-create-as", "m", "a", "--disk-only")
    env.put("vda", 1, 2)
    env.quiet_ok("snapshot-create-as", "m", "b", "--disk-only")
    assert env.quiet_ok("snapshot-revert", "m", "a") == ""     # a's base: two branches now
    env.put("vda", 2, 3)
    before = env.world()
    err = env.fail("snapshot-revert", "m", "a", "--commit", match="shared")
    assert "'b'" in err and "--force" in err
    assert env.world() == before
    rc, out, err = env.cli("snapshot-revert", "m", "a", "--commit", "--force")
    assert rc == 0 and "Traceback" not in err
    assert re.search(r"--force.*'b'", err), err                 # says what it deleted
    assert env.names() == ["a"]
    assert env.data() == {"vda": {0: 1, 2: 3}, "vdb": {}}
    assert slots(disks["vda"]) == {0: 1, 2: 3}
    known = {p for d in env.info()["disks"] for p in d["chain"]}
    assert {str(p) for p in (env.root / "m").rglob("*.qcow2")} == known


def test_revert_discard_reset_internal(env):
    disks = define(env)
    env.put("vda", 0, 1); env.put("vdb", 0, 11)
    env.quiet_ok("snapshot-create-as", "m", "a")
    env.put("vda", 1, 2)
    env.quiet_ok("snapshot-create-as", "m", "b")
    env.put("vdb", 2, 13)
    # internal snapshots on the active images: applied in place; --discard deletes a after
    env.ok("snapshot-revert", "m", "a", "--discard", "--no-auto-snapshot")
    assert env.data() == {"vda": {0: 1}, "vdb": {0: 11}}
    assert env.active() == disks
    assert [(s["name"], s["parent"]) for s in env.snaps()] == [("b", None)]
    assert tags(disks["vda"]) == ["b"] and tags(disks["vdb"]) == ["b"]
    assert env.info()["current"] is None
    # b is still whole
    env.ok("snapshot-revert", "m", "b")
    assert env.data() == {"vda": {0: 1, 1: 2}, "vdb": {0: 11}}
    assert env.quiet_ok("snapshot-current", "m", "--name") == "b\n"
    # --follow --discard on an external one: the tip of its branch, then it is gone
    env.quiet_ok("snapshot-create-as", "m", "e", "--disk-only")
    env.put("vda", 3, 4)
    # --no-auto-snapshot throws e's changes away: following e finds e as it was made
    assert env.quiet_ok("snapshot-revert", "m", "b", "--no-auto-snapshot") == ""
    assert env.data() == {"vda": {0: 1, 1: 2}, "vdb": {0: 11}}
    assert env.quiet_ok("snapshot-revert", "m", "e", "--follow") == ""
    assert env.data() == {"vda": {0: 1, 1: 2}, "vdb": {0: 11}}
    env.put("vda", 4, 5)
    out = env.quiet_ok("snapshot-revert", "m", "b")           # kept this time
    auto = re.fullmatch(r"Domain snapshot (auto-\S+) keeps the tip\n", out).group(1)
    env.ok("snapshot-revert", "m", "e", "--follow", "--discard")
    assert env.data() == {"vda": {0: 1, 1: 2, 4: 5}, "vdb": {0: 11}}
    assert [(s["name"], s["parent"]) for s in env.snaps()] == [("b", None), (auto, "b")]
    assert env.info()["current"] == "b"                  # e's parent, as e is gone
    for d in env.info()["disks"]:
        for p in d["chain"]:
            assert qemu_img("check", p).rc == 0, p


# ---------------------------------------------------------------- 6. snapshot-delete
def test_snapshot_delete_variants(env):
    t = build_tree(env)
    tip = env.data()
    assert tip == {"vda": {0: 1, 2: 3}, "vdb": {0: 11}}
    # a leaf: internal, its tags leave the images that held them
    out = env.quiet_ok("snapshot-delete", "m", "c")
    assert out.splitlines()[0] == "Domain snapshot c deleted"
    assert env.names() == ["a", "b", "d"]
    for d in ("vda", "vdb"):                  # b's overlay held c; nothing else needs it
        p = t["b_overlay"][d]
        assert not os.path.exists(p) or "c" not in tags(p), p
    assert env.data() == tip
    # --metadata: forgotten, no byte of any file changes
    before = env.world()
    out = env.quiet_ok("snapshot-delete", "m", "d", "--metadata")
    assert out.splitlines()[0] == "Domain snapshot d deleted"
    assert env.world()["files"] == before["files"]
    assert env.names() == ["a", "b"]
    assert env.info()["current"] == "a"                  # its parent is current
    assert env.data() == tip
    # --children-only: a stays, b goes
    out = env.quiet_ok("snapshot-delete", "m", "a", "--children-only")
    assert out.splitlines()[0] == "Domain snapshot a children deleted"
    assert env.names() == ["a"]
    assert env.json("snapshot-info", "m", "a")["children"] == 0
    assert env.data() == tip
    # a's state is still whole (reverting to the current snapshot: undo, no auto snapshot)
    assert env.quiet_ok("snapshot-revert", "m", "a") == ""
    assert env.data() == t["states"]["a"] and env.names() == ["a"]
    env.put("vdb", 7, 8)
    tip = env.data()
    env.quiet_ok("snapshot-create-as", "m", "x", "--disk-only")
    env.quiet_ok("snapshot-create-as", "m", "y")
    assert env.quiet_ok("snapshot-list", "m", "--tree") == (
        "a\n"
        "  |\n"
        "  +- x\n"
        "      |\n"
        "      +- y\n"
        "        \n"
        "\n")
    # --children: the whole tree goes; the tip stays as it is
    rc, out, err = env.cli("snapshot-delete", "m", "a", "--children")
    assert (rc, err) == (0, ""), err
    assert env.snaps() == [] and env.info()["current"] is None
    assert env.data() == tip
    for d in env.info()["disks"]:
        for p in d["chain"]:
            assert qemu_img("check", p).rc == 0, p
            assert tags(p) == [], p
    env.fail("snapshot-delete", "m", "a", match="'a'")


# ---------------------------------------------------------------- 7. machine check
def findings(out: str) -> list:
    lines = out.splitlines()
    for line in lines:
        assert re.match(r"^(vda|vdb): /\S+: \S", line), line
    return [tuple(line.split(": ", 2)[:2]) for line in lines]


def test_machine_check_and_refusal(env):
    disks = define(env)
    env.put("vda", 0, 1); env.put("vdb", 0, 2)
    env.quiet_ok("snapshot-create-as", "m", "a", "--disk-only")
    env.quiet_ok("snapshot-create-as", "m", "b", "--diskspec", "vda,snapshot=internal",
                 "--diskspec", "vdb,snapshot=external")
    active = env.active()
    assert env.quiet_ok("machine", "check", "m") == "Machine m is consistent\n"
    p = env.proc("machine", "check", "m")
    assert (p.returncode, p.stdout, p.stderr) == (0, "Machine m is consistent\n", "")

    def check(expected):
        rc, out, err = env.cli("machine", "check", "m")
        assert (rc, err) == (2, ""), (rc, out, err)
        assert sorted(findings(out)) == sorted(expected), out
        return out

    # 1. a frozen base of an external snapshot is written behind the tree's back
    qemu_io(disks["vda"], "write -P 9 0 64k")
    check([("vda", disks["vda"])])
    # 2. an overlay file disappears
    os.unlink(active["vdb"])
    check([("vda", disks["vda"]), ("vdb", active["vdb"])])
    # 3. an internal snapshot nobody made
    qemu_img("snapshot", "-c", "rogue", active["vda"], check=True)
    out = check([("vda", disks["vda"]), ("vdb", active["vdb"]), ("vda", active["vda"])])
    assert "rogue" in out
    p = env.proc("machine", "check", "m", module=True)
    assert (p.returncode, p.stderr) == (2, "") and p.stdout == out

    # a mutating verb refuses, naming a file; nothing changes
    before = env.world()
    for args in (("snapshot-create-as", "m", "z"), ("snapshot-create-as", "m", "z",
                                                    "--disk-only"),
                 ("snapshot-revert", "m", "a"), ("snapshot-delete", "m", "b")):
        err = env.fail(*args)
        assert any(f in err for f in (disks["vda"], active["vda"], active["vdb"])), err
        assert env.world() == before
    p = env.proc("snapshot-create-as", "m", "z")
    assert p.returncode == 1 and p.stdout == ""
    one_line(p.stderr)
    assert disks["vda"] in p.stderr or active["vda"] in p.stderr or active["vdb"] in p.stderr
    # the listing verbs still work
    assert env.names() == ["a", "b"]
    assert env.info()["disks"][1]["active"] == active["vdb"]
    assert env.quiet_ok("snapshot-info", "m", "b").startswith("Name:           b\n")
    assert env.quiet_ok("snapshot-list", "m", "--tree") == "a\n  |\n  +- b\n    \n\n"
    # putting the rogue tag away removes that finding only
    qemu_img("snapshot", "-d", "rogue", active["vda"], check=True)
    check([("vda", disks["vda"]), ("vdb", active["vdb"])])


def test_machine_check_each_finding_alone(env):
    disks = define(env)
    env.put("vda", 0, 1)
    env.quiet_ok("snapshot-create-as", "m", "a")
    env.quiet_ok("snapshot-create-as", "m", "b", "--disk-only")
    active = env.active()
    spare = env.image("spare.qcow2")

    def only(disk, path, what):
        rc, out, err = env.cli("machine", "check", "m")
        assert (rc, err) == (2, ""), (rc, out, err)
        assert findings(out) == [(disk, path)] and re.search(what, out), out
        before = env.world()
        env.fail("snapshot-create-as", "m", "z", match=re.escape(path))
        env.fail("snapshot-revert", "m", "a", match=re.escape(path))
        assert env.world() == before
        assert env.names() == ["a", "b"]

    # an untracked internal snapshot (in an image that is not frozen)
    qemu_img("snapshot", "-c", "rogue", active["vdb"], check=True)
    only("vdb", active["vdb"], "rogue")
    qemu_img("snapshot", "-d", "rogue", active["vdb"], check=True)
    assert env.quiet_ok("machine", "check", "m") == "Machine m is consistent\n"
    # a tracked internal snapshot deleted behind the tree's back
    data, st = Path(disks["vda"]).read_bytes(), os.stat(disks["vda"])
    qemu_img("snapshot", "-d", "a", disks["vda"], check=True)
    rc, out, err = env.cli("machine", "check", "m")
    assert rc == 2 and ("vda", disks["vda"]) in findings(out) and "'a'" in out, out
    Path(disks["vda"]).write_bytes(data)           # put it back as it was, byte for byte
    os.utime(disks["vda"], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert env.quiet_ok("machine", "check", "m") == "Machine m is consistent\n"
    # a backing pointer changed (the active overlay now on another file)
    old = qemu_img_info(active["vda"])["backing-filename"]
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", spare, "-F", "qcow2", active["vda"],
             check=True)
    only("vda", active["vda"], "backing")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", old, "-F", "qcow2", active["vda"],
             check=True)
    assert env.quiet_ok("machine", "check", "m") == "Machine m is consistent\n"
    env.quiet_ok("snapshot-create-as", "m", "z")
    assert env.names() == ["a", "b", "z"]


# ---------------------------------------------------------------- 8. bad input
def test_bad_input_changes_nothing(env):
    disks = define(env)
    env.put("vda", 0, 1)
    env.quiet_ok("snapshot-create-as", "m", "a")                 # internal
    env.put("vda", 1, 2)
    env.quiet_ok("snapshot-create-as", "m", "e", "--disk-only")  # external
    active = env.active()
    free = env.image("free/free.qcow2")
    junk = env.root / "junk.img"
    junk.write_bytes(b"QFI\xfb" + b"\xff" * 200)
    existing = env.image("m/vda/taken.qcow2")
    before = env.world()

    bad = [
        (("machine", "info", "nope"), "nope"),
        (("machine", "undefine", "nope"), "nope"),
        (("machine", "check", "nope"), "nope"),
        (("snapshot-list", "nope"), "nope"),
        (("snapshot-create-as", "nope", "x"), "nope"),
        (("snapshot-revert", "nope", "a"), "nope"),
        (("snapshot-info", "m", "nope"), "nope"),
        (("snapshot-revert", "m", "nope"), "nope"),
        (("snapshot-delete", "m", "nope"), "nope"),
        (("snapshot-parent", "m", "nope"), "nope"),
        (("snapshot-current", "m", "nope"), "nope"),
        (("snapshot-create-as", "m", "a"), "'a'"),
        (("snapshot-create-as", "m", "e", "--disk-only"), "'e'"),
        (("snapshot-create-as", "m", ""), ""),
        (("snapshot-create-as", "m", "x/y"), "/"),
        (("snapshot-create-as", "m", "x" * 256), "255"),
        (("snapshot-create-as", "m", "é" * 128), "255"),              # 256 bytes
        (("snapshot-revert", "m", "a", "--follow"), "internal"),
        (("snapshot-revert", "m", "a", "--commit"), "internal"),
        (("snapshot-create-as", "m", "q", "--diskspec", "vdz,snapshot=internal"), "vdz"),
        (("snapshot-create-as", "m", "q", "--diskspec", "vda,snapshot=bogus"), "bogus"),
        (("snapshot-create-as", "m", "q", "--diskspec",
          "vda,snapshot=external,file=" + existing), re.escape(existing)),
        (("snapshot-create-as", "m", "q", "--diskspec",
          "vdb,snapshot=internal,file=" + str(env.root / "n.qcow2")), "file"),
        (("machine", "define", "m2", "--disk", "vda=" + str(env.root / "missing.qcow2")),
         "missing"),
        (("machine", "define", "m2", "--disk", "vda=" + free, "--disk", "vdb=" + free),
         "same"),
        (("machine", "define", "m2", "--disk", "vda=" + str(junk)), "junk"),
        (("machine", "define", "m2", "--disk", "vda=" + str(env.root)), "image"),
        (("machine", "define", "m", "--disk", "vda=" + free), "'m'"),
        (("machine", "define", "x/y", "--disk", "vda=" + free), "/"),
        (("machine", "define", "", "--disk", "vda=" + free), "empty"),
        (("machine", "define", "m2", "--disk", "vda=" + active["vda"]), "vda"),
        (("machine", "define", "m2"), "disk"),
    ]
    for args, match in bad:
        env.fail(*args, match=match)
        assert env.world() == before, args
    # a name of 255 bytes (multi-byte characters) is fine
    long_ok = "é" * 127 + "x"
    env.quiet_ok("snapshot-create-as", "m", long_ok)
    assert long_ok in env.names()

    # the real program: exit 1, one line, no traceback
    after = env.world()
    for args in (("machine", "info", "nope"), ("snapshot-create-as", "m", "a"),
                 ("snapshot-revert", "m", "a", "--follow"),
                 ("machine", "define", "m2", "--disk", "vda=" + free, "--disk",
                  "vdb=" + free)):
        p = env.proc(*args, module=args[0] == "machine")
        assert (p.returncode, p.stdout) == (1, ""), (args, p)
        one_line(p.stderr)
        assert env.world() == after


def test_define_input_errors(env):
    free = env.image("free/free.qcow2")
    other = env.image("free/other.qcow2")
    os.symlink(free, str(env.root / "free" / "link.qcow2"))
    base = env.image("chain/base.qcow2")
    top = str(env.root / "chain" / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top,
             check=True)
    gone = env.image("chain/gone.qcow2")
    orphan = str(env.root / "chain" / "orphan.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", orphan,
             check=True)
    os.unlink(gone)
    env.quiet_ok("machine", "define", "c", "--disk", "vda=" + top)
    assert env.info("c")["disks"][0]["chain"] == [top, base]
    before = env.world(machines=("c",))
    for args, match in [
        (("snapshot-info", "c", "--current"), "current"),
        (("snapshot-current", "c", "--name"), "current"),
        (("snapshot-current", "c"), "current"),
        (("snapshot-revert", "c", "--current"), "current"),
        (("snapshot-delete", "c", "--current"), "current"),
        (("snapshot-parent", "c", "--current"), "current"),
        (("snapshot-revert", "c"), "snapshot"),
        (("machine",), "verb"),
        (("snapshot-list", "c", "--output=xml"), "xml"),
        (("machine", "define", "m", "--disk", "vda=" + free, "--disk",
          "vdb=" + str(env.root / "free" / "link.qcow2")), "same"),
        (("machine", "define", "m", "--disk", "vda=" + free, "--disk", "vda=" + other),
         "vda"),
        (("machine", "define", "m", "--disk", "vda"), "vda"),
        (("machine", "define", "m", "--disk", "=" + free), ""),
        (("machine", "define", "m", "--disk", "v/da=" + free), "v/da"),
        (("machine", "define", "m", "--disk", "vda=" + orphan), "gone"),
        (("machine", "define", "..", "--disk", "vda=" + free), r"\.\."),
        (("machine", "define", "a\tb", "--disk", "vda=" + free), "control"),
    ]:
        env.fail(*args, match=match)
        assert env.world(machines=("c",)) == before, args


def test_create_failing_on_second_disk_leaves_nothing(env):
    disks = define(env)
    env.put("vda", 0, 1)
    env.quiet_ok("snapshot-create-as", "m", "a")
    # the default overlay name of vda is taken by a file the tree does not know
    squatter = Path(os.path.dirname(disks["vda"])) / "m-vda.x.qcow2"
    squatter.write_bytes(b"not mine")
    before = env.world()
    # vdb's overlay cannot be made (no such folder): vda's must not stay behind
    env.fail("snapshot-create-as", "m", "x", "--disk-only", "--diskspec",
             "vdb,snapshot=external,file=" + str(env.root / "nodir" / "x.qcow2"))
    assert env.world() == before
    # one file for two disks
    shared = str(env.root / "shared.qcow2")
    env.fail("snapshot-create-as", "m", "x", "--diskspec",
             "vda,snapshot=external,file=" + shared, "--diskspec",
             "vdb,snapshot=external,file=" + shared, match=re.escape(shared))
    assert env.world() == before and not os.path.exists(shared)
    # a tag of that name already in an image (not made by the tree)
    qemu_img("snapshot", "-c", "pre", disks["vdb"], check=True)
    env.fail("snapshot-create-as", "m", "pre", match="pre")
    qemu_img("snapshot", "-d", "pre", disks["vdb"], check=True)
    # with the name taken, the overlay goes elsewhere and the squatter keeps its bytes
    env.quiet_ok("snapshot-create-as", "m", "x", "--disk-only")
    assert squatter.read_bytes() == b"not mine"
    assert env.active()["vda"] != str(squatter)
    assert backing(env.active()["vda"]) == disks["vda"]
    assert env.data() == {"vda": {0: 1}, "vdb": {}}


# ---------------------------------------------------------------- 9. machine busy
def test_machine_busy(env):
    define(env)
    env.quiet_ok("snapshot-create-as", "m", "a")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from qcow2engine.tree.store import Store\n"
         "s = Store(sys.argv[1]); s.lock('m'); print('locked', flush=True); time.sleep(30)\n",
         env.state], stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        assert holder.stdout.readline() == "locked\n"
        before = env.world()
        for args in (("snapshot-create-as", "m", "b"), ("snapshot-revert", "m", "a"),
                     ("snapshot-delete", "m", "a"), ("snapshot-current", "m", "a"),
                     ("machine", "undefine", "m")):
            env.fail(*args, match="busy")
            assert env.world() == before, args
        p = env.proc("snapshot-create-as", "m", "b", "--disk-only")
        assert (p.returncode, p.stdout) == (1, "") and "busy" in p.stderr
        one_line(p.stderr)
        # reading does not need the lock
        assert env.names() == ["a"]
        assert env.info()["current"] == "a"
        assert env.json("snapshot-info", "m", "a")["name"] == "a"
        assert env.quiet_ok("machine", "check", "m") == "Machine m is consistent\n"
        assert env.world() == before
    finally:
        holder.kill()
        holder.wait()
    env.quiet_ok("snapshot-create-as", "m", "b")
    assert env.names() == ["a", "b"]


# ---------------------------------------------------------------- 10. an image in use
def test_image_in_use_by_qemu(env):
    define(env)
    env.put("vda", 0, 1)
    env.quiet_ok("snapshot-create-as", "m", "a", "--disk-only")
    active = env.active()["vda"]
    before = env.world()
    with QemuIoHolder(active):
        # QEMU's own tool sees the lock too
        r = qemu_img("info", active)
        assert r.rc != 0 and "lock" in r.err, r
        for args in (("snapshot-create-as", "m", "b"), ("snapshot-create-as", "m", "b",
                                                        "--disk-only"),
                     ("snapshot-revert", "m", "a"), ("snapshot-delete", "m", "a")):
            err = env.fail(*args, match="in use")
            assert active in err, err
            assert env.world() == before, args
        p = env.proc("snapshot-create-as", "m", "b")
        assert (p.returncode, p.stdout) == (1, "") and "in use" in p.stderr
        assert active in p.stderr
        one_line(p.stderr)
        # listing verbs still work while QEMU holds the image
        assert env.names() == ["a"]
        assert env.info() == before["info"]["m"]
        assert env.quiet_ok("snapshot-info", "m", "a").startswith("Name:           a\n")
        assert env.quiet_ok("snapshot-list", "m", "--tree") == "a\n\n\n"
        assert env.world() == before
    # a QEMU that only reads a frozen base (vdb's, below its overlay) also holds the machine
    base = env.snap("a")["disks"]["vdb"]["file"]
    with QemuIoHolder(base, readonly=True):
        err = env.fail("snapshot-revert", "m", "a", match="in use")
        assert base in err
        assert env.world() == before
    env.quiet_ok("snapshot-create-as", "m", "b")
    assert env.names() == ["a", "b"]


# ---- found by these tests and fixed: define on another machine's files; --children's message
def test_snapshot_delete_children_message_is_virsh(env):
    """virsh snapshot-delete --children prints "Domain snapshot NAME deleted" (only
    --children-only has its own message)."""
    define(env)
    env.quiet_ok("snapshot-create-as", "m", "a")
    env.quiet_ok("snapshot-create-as", "m", "b")
    out = env.quiet_ok("snapshot-delete", "m", "a", "--children")
    assert out.splitlines()[0] == "Domain snapshot a deleted"


def test_define_refuses_a_frozen_image_of_another_machine(env):
    disks = define(env)
    env.put("vda", 0, 1)
    env.quiet_ok("snapshot-create-as", "m", "a", "--disk-only")     # vda's image: a's base
    before = env.world()
    env.fail("machine", "define", "m2", "--disk", "vda=" + disks["vda"], match="m")
    assert env.world() == before


def test_define_refuses_the_backing_file_of_another_machine(env):
    base = env.image("t/base.qcow2")
    top = str(env.root / "t" / "top.qcow2")
    from tests.helpers.qemu import qemu_img
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, check=True)
    env.quiet_ok("machine", "define", "m", "--disk", "vda=" + top)
    before = env.world()
    env.fail("machine", "define", "m2", "--disk", "vda=" + base, match="m")
    assert env.world() == before
