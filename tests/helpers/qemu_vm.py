"""A headless QEMU driven over QMP, for tests that need a live QEMU next to our engine.

    with QemuVM() as vm:                       # qemu-system-x86_64 -machine none, ~40 ms to ready
        vm.add_qcow2(path, "d0")               # blockdev-add qcow2 over a file node "d0-file"
        vm.cmd("query-named-block-nodes")
        with pytest.raises(ExecuteError, match="lock"):
            vm.add_qcow2(other, "d1")

Design (see shared/notes/qmp-7.2.md):
- The QMP socket is a unix socket in a private temp dir.  We bind and listen on it ourselves
  and hand the listening fd to QEMU (`-chardev socket,fd=N,server=on,wait=off`), so connecting
  never races QEMU's start-up: no polling, no stale sockets.
- qemu.qmp's QMPClient is asyncio; QemuVM runs it on a private event-loop thread and every
  call (`cmd`, `hmp`, `wait_event`, start-up, shutdown) has a timeout.
- Teardown: `quit` (bounded), disconnect, wait, then SIGKILL of that one pid.  It runs from the
  context manager's __exit__ (also when the test fails), from an atexit hook for VMs nobody
  closed, and QEMU gets PR_SET_PDEATHSIG=SIGKILL so it dies if the test process is killed.
  (PDEATHSIG follows the *thread* that forked: start VMs from a thread that outlives them,
  normally pytest's main thread.)
- QEMU's stdout/stderr go to `vm.log_path`; `vm.log()` reads it (HMP qemu-io output lands there).
"""
from __future__ import annotations

import asyncio
import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import weakref

from qemu.qmp import ExecuteError, QMPClient

__all__ = ["QemuVM", "ExecuteError", "QMPTimeout", "QEMU_BINARY"]

QEMU_BINARY = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")
_UNSET = object()
_LIVE: "weakref.WeakSet[QemuVM]" = weakref.WeakSet()

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux / no prctl: the other backstops still apply
    _prctl = None


class QMPTimeout(TimeoutError):
    """A QMP command (or start-up/shutdown step) did not answer in time."""


def _child_setup(parent_pid: int):
    def setup():
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    return setup


