"""Input images: built once, cached, copied fresh for runs that modify them.

An ``Artifact`` names a build function and its parameters per profile ("full" /
"quick"); ``ensure_artifact`` builds it into ``ROOT/<profile>/<name>/`` unless a copy
built with the same parameters (and ``version``) is there.  The build functions
themselves are the workloads' (see ``benchmarks.workloads``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .runner import log


def run_checked(argv: list[object], cwd: Path | None = None,
                timeout: float | None = None) -> None:
    """Run an untimed set-up command; RuntimeError with its stderr if it fails."""
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()}")


def sparse_copy(src: Path, dst: Path) -> None:
    """``cp --sparse=always``: the fresh starting image of one run."""
    run_checked(["cp", "--sparse=always", str(src), str(dst)])


def qemu_io_for(qemu_img: str) -> str:
    """qemu-io next to the given qemu-img, else from PATH."""
    sibling = Path(qemu_img).with_name("qemu-io")
    return str(sibling) if sibling.is_absolute() and os.access(sibling, os.X_OK) \
        else "qemu-io"


def image_check(qemu_img: str, path: Path) -> subprocess.CompletedProcess:
    """``qemu-img check PATH`` (exit 0: clean)."""
    return subprocess.run([qemu_img, "check", str(path)], capture_output=True, text=True)


@dataclass(frozen=True)
class Artifact:
    """Input images for one or more workloads.

    ``params`` maps a profile name ("full"/"quick") to the build parameters;
    ``files`` maps placeholder names (used as ``{name}`` in workload argv)
    to file names inside the artifact's directory.  Bump ``version`` when the
    build function changes so cached copies are rebuilt.
    """
    name: str
    build: Callable[[Path, dict, str], None]
    params: dict[str, dict]
    files: dict[str, str] = field(default_factory=lambda: {"img": "img.qcow2"})
    version: int = 1


def ensure_artifact(art: Artifact, profile: str, root: Path, qemu_img: str,
                    rebuild: bool = False) -> tuple[dict[str, Path], float]:
    """Build ``art`` unless a matching cached copy exists.

    Returns (placeholder -> absolute path, build seconds or 0.0 if cached).
    """
    d = root / profile / art.name
    stamp_path = d / ".built.json"
    want = {"version": art.version, "params": art.params[profile]}
    files = {k: d / v for k, v in art.files.items()}
    if not rebuild and stamp_path.exists():
        try:
            have = json.loads(stamp_path.read_text())
        except ValueError:
            have = None
        if have == want and all(f.exists() for f in files.values()):
            return files, 0.0
    log(f"  building {profile}/{art.name} {art.params[profile]} ...")
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    art.build(d, art.params[profile], qemu_img)
    dt = time.perf_counter() - t0
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise RuntimeError(f"artifact {art.name}: build did not create {missing}")
    stamp_path.write_text(json.dumps(want))
    log(f"  built {profile}/{art.name} in {dt:.1f} s")
    return files, dt
