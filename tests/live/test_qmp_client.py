"""The QMP session and the QEMU launcher: timeouts, bounded event queues, error mapping,
one client per monitor, and no orphan QEMU when the caller dies."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qcow2engine.errors import ImageInUseError, Qcow2Error
from qmp_bridge import nodes as N
from qmp_bridge.client import QMPSession
from qmp_bridge.errors import (QMPCommandError, QMPConnectionError, QMPImageInUseError,
                               QMPTimeoutError)
from qmp_bridge.launch import QemuProcess
from tests.helpers.qmp import MiB, make_image, vm_none  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]


class FakeQMP(threading.Thread):
    """A scripted QMP server on one end of a socketpair: greets, answers qmp_capabilities and
    "ping", never answers "hang", and answers "emit" after sending data.n events."""

    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock = sock

    def send(self, obj: dict) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\r\n")

    def run(self) -> None:
        self.send({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                       "package": ""}, "capabilities": []}})
        dec = json.JSONDecoder()
        buf = ""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                cmd = msg.get("execute")
                if cmd == "hang":
                    continue
                if cmd == "close":
                    self.sock.close()
                    return
                if cmd == "emit":
                    for i in range(msg["arguments"]["n"]):
                        self.send({"event": "E", "data": {"n": i},
                                   "timestamp": {"seconds": 0, "microseconds": 0}})
                self.send({"return": {}, "id": msg.get("id")})


@pytest.fixture
def fake():
    ours, theirs = socket.socketpair()
    server = FakeQMP(theirs)
    server.start()
    session = QMPSession(timeout=5.0, event_buffer=32)
    session.connect(ours, timeout=5.0)
    yield session
    session.close()
    theirs.close()


def test_command_timeout_leaves_session_usable(fake):
    t = time.monotonic()
    with pytest.raises(QMPTimeoutError, match="hang"):
        fake.execute("hang", timeout=0.3)
    assert time.monotonic() - t < 2.0
    assert fake.execute("ping") == {}


def test_event_queues_are_bounded(fake):
    with fake.listen("E", maxsize=8) as stream:
        fake.execute("emit", {"n": 500})
        evs = stream.drain()
        assert [e["data"]["n"] for e in evs] == list(range(492, 500))  # the newest kept
        assert stream.dropped == 492
        assert stream.get(timeout=0.05) is None
    recent = fake.recent_events()
    assert len(recent) == 32 and recent[-1]["data"]["n"] == 499
    # qemu.qmp's own default listener queues nothing and keeps no history
    assert fake._qmp.events.empty() and fake._qmp.events.history == ()
    assert fake.listener_count == 0


def test_lost_connection(fake):
    with fake.listen("E") as stream:
        with pytest.raises((QMPConnectionError, QMPTimeoutError)):
            fake.execute("close", timeout=2.0)
        with pytest.raises(QMPConnectionError):
            stream.get(timeout=2.0)
        with pytest.raises(QMPConnectionError):
            fake.execute("ping")
    assert not fake.connected


def test_one_client_per_monitor(vm_none):
    with pytest.raises(QMPConnectionError, match="another client"):
        QMPSession.attach(vm_none.socket_path, connect_timeout=0.5)
    vm_none.disconnect()
    with QMPSession.attach(vm_none.socket_path, connect_timeout=5) as other:
        assert other.execute("query-status")["status"] == "prelaunch"
        assert other.greeting["QMP"]["version"]["qemu"]["major"] == 7
    vm_none.reconnect()
    assert vm_none.qmp.execute("query-status")["running"] is False


def test_attach_errors():
    with pytest.raises(QMPConnectionError, match="No such file"):
        QMPSession.attach("/nonexistent/qmp.sock", connect_timeout=1)


def test_command_errors_map_to_the_hierarchy(vm_none, tmp_path):
    q = vm_none.qmp
    with pytest.raises(QMPCommandError) as ei:
        q.execute("no-such-command")
    assert ei.value.error_class == "CommandNotFound" and isinstance(ei.value, Qcow2Error)
    img = make_image(tmp_path / "a.qcow2", 4 * MiB)
    N.add_image(q, str(img), "a")
    with pytest.raises(QMPImageInUseError, match="lock") as ei:
        N.add_image(q, str(img), "b")
    assert isinstance(ei.value, ImageInUseError)


def test_qemu_dying_is_a_connection_error(vm_none):
    q = vm_none.qmp
    with q.listen("JOB_STATUS_CHANGE") as stream:
        vm_none.proc.kill()
        vm_none.proc.wait(5)
        with pytest.raises(QMPConnectionError):
            stream.get(timeout=3.0)
    with pytest.raises(QMPConnectionError):
        q.execute("query-status")


def _gone(pid: int, within: float) -> bool:
    """True once `pid` no longer runs (gone, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().split(")")[-1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


_CHILD = """
import sys, time
sys.path.insert(0, %r)
from qmp_bridge.launch import QemuProcess
vm = QemuProcess().start()
print(vm.pid, vm.workdir, flush=True)
sys.stdin.readline()       # the parent says when to die
if sys.argv[1] == "hang":
    time.sleep(60)
"""


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_no_orphan_qemu_when_the_caller_dies(how):
    """SIGKILL of the caller: PR_SET_PDEATHSIG kills QEMU.  Normal exit without stop():
    the atexit hook stops it."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD % str(ROOT),
                              "hang" if how == "sigkill" else "exit"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    workdir = ""
    try:
        pid_text, workdir = child.stdout.readline().split()
        qemu_pid = int(pid_text)
        assert not _gone(qemu_pid, 0.1)
        if how == "sigkill":
            child.stdin.write("go\n")
            child.stdin.flush()
            time.sleep(0.05)
            os.kill(child.pid, signal.SIGKILL)
        else:
            child.stdin.close()
        assert child.wait(10) in (0, -signal.SIGKILL)
        assert _gone(qemu_pid, 5.0)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)   # a SIGKILLed caller cannot tidy up
        if child.poll() is None:
            child.kill()
            child.wait()


def test_atexit_hook_quits_leftovers():
    from qmp_bridge import launch
    vm = QemuProcess().start()
    launch._stop_leftovers()
    assert not vm.is_running() and vm.proc.returncode == 0  # 'quit', not a signal
    assert vm not in launch._LIVE


def test_launch_failure_leaves_nothing(tmp_path):
    vm = QemuProcess(extra_args=["-no-such-option"], log_path=str(tmp_path / "q.log"))
    with pytest.raises(QMPConnectionError, match="did not come up"):
        vm.start()
    assert not vm.is_running()