class QemuVM:
    """One QEMU process plus a synchronous QMP client.  Use as a context manager."""

    def __init__(self, *, machine: str = "none", extra_args=(), timeout: float = 10.0,
                 log_dir=None, name: str = "vm"):
        """machine: "none" (fastest; block layer only) or e.g. "pc" (then device_add works).
        QEMU always starts with -S (prelaunch; `vm.cmd("cont")` to run the guest).
        timeout: default seconds for every QMP command.  log_dir: where qemu.log goes
        (default: the private temp dir, removed on close; then `vm.log()` still works)."""
        self.machine = machine
        self.extra_args = list(extra_args)
        self.timeout = timeout
        self.name = name
        self.proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.log_path: str | None = None
        self._log_text = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._qmp: QMPClient | None = None
        self._pending_events: list = []
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "QemuVM":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "QemuVM":
        if self.proc is not None:
            raise RuntimeError("QemuVM already started")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        # short path: unix socket addresses are limited to 108 bytes
        self._dir = tempfile.mkdtemp(prefix="qemu-vm-")
        sock_path = os.path.join(self._dir, "qmp.sock")
        self.log_path = os.path.join(self._log_dir or self._dir, "qemu-%s.log" % self.name)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(sock_path)
            listener.listen(1)
            # Non-blocking matters: O_NONBLOCK lives on the open file description QEMU
            # inherits, and QEMU 7.2 sometimes calls accept() on the passed fd a second time;
            # on a blocking fd that accept() hangs QEMU's main loop for good (seen: greeting
            # sent, qmp_capabilities never answered, main thread in unix accept).
            listener.setblocking(False)
            argv = [QEMU_BINARY, "-machine", self.machine, "-nodefaults", "-display", "none",
                    "-accel", "tcg", "-no-user-config",
                    "-chardev", "socket,id=qmp,fd=%d,server=on,wait=off" % listener.fileno(),
                    "-mon", "chardev=qmp,mode=control",
                    # -S: never start the VM.  Without it QEMU emits a RESUME event at the end
                    # of start-up, and because our connection is already accepted by then it
                    # can arrive *before* the QMP greeting (QEMU 7.2 installs the monitor's
                    # chardev handlers in a bottom half): qemu.qmp then fails with
                    # "Did not understand Greeting" (seen ~1 in 500 starts).  Block nodes, jobs
                    # and HMP qemu-io work in the prelaunch state.
                    "-S"]
            argv += self.extra_args
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT,
                                             pass_fds=(listener.fileno(),),
                                             start_new_session=True,
                                             preexec_fn=_child_setup(os.getpid()))
        finally:
            listener.close()  # QEMU has its own copy of the listening socket
        _LIVE.add(self)

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="qmp-%s" % self.name, daemon=True)
        self._thread.start()

        async def connect():
            self._qmp = QMPClient(self.name)
            await self._qmp.connect(sock_path)

        try:
            self._run(connect(), self.timeout, "connect")
        except Exception as e:
            rc = self.proc.poll()
            raise RuntimeError("QEMU did not come up (%s; exit code %s); log:\n%s"
                               % (e, rc, self.log())) from e

    def close(self) -> None:
        """Stop QEMU (quit, then SIGKILL) and release everything.  Idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        proc = self.proc
        if self._qmp is not None and proc is not None and proc.poll() is None:
            try:
                self._run(self._qmp.execute("quit"), 3.0, "quit")
            except Exception:  # EOFError/disconnect races after quit are normal
                pass
        if self._qmp is not None:
            try:
                self._run(self._qmp.disconnect(), 3.0, "disconnect")
            except Exception:
                pass
        if proc is not None:
            try:
                proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                proc.kill()  # this pid only
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    pass
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=5.0)
            if not (self._thread and self._thread.is_alive()):
                self._loop.close()
        if self.log_path and os.path.exists(self.log_path):
            try:
                with open(self.log_path, "r", errors="replace") as f:
                    self._log_text = f.read()
            except OSError:
                pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL QEMU right away (simulates a crash), then clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5.0)
        self.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """QEMU's stdout+stderr so far (or the final text after close)."""
        if self.log_path and os.path.exists(self.log_path):
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        return self._log_text

    # ------------------------------------------------------------------ QMP
    def _run(self, coro, timeout: float, what: str):
        async def bounded():
            return await asyncio.wait_for(coro, timeout)
        fut = asyncio.run_coroutine_threadsafe(bounded(), self._loop)
        try:
            return fut.result(timeout + 2.0)
        except (asyncio.TimeoutError, TimeoutError) as e:
            fut.cancel()
            raise QMPTimeout("QMP %s: no answer within %.1f s" % (what, timeout)) from e

    def cmd(self, name: str, args: dict | None = None, *, timeout: float | None = None, **kwargs):
        """Execute a QMP command; returns its 'return' value.  Raises qemu.qmp.ExecuteError
        (str(e) is QEMU's error description) or QMPTimeout.  Arguments with dashes can be
        given as a dict: vm.cmd("blockdev-add", {"node-name": ...})."""
        if self._qmp is None or self._closed:
            raise RuntimeError("QemuVM is not running")
        arguments = dict(args or {})
        arguments.update(kwargs)
        return self._run(self._qmp.execute(name, arguments or None),
                         self.timeout if timeout is None else timeout, name)

    def hmp(self, command_line: str, **kw) -> str:
        """Run an HMP command; returns its text.  HMP errors come back as text, not exceptions."""
        return self.cmd("human-monitor-command", {"command-line": command_line}, **kw)

    def get_events(self) -> list:
        """All events received and not yet consumed (and forget them)."""
        async def drain():
            return self._qmp.events.clear()
        evs = self._pending_events + self._run(drain(), self.timeout, "events")
        self._pending_events = []
        return evs

    def wait_event(self, name: str, timeout: float | None = None, match=None) -> dict:
        """The next event called `name` (and for which match(event) is true, if given).
        Other events are kept for get_events()."""
        for i, ev in enumerate(self._pending_events):
            if ev["event"] == name and (match is None or match(ev)):
                return self._pending_events.pop(i)
        skipped = []

        async def wait():
            while True:
                ev = await self._qmp.events.get()
                if ev["event"] == name and (match is None or match(ev)):
                    return ev
                skipped.append(ev)
        try:
            return self._run(wait(), self.timeout if timeout is None else timeout,
                             "wait for " + name)
        finally:
            self._pending_events.extend(skipped)

    # ------------------------------------------------------------------ block helpers
    def add_qcow2(self, path, node_name: str, *, read_only: bool = False,
                  file_node_name: str | None = None, backing=_UNSET, **options) -> None:
        """blockdev-add a qcow2 node over a file-posix node (named `<node_name>-file` unless
        given).  backing: a node name, None for "no backing" (JSON null), or omitted to let
        QEMU open the backing file named in the header.  Raises ExecuteError on failure
        (e.g. 'Failed to get "write" lock'); a failed add leaves no nodes behind."""
        args = {"driver": "qcow2", "node-name": node_name, "read-only": bool(read_only),
                "file": {"driver": "file", "filename": os.fspath(path),
                         "node-name": file_node_name or node_name + "-file"}}
        if backing is not _UNSET:
            args["backing"] = backing
        args.update(options)
        self.cmd("blockdev-add", args)

    def add_raw(self, path, node_name: str, *, read_only: bool = False, **options) -> None:
        """blockdev-add a plain file-posix node (the raw protocol layer) for `path`."""
        args = {"driver": "file", "node-name": node_name, "filename": os.fspath(path),
                "read-only": bool(read_only)}
        args.update(options)
        self.cmd("blockdev-add", args)

    def blockdev_del(self, node_name: str) -> None:
        self.cmd("blockdev-del", {"node-name": node_name})

    def node_names(self) -> list:
        return [n["node-name"] for n in self.cmd("query-named-block-nodes", flat=True)]


@atexit.register
def _close_leftovers() -> None:
    """Backstop for VMs nobody closed (runs before daemon threads are stopped)."""
    for vm in list(_LIVE):
        try:
            vm.close()
        except Exception:
            pass
        try:
            if vm.proc is not None and vm.proc.poll() is None:
                vm.proc.kill()
                vm.proc.wait(timeout=5.0)
        except Exception:
            pass
