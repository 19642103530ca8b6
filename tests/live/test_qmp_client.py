"""The QMP session and the QEMU launcher against a real QEMU: error mapping, one client per
monitor, QEMU dying, and no orphan QEMU when the caller dies.  (The session's timeouts, bounded
event queues and lost connections against a scripted server: tests/unit/test_qmp_session.py.)"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcow2engine.errors import ImageInUseError, Qcow2Error
from qmp_bridge import nodes as N
from qmp_bridge.client import QMPSession
from qmp_bridge.errors import QMPCommandError, QMPConnectionError, QMPImageInUseError
from qmp_bridge.launch import QemuProcess
from tests.helpers.qmp import MiB, make_image

ROOT = Path(__file__).resolve().parents[2]


def test_one_client_per_monitor(vm_none):
    with pytest.raises(QMPConnectionError, match="another client"):
        QMPSession.attach(vm_none.socket_path, connect_timeout=0.5)
    vm_none.disconnect()
    with QMPSession.attach(vm_none.socket_path, connect_timeout=5) as other:
        assert other.execute("query-status")["status"] == "prelaunch"
        assert other.greeting["QMP"]["version"]["qemu"]["major"] == 7
    vm_none.reconnect()
    assert vm_none.qmp.execute("query-status")["running"] is False


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
