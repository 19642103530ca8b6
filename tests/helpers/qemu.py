"""The one runner of QEMU's tools (qemu-img, qemu-io): the oracle of the interop and fault
tests, and the builder of their images.

Every call returns a :class:`Result`: the tuple ``(rc, out, err)`` -- so it unpacks like
``engine()``'s and compares equal to it -- that also answers to the names of
``subprocess.CompletedProcess`` (``returncode``, ``stdout``, ``stderr``, ``args``).

``guest_bytes(img)`` is an image's guest view as QEMU reads it (``qemu-img convert -O raw``);
``qemu_img_info`` / ``qemu_img_check`` parse the JSON of ``info`` and ``check``.

Output is text (undecodable bytes replaced), stdin is /dev/null, and core dumps are off for
every child (``qemu-io -c abort`` raises SIGABRT): the soft RLIMIT_CORE of this process is set
to 0 once, so that no ``preexec_fn`` keeps subprocess from using vfork.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["QEMU_IMG", "QEMU_IO", "QEMU_SYSTEM", "Result", "CommandError", "run", "qemu_img",
           "qemu_io", "qemu_img_info", "qemu_img_check", "assert_clean", "assert_same_guest",
           "guest_bytes", "guest_bytes_or_error", "par"]

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
QEMU_SYSTEM = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")   # as qmp_bridge.launch
TIMEOUT = 120.0

_soft, _hard = resource.getrlimit(resource.RLIMIT_CORE)
resource.setrlimit(resource.RLIMIT_CORE, (0, _hard))


class CommandError(RuntimeError):
    """A command failed (non-zero exit, or qemu-io reported a failed request)."""


class Result(tuple):
    """(rc, out, err) of one command, also by name (.rc, .out, .err, or .returncode, .stdout,
    .stderr as on a CompletedProcess) and .args (argv)."""

    def __new__(cls, args: list[str], rc: int, out: str, err: str) -> "Result":
        self = super().__new__(cls, (rc, out, err))
        self.args = args
        return self

    rc = returncode = property(lambda self: self[0])
    out = stdout = property(lambda self: self[1])
    err = stderr = property(lambda self: self[2])

    def __repr__(self) -> str:
        return "Result(%r, rc=%r, out=%r, err=%r)" % (" ".join(self.args), *self)


def _failed(r: Result, why: str = "") -> CommandError:
    return CommandError(f"command failed (rc={r.rc}{why}): {' '.join(r.args)}\n"
                        f"stderr: {r.err.strip()}\nstdout: {r.out.strip()}")


def run(*argv: Any, check: bool = True, cwd: str | os.PathLike | None = None,
        input: str | None = None, timeout: float = TIMEOUT,
        env: dict[str, str] | None = None) -> Result:
    """Run a command (arguments are str()-ed).  With check, a non-zero exit raises
    CommandError with the command, exit code and output; without, the Result is returned
    whatever the exit code (``qemu-img check`` returning 2 or 3, ``qemu-io -c abort`` killed
    by SIGABRT: rc -6).  subprocess.TimeoutExpired propagates."""
    args = [str(a) for a in argv]
    kw: dict[str, Any] = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    p = subprocess.run(args, cwd=None if cwd is None else str(cwd), capture_output=True,
                       text=True, errors="replace", timeout=timeout, env=env, **kw)
    r = Result(args, p.returncode, p.stdout, p.stderr)
    if check and r.rc != 0:
        raise _failed(r)
    return r


def qemu_img(*args: Any, check: bool = False, cwd: str | os.PathLike | None = None,
             timeout: float = TIMEOUT) -> Result:
    """``qemu-img ARGS``; by default the Result whatever the exit code."""
    return run(QEMU_IMG, *args, check=check, cwd=cwd, timeout=timeout)


# qemu-io reports a failed request on its output and still exits 0
_QEMU_IO_ERRORS = ("failed", "Invalid argument", "Operation not permitted", "No space left")


def qemu_io(img: str | os.PathLike, *cmds: str, fmt: str | None = "qcow2",
            cwd: str | os.PathLike | None = None, check: bool = True, read_only: bool = False,
            timeout: float = TIMEOUT) -> Result:
    """``qemu-io [-r] [-f FMT] -c CMD1 -c CMD2 ... IMG`` (fmt None: probed).  With check, a
    non-zero exit or a failure reported in the output ("failed", "error", ...) raises
    CommandError."""
    argv: list[Any] = [QEMU_IO] + (["-r"] if read_only else []) + (["-f", fmt] if fmt else [])
    for c in cmds:
        argv += ["-c", c]
    argv.append(img)
    r = run(*argv, cwd=cwd, check=check, timeout=timeout)
    if check:
        out = r.out + r.err
        if any(bad in out for bad in _QEMU_IO_ERRORS) or "error" in out.lower():
            raise _failed(r, ", a request failed")
    return r


def qemu_img_info(img: str | os.PathLike, cwd: str | os.PathLike | None = None, *,
                  backing_chain: bool = False, fmt: str | None = None,
                  force_share: bool = False) -> Any:
    """The parsed ``qemu-img info --output=json`` (a list with backing_chain); raises
    CommandError if qemu-img fails."""
    args: list[Any] = ["info", "--output=json"]
    args += ["--backing-chain"] if backing_chain else []
    args += ["-U"] if force_share else []
    args += ["-f", fmt] if fmt else []
    return json.loads(qemu_img(*args, img, cwd=cwd, check=True).out)


def qemu_img_check(img: str | os.PathLike, cwd: str | os.PathLike | None = None, *,
                   fmt: str | None = None) -> tuple[int, dict, str]:
    """(exit code, parsed ``qemu-img check --output=json`` or {}, stderr stripped)."""
    r = qemu_img("check", "--output=json", *(["-f", fmt] if fmt else []), img, cwd=cwd)
    try:
        data = json.loads(r.out) if r.out.strip() else {}
    except ValueError:
        data = {}
    return r.rc, data, r.err.strip()


def assert_clean(*paths: str | os.PathLike, cwd: str | os.PathLike | None = None,
                 force_share: bool = False) -> None:
    """``qemu-img check [-U]`` finds nothing wrong (exit 0: no corruption, no leak) in any of
    paths."""
    for p in paths:
        r = qemu_img("check", *(["-U"] if force_share else []), p, cwd=cwd)
        assert r.rc == 0, (str(p), r.out, r.err)


def assert_same_guest(a: str | os.PathLike, b: str | os.PathLike, *args: Any,
                      cwd: str | os.PathLike | None = None) -> None:
    """``qemu-img compare -q [ARGS] A B`` finds the guest views identical."""
    r = qemu_img("compare", "-q", *args, a, b, cwd=cwd)
    assert r.rc == 0, r.out + r.err


def guest_bytes(img: str | os.PathLike, *, fmt: str | None = None, snapshot: str | None = None,
                force_share: bool = False, cwd: str | os.PathLike | None = None) -> bytes:
    """The guest view of img (through its whole chain) as QEMU reads it: ``qemu-img convert
    [-U] [-f FMT] -O raw [-l SNAPSHOT] IMG`` into a temporary file next to the image.
    snapshot is convert's -l argument ("snapshot.name=s1", "snapshot.id=2").  cwd: where
    qemu-img runs (img may be relative to it; default the image's directory, against which
    qemu 7.2 resolves relative data file names).  Raises CommandError if qemu-img fails."""
    path = Path(cwd, img) if cwd is not None else Path(img)
    args: list[Any] = ["convert"] + (["-U"] if force_share else []) + (["-f", fmt] if fmt else [])
    args += ["-O", "raw"] + (["-l", snapshot] if snapshot else [])
    fd, out = tempfile.mkstemp(prefix=".guest-", suffix=".raw", dir=path.parent)
    os.close(fd)
    try:
        if cwd is None:
            r = qemu_img(*args, os.path.abspath(path), out, cwd=path.parent)
        else:
            r = qemu_img(*args, img, out, cwd=cwd)
        if r.rc != 0:
            raise _failed(r)
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def guest_bytes_or_error(img: str | os.PathLike, **kw: Any) -> bytes | str:
    """guest_bytes(), or the error as a string (for a list of problems)."""
    try:
        return guest_bytes(img, **kw)
    except CommandError as e:
        return str(e)


_POOL = ThreadPoolExecutor(max_workers=4)


def par(thunks: Iterable[Callable[[], Any]]) -> list:
    """Run independent (read-only) tool invocations concurrently; their results in order."""
    futs = [_POOL.submit(t) for t in thunks]
    return [f.result() for f in futs]


class QemuIoHolder:
    """A real qemu-io holding IMG open (with its locks) until the block ends: `with
    QemuIoHolder(img) as h:`. It waits until another process sees the lock, and fails with
    qemu-io's own stderr if qemu-io exits instead (a bare timeout once hid why)."""

    def __init__(self, img: str | os.PathLike, *, readonly: bool = False,
                 fmt: str = "qcow2", timeout: float = 60.0) -> None:
        self.img, self.readonly, self.fmt, self.timeout = str(img), readonly, fmt, timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "QemuIoHolder":
        import time
        from qcow2engine.host.locking import held_by_other
        self._err = tempfile.TemporaryFile()
        argv = ["qemu-io"] + (["-r"] if self.readonly else []) + [
            "-f", self.fmt, "-c", "sleep 600000", self.img]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        deadline = time.monotonic() + self.timeout
        while not held_by_other(self.img):
            if self.proc.poll() is not None:
                self._err.seek(0)
                msg = self._err.read().decode(errors="replace")
                self.__exit__(None, None, None)
                raise AssertionError(f"qemu-io exited {self.proc.returncode}: {msg!r}")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError(f"qemu-io took no lock on {self.img} in {self.timeout} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        self._err.close()
