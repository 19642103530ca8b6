"""Run the qcow2engine CLI in this process (fast) or as a subprocess."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

__all__ = ["engine", "engine_proc"]


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def engine(*args, cwd=None, catch_exit: bool = False) -> tuple[int, str, str]:
    """(rc, stdout, stderr) of `qcow2engine ARGS` run in this process (arguments are
    str()-ed).  With catch_exit a SystemExit from the CLI is its exit code (as it would be
    for the process); without it, it propagates and fails the test."""
    from qcow2engine.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with _cwd(cwd or os.getcwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            if not catch_exit:
                raise
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def engine_proc(*args, cwd=None, timeout: float = 120) -> tuple[int, str, str]:
    """(rc, stdout, stderr) of `python -m qcow2engine ARGS` in a fresh interpreter."""
    p = subprocess.run([sys.executable, "-m", "qcow2engine", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr
