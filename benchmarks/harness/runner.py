"""One way to time a command and one way to repeat it.

``Runner.run`` measures whole processes: wall time from just before the process is
started until it is reaped, and its peak RSS (``/usr/bin/time -f %M``, or ``os.wait4``'s
``ru_maxrss`` of a forked child).  ``repeat_alternating`` runs warm-up rounds and then N
rounds in which every contender runs once, in a fixed order, so that drift hits all of
them alike, and collects ``Samples`` (times, RSS, first error).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

GNU_TIME = "/usr/bin/time"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


def log(msg: str) -> None:
    """Progress goes to stderr; stdout holds only the results."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class RunResult:
    seconds: float
    rss_kib: int | None
    returncode: int | None
    error: str | None        # None when the command succeeded


def _noop() -> None:
    pass


def _first_stderr_line(path: Path, argv0: str = "", start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    # A Python traceback's first line says nothing; its last line does.
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    # "/usr/bin/python3: No module named ..." -> "No module named ..."
    for prefix in {argv0, os.path.basename(argv0)} - {""}:
        if line.startswith(prefix + ": "):
            line = line[len(prefix) + 2:]
            break
    return line


class Runner:
    """Whole-process measurement.

    ``use_gnu_time``: peak RSS from ``/usr/bin/time -f %M`` (the command's own);
    otherwise from ``os.wait4``: with ``fork_for_rss`` of a forked (not vforked)
    child, the larger of the command's and the harness's RSS at the fork; without it
    (a vforked child, about 2 ms less per process), the larger of the command's and
    the harness's high-water RSS, which is as good when the harness stays small.
    ``env``/``cwd`` of the commands default to the harness's.
    """

    def __init__(self, use_gnu_time: bool = False, env: dict[str, str] | None = None,
                 cwd: Path | None = None, fork_for_rss: bool = True):
        self.use_gnu_time = use_gnu_time
        self.env = env
        self.cwd = cwd
        self.fork_for_rss = fork_for_rss and not use_gnu_time
        self.rss_method = ("/usr/bin/time -f %M" if use_gnu_time
                           else "os.wait4 ru_maxrss (includes harness RSS at fork)"
                           if fork_for_rss
                           else "os.wait4 ru_maxrss (includes harness high-water RSS)")

    def run(self, argvs: list[list[str]], stdout: Path, timeout: float | None = None,
            ok_returncodes: tuple[int, ...] = (0,)) -> RunResult:
        """Run the invocations ``argvs`` one after the other (usually one).

        Returns their summed wall time (process start to reaped) and the
        largest peak RSS; stops at the first failing one.  stdout/stderr of
        all go to ``stdout`` and ``stdout.with_suffix(".stderr")``;
        ``timeout`` (None: none) applies to the sequence as a whole.
        """
        stderr = stdout.with_suffix(".stderr")
        total = 0.0
        peak: int | None = None
        rc: int | None = None
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            for argv in argvs:
                left = None if timeout is None else timeout - total
                r = self._run_one(argv, out, err, stdout.with_suffix(".rss"),
                                  stderr, left, ok_returncodes)
                total += r.seconds
                rc = r.returncode
                if r.rss_kib is not None:
                    peak = r.rss_kib if peak is None else max(peak, r.rss_kib)
                if r.error:
                    if r.error.startswith("timeout"):
                        r.error = f"timeout after {timeout:g} s"
                    return RunResult(total, peak, rc, r.error)
        return RunResult(total, peak, rc, None)

    def _run_one(self, argv: list[str], out, err, rss_file: Path,
                 stderr: Path, timeout: float | None,
                 ok_returncodes: tuple[int, ...]) -> RunResult:
        full = argv
        if self.use_gnu_time:
            rss_file.unlink(missing_ok=True)
            full = [GNU_TIME, "-f", "%M", "-o", str(rss_file), "--"] + argv
        timed_out = threading.Event()
        out.flush()
        err.flush()
        err_pos = err.tell()
        kwargs: dict[str, Any] = {}
        if self.fork_for_rss:
            # Force fork() instead of vfork(): a vfork child's ru_maxrss
            # inherits the harness's high-water RSS.
            kwargs["preexec_fn"] = _noop
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(full, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, cwd=self.cwd,
                                    env=self.env, start_new_session=True,
                                    **kwargs)
        except OSError as exc:
            return RunResult(0.0, None, None, f"error: {exc}")

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        timer = None
        if timeout is not None:
            timer = threading.Timer(max(timeout, 0.0), kill)
            timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            t1 = time.perf_counter()
            if timer is not None:
                timer.cancel()
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc           # already reaped; keep Popen quiet
        rss: int | None = ru.ru_maxrss
        if self.use_gnu_time:
            rss = None
            try:
                lines = rss_file.read_text().split()
                rss = int(lines[-1]) if lines else None
            except (OSError, ValueError):
                pass
        error = None
        if timed_out.is_set():
            error = f"timeout after {timeout:g} s"
        elif rc not in ok_returncodes:
            msg = _first_stderr_line(stderr, argv[0], err_pos)
            if self.use_gnu_time and rc == 127 and not msg:
                msg = "command not found"
            error = f"error: {msg or f'exit status {rc}'}"
            if len(error) > 70:
                error = error[:67] + "..."
        return RunResult(t1 - t0, rss, rc, error)


@dataclass
class Samples:
    """The timed runs of one contender (tool, method, ...)."""
    times: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def spread(self) -> float:
        """max/min of the timed runs (1.0 = perfectly steady)."""
        if not self.times or min(self.times) <= 0:
            return 1.0
        return max(self.times) / min(self.times)

    @property
    def peak_rss_mib(self) -> float | None:
        return max(self.rss_kib) / 1024 if self.rss_kib else None


WARMUP = -1   # the run index ``once`` gets in a warm-up round


def repeat_alternating(names: Iterable[str], repeat: int,
                       once: Callable[[str, int], Union[RunResult, float]], *,
                       warmup: int = 0, budget: float | None = None,
                       after_warmup: Optional[Callable[[], None]] = None
                       ) -> dict[str, Samples]:
    """``warmup`` untimed rounds, then ``repeat`` timed ones; in each round
    ``once(name, i)`` for every name, in order (``i`` is ``WARMUP`` in a warm-up
    round, else 0..repeat-1).

    ``once`` returns a ``RunResult`` (or plain seconds).  A failed run (``error``)
    is recorded in that name's ``Samples.error`` and the name runs no more; a
    warm-up run's time is not kept.  With ``budget``, a name stops once its kept
    times add up to more than ``budget`` seconds (after at least one).
    ``after_warmup`` is called between the warm-up rounds and the timed ones.
    """
    names = list(names)
    samples = {n: Samples() for n in names}
    rounds = [WARMUP] * warmup + list(range(repeat))
    for k, i in enumerate(rounds):
        if k == warmup and warmup and after_warmup is not None:
            after_warmup()
        for n in names:
            s = samples[n]
            if s.error or (budget is not None and s.times and sum(s.times) > budget):
                continue
            r = once(n, i)
            if not isinstance(r, RunResult):
                r = RunResult(float(r), None, 0, None)
            if r.error:
                s.error = r.error
                continue
            if i != WARMUP:
                s.times.append(r.seconds)
                if r.rss_kib is not None:
                    s.rss_kib.append(r.rss_kib)
    return samples
