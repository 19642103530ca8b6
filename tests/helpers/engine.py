"""Run the qcow2engine CLI in-process (fast) or as a subprocess, and qemu-img alongside."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

from qcow2engine.cli.main import main


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def engine(*args, cwd=None):
    """(rc, stdout, stderr) of `qcow2engine ARGS` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with _cwd(cwd or os.getcwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def engine_proc(*args, cwd=None, timeout=60):
    p = subprocess.run([sys.executable, "-m", "qcow2engine", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def qemu_img(*args, cwd=None, timeout=60):
    p = subprocess.run(["qemu-img", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr
