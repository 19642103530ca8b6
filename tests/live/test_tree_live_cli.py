"""The machine verbs of a running machine through the CLI: define with a launch definition,
start/stop/info/list, snapshot-create-as --memspec/--live/--halt, snapshot-revert
--running/--paused, --bandwidth, the errors (one line, exit 1), a QEMU that died."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qmp_bridge.client import QMPSession
from tests.helpers.qemu import assert_clean, guest_bytes, qemu_img, qemu_io

MiB = 1 << 20


class Cli:
    def __init__(self, root):
        self.root = str(root)
        self.state = os.path.join(self.root, "st")

    def run(self, *args):
        r = subprocess.run([sys.executable, "-m", "qcow2engine", "--state-dir", self.state]
                           + [str(a) for a in args], capture_output=True, text=True,
                           timeout=120)
        return r.returncode, r.stdout, r.stderr

    def ok(self, *args):
        rc, out, err = self.run(*args)
        assert rc == 0, (args, rc, out, err)
        return out, err

    def fails(self, *args, match):
        rc, out, err = self.run(*args)
        assert rc == 1 and out == "", (args, rc, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert match in err, err
        return err

    def info(self):
        return json.loads(self.ok("machine", "info", "vm", "--output=json")[0])


@pytest.fixture
def cli(tmp_path):
    c = Cli(tmp_path)
    for d in ("vda", "vdb"):
        qemu_img("create", "-q", "-f", "qcow2", tmp_path / (d + ".qcow2"), "8M", check=True)
    yield c
    c.run("machine", "stop", "vm", "--force")


def _write(cli, disk, pattern, off):
    with QMPSession.attach(cli.info()["qmp"]) as s:
        out = s.hmp('qemu-io -d /machine/peripheral/%s/virtio-backend "write -P %d %d 64k"'
                    % (disk, pattern, off))
        assert out.strip() == ""
        s.hmp('qemu-io -d /machine/peripheral/%s/virtio-backend "flush"' % disk)


def test_running_machine_verbs(cli, tmp_path):
    root = str(tmp_path)
    assert cli.ok("machine", "define", "vm", "--disk", "vda=%s/vda.qcow2" % root,
                  "--disk", "vdb=%s/vdb.qcow2" % root, "--memory", "64M", "--cpus", "1",
                  "--accel", "tcg", "--qemu-arg=-no-reboot")[0] == "Machine vm defined\n"
    info = cli.info()
    assert info["state"] == "shut off" and info["qmp"] is None
    assert info["launch"]["memory"] == 64 * MiB and info["launch"]["qemu_args"] == ["-no-reboot"]
    assert cli.ok("machine", "start", "vm", "--paused")[0] == "Machine vm started (paused)\n"
    info = cli.info()
    assert info["state"] == "paused" and os.path.exists(info["qmp"])
    assert json.loads(cli.ok("machine", "list", "--output=json")[0]) == \
        [{"name": "vm", "state": "paused"}]
    assert cli.ok("machine", "list")[0] == (" Id   Name   State\n---------------------\n"
                                            " 1    vm     paused\n\n")
    cli.fails("machine", "start", "vm", match="already running")
    cli.fails("machine", "undefine", "vm", match="is running")
    # another client on the public socket while our verbs run on theirs
    with QMPSession.attach(info["qmp"]) as other:
        assert other.execute("query-status")["status"] == "prelaunch"
        out, err = cli.ok("snapshot-create-as", "vm", "s1", "--memspec",
                          "file=%s/s1.mem" % root)
        assert out == "Domain snapshot s1 created\n" and err == ""    # it was paused
        other.execute("cont")
    assert cli.info()["state"] == "running"
    _write(cli, "vda", 1, 0)
    cli.ok("snapshot-create-as", "vm", "s2", "--disk-only")
    _write(cli, "vdb", 2, 0)
    out, err = cli.ok("snapshot-create-as", "vm", "s3", "--memspec", "%s/s3.mem" % root,
                      "--live")
    assert "the guest was paused" in err
    cli.fails("snapshot-create-as", "vm", "s4", "--memspec", "x.mem", "--disk-only",
              match="exclude each other")
    cli.fails("snapshot-create-as", "vm", "s4", "--live", match="--live needs --memspec")
    cli.fails("snapshot-create-as", "vm", "s4", "--memspec", "file=%s/s1.mem" % root,
              match="already exists")
    docs = {d["name"]: d for d in json.loads(cli.ok("snapshot-list", "vm",
                                                    "--output=json")[0])}
    assert docs["s1"]["memory"] == "external" and docs["s1"]["state"] == "paused"
    assert docs["s2"]["memory"] == "no" and docs["s2"]["state"] == "disk-snapshot"
    assert docs["s3"]["memory_file"] == "%s/s3.mem" % root
    # revert to s1 (paused at s1): comes back paused; --running runs it
    cli.fails("snapshot-revert", "vm", "s2", match="use --force")
    out, err = cli.ok("snapshot-revert", "vm", "s1")
    assert "keeps the tip" in out
    assert cli.info()["state"] == "paused"
    cli.ok("snapshot-revert", "vm", "s3", "--running")
    assert cli.info()["state"] == "running"
    # the disks at s3: vda has pattern 1, vdb pattern 2 (read through the running chain)
    info = cli.info()
    vda, vdb = (d["active"] for d in info["disks"])
    with QMPSession.attach(info["qmp"]) as s:
        for d in ("vda", "vdb"):
            s.hmp('qemu-io -d /machine/peripheral/%s/virtio-backend "flush"' % d)
    assert guest_bytes(vda, force_share=True)[:64 << 10] == b"\1" * (64 << 10)
    assert guest_bytes(vdb, force_share=True)[:64 << 10] == b"\2" * (64 << 10)
    # --halt: the machine stops after the snapshot
    cli.ok("snapshot-create-as", "vm", "h", "--halt")
    assert cli.info()["state"] == "shut off"
    for p in os.listdir(root):
        if p.endswith(".qcow2"):
            assert_clean(os.path.join(root, p))
    assert cli.ok("machine", "check", "vm")[0] == "Machine vm is consistent\n"
    # reverting a shut-off machine to a snapshot with memory starts it as it was
    cli.ok("snapshot-revert", "vm", "h", "--paused")
    assert cli.info()["state"] == "paused"
    out = cli.ok("machine", "stop", "vm", "--force")[0]
    assert out == "Machine vm destroyed\n"
    cli.fails("machine", "stop", "vm", match="not running")


def test_dead_qemu_is_noticed(cli, tmp_path):
    root = str(tmp_path)
    cli.ok("machine", "define", "vm", "--disk", "vda=%s/vda.qcow2" % root, "--memory", "64M",
           "--accel", "tcg")
    cli.ok("machine", "start", "vm")
    pid = cli.info()["pid"]
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not os.path.exists("/proc/%d" % pid) or \
                open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    rc, out, err = cli.run("machine", "info", "vm")
    assert rc == 0 and "State:          shut off" in out
    assert "has gone away" in err
    cli.ok("machine", "start", "vm")             # and it starts again
    assert cli.info()["state"] == "running"


def test_launch_definition_errors(cli, tmp_path):
    root = str(tmp_path)
    cli.fails("machine", "define", "vm", "--disk", "vda=%s/vda.qcow2" % root, "--memory", "1M",
              match="at least 16 MiB")
    cli.fails("machine", "define", "vm", "--disk", "vda=%s/vda.qcow2" % root, "--kernel",
              "/nonexistent", match="is not a file")
    cli.fails("machine", "define", "vm", "--disk", "vda=%s/vda.qcow2" % root, "--initrd",
              "%s/vdb.qcow2" % root, match="--initrd needs --kernel")
    cli.ok("machine", "define", "vm", "--disk", "vda=%s/vda.qcow2" % root)
    cli.fails("machine", "start", "vm", match="no launch definition")
    cli.ok("machine", "undefine", "vm")
    cli.ok("machine", "define", "vm", "--disk", "vda=%s/vda.qcow2" % root, "--memory", "64M",
           "--qemu-arg=-no-such-option")
    cli.fails("machine", "start", "vm", match="cannot start machine 'vm'")
    assert cli.info()["state"] == "shut off"
    cli.fails("snapshot-create-as", "vm", "x", "--memspec", "x.mem",
              match="apply to a running machine")
    qemu_io(os.path.join(root, "vda.qcow2"), "read -P 0 0 64k")   # untouched
