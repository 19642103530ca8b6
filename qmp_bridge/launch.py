"""Launch a headless qemu-system-x86_64 with QMP on a unix socket, and tear it down reliably.

    with QemuProcess(machine="pc") as vm:      # started, QMP session connected: vm.qmp
        vm.qmp.execute("query-status")
        print(vm.socket_path)                  # other processes may attach when vm.qmp is closed

Start-up (no races):
- We bind and listen on the unix socket ourselves and pass the listening fd to QEMU
  (`-chardev socket,fd=N,server=on,wait=off`), so the socket exists before QEMU runs and a
  connect never polls.  The fd is made non-blocking first: QEMU 7.2 may call accept() on it a
  second time, which on a blocking fd would hang QEMU's main loop.
- QEMU starts with -S (prelaunch) unless asked otherwise: without it the RESUME event at the
  end of start-up can overtake the QMP greeting on the accepted connection.  Block nodes, jobs
  and HMP qemu-io all work in prelaunch; `qmp.execute("cont")` runs the guest.

Teardown (no orphan QEMU): `quit` over QMP (bounded), then SIGTERM, then SIGKILL of that pid
only.  It runs from stop()/the context manager, from an atexit hook for processes nobody
stopped, and the child gets PR_SET_PDEATHSIG=SIGKILL so it dies with us even on SIGKILL.
PDEATHSIG follows the *thread* that forked: start QEMU from a thread that outlives it (normally
the main thread).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import weakref
from typing import Callable, Sequence

from .client import QMPSession
from .errors import QMPConnectionError, QMPError

__all__ = ["QemuProcess", "QEMU_BINARY"]

QEMU_BINARY = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the other backstops still apply
    _prctl = None

_LIVE: "weakref.WeakSet[QemuProcess]" = weakref.WeakSet()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: SIGKILL the child when the parent dies (and exit if it already has)."""
    def setup() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)
    return setup


class QemuProcess:
    """One headless QEMU process with a QMP unix socket, and our session on it (`qmp`)."""

    def __init__(self, *, machine: str = "none", accel: str = "tcg",
                 extra_args: Sequence[str] = (), socket_path: str | None = None,
                 log_path: str | None = None, start_paused: bool = True,
                 timeout: float = 30.0, binary: str | None = None, name: str = "qemu"):
        """machine: "none" (block layer only, fastest) or "pc"/"q35" (device_add works).
        socket_path: where the QMP socket goes (default: a private temp dir; the path must be
        shorter than 108 bytes).  log_path: QEMU's stdout+stderr (HMP qemu-io output lands
        there; default: in the private dir).  timeout: default seconds per QMP command."""
        self.machine = machine
        self.accel = accel
        self.extra_args = list(extra_args)
        self.start_paused = start_paused
        self.timeout = timeout
        self.binary = binary or QEMU_BINARY
        self.name = name
        self._dir = tempfile.mkdtemp(prefix="qcow2engine-qemu-")
        self.socket_path = socket_path or os.path.join(self._dir, "qmp.sock")
        self.log_path = log_path or os.path.join(self._dir, "qemu.log")
        self.proc: subprocess.Popen | None = None
        self.qmp: QMPSession | None = None
        self._stopped = False
        self._bound = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "QemuProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "QemuProcess":
        """Start QEMU and connect `qmp`.  On failure nothing is left running."""
        if self.proc is not None:
            raise QMPError("QEMU already started")
        try:
            self._spawn()
            try:
                self.qmp = QMPSession.attach(self.socket_path, timeout=self.timeout,
                                             connect_timeout=10.0, name=self.name)
            except QMPError:
                # a negotiation cut short on a loaded machine: QEMU, still running, takes
                # a new client on the same socket; one more try
                if self.proc.poll() is not None:
                    raise
                self.qmp = QMPSession.attach(self.socket_path, timeout=self.timeout,
                                             connect_timeout=10.0, name=self.name)
        except BaseException as e:
            rc = self.proc.poll() if self.proc is not None else None
            tail = self.log()[-2000:]
            self.stop()
            if isinstance(e, (QMPError, OSError)):
                raise QMPConnectionError("QEMU did not come up (%s; exit code %s)%s"
                                         % (e, rc, ": " + " ".join(tail.split()) if tail else "")
                                         ) from None
            raise
        return self

    def argv(self, fd: int) -> list[str]:
        """The command line for a QMP listening socket passed as `fd`."""
        args = [self.binary, "-machine", self.machine, "-accel", self.accel, "-nodefaults",
                "-no-user-config", "-display", "none",
                "-chardev", "socket,id=qmp,fd=%d,server=on,wait=off" % fd,
                "-mon", "chardev=qmp,mode=control"]
        if self.start_paused:
            args.append("-S")
        return args + self.extra_args

    def _spawn(self) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            self._bound = True
            listener.listen(4)
            listener.setblocking(False)
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(
                    self.argv(listener.fileno()), stdin=subprocess.DEVNULL, stdout=logf,
                    stderr=subprocess.STDOUT, pass_fds=(listener.fileno(),),
                    start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        finally:
            listener.close()  # QEMU holds its own copy
        _LIVE.add(self)

    @property
    def workdir(self) -> str:
        """The private temp dir (default socket and log); removed by stop()."""
        return self._dir

    @property
    def pid(self) -> int | None:
        """QEMU's process id."""
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        """True while the QEMU process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """QEMU's stdout and stderr so far."""
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def disconnect(self) -> None:
        """Close our QMP session so that another client (another process) can attach."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def reconnect(self, timeout: float = 10.0) -> QMPSession:
        """Attach a fresh QMP session (after disconnect(), or after another client left)."""
        self.disconnect()
        self.qmp = QMPSession.attach(self.socket_path, timeout=self.timeout,
                                     connect_timeout=timeout, name=self.name)
        return self.qmp

    def stop(self, timeout: float = 5.0) -> int | None:
        """quit, then SIGTERM, then SIGKILL (this pid only); returns the exit code.
        Idempotent, never raises."""
        if self._stopped:
            return self.proc.returncode if self.proc is not None else None
        self._stopped = True
        proc = self.proc
        if self.qmp is not None and proc is not None and proc.poll() is None:
            try:
                self.qmp.execute("quit", timeout=min(timeout, 3.0))
            except Exception:  # EOF right after quit is normal
                pass
        self.disconnect()
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    try:
                        proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if self._bound:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        shutil.rmtree(self._dir, ignore_errors=True)
        _LIVE.discard(self)
        return proc.returncode if proc is not None else None

    def kill(self) -> None:
        """SIGKILL QEMU at once (a crash), then clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10.0)
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    """Backstop: stop every QEMU nobody stopped (runs before daemon threads die)."""
    for proc in list(_LIVE):
        try:
            proc.stop(timeout=2.0)
        except Exception:
            pass
