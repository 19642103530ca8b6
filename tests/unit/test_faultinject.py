"""The fault-injection framework (tests/helpers/faultinject.py) proven against a stand-in
fileio module: call counting and tracing, "error" and "crash" modes, fd dropping, leak and
bypass detection, injection points, and real process kills (fork, fresh interpreter).  No
image and no QEMU: the stand-in is a toy journaled record store.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
import types
from pathlib import Path

import pytest

from tests.helpers.faultinject import (KILL_EXIT_CODE, SimulatedCrash, count_calls, inject,
                                       injection_points, run_killed, run_killed_script,
                                       trace_calls)


STANDIN_SOURCE = '''
import os

def pwrite(fd, data, offset):
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)

def fsync(fd):
    os.fdatasync(fd)

def ftruncate(fd, size):
    os.ftruncate(fd, size)

def fallocate(fd, mode, offset, length):
    os.posix_fallocate(fd, offset, length)
'''

# A toy "journaled record" store: a record is written out of place, then the
# 8-byte header pointer is switched to it.  Header: >Q record offset,
# then at 8 a close marker.  Record: >I length + payload.
REC_OFF = 4096


def _standin_module(name: str = "fake_fileio") -> types.ModuleType:
    mod = types.ModuleType(name)
    exec(compile(STANDIN_SOURCE, name, "exec"), mod.__dict__)
    return mod


def _store_init(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack(">Q", 64) + b"\0" * 56 + struct.pack(">I", 3) + b"old")


def _store_read(path: Path) -> bytes:
    buf = path.read_bytes()
    (off,) = struct.unpack_from(">Q", buf, 0)
    (n,) = struct.unpack_from(">I", buf, off)
    return buf[off + 4: off + 4 + n]


def _store_update(fio, path: Path, payload: bytes, *, buggy: bool = False,
                  leak_on_error: bool = False, bypass: bool = False,
                  noflush: bool = False) -> None:
    """7 calls: ftruncate, pwrite record, fallocate, fsync, pwrite header,
    fsync, and (in finally) pwrite close marker.  ``buggy`` switches the
    header before the record is written (not crash safe)."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK if hasattr(fcntl, "F_OFD_SETLK") else 37,
                struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 100, 1, 0))
    ok = False
    try:
        fio.ftruncate(fd, REC_OFF + 4096)
        rec = struct.pack(">I", len(payload)) + payload
        if buggy:
            fio.pwrite(fd, struct.pack(">Q", REC_OFF), 0)
            fio.pwrite(fd, rec, REC_OFF)
        else:
            fio.pwrite(fd, rec, REC_OFF)
        fio.fallocate(fd, 0, REC_OFF, 4096)
        if not noflush:
            fio.fsync(fd)      # noflush: ordered only by luck (a process crash keeps order)
        if bypass:
            os.pwrite(fd, struct.pack(">Q", REC_OFF), 0)
        elif not buggy:
            fio.pwrite(fd, struct.pack(">Q", REC_OFF), 0)
        fio.fsync(fd)
        ok = True
    finally:
        if ok or not leak_on_error:
            fio.pwrite(fd, b"C", 8)        # may fail too: then fd leaks
            os.close(fd)


class TestFramework:
    def test_count_and_trace(self, tmp_path):
        fio = _standin_module()
        p = tmp_path / "s"
        _store_init(p)
        calls = trace_calls(lambda: _store_update(fio, p, b"new"), module=fio)
        assert [c.name for c in calls] == ["ftruncate", "pwrite", "fallocate", "fsync",
                                           "pwrite", "fsync", "pwrite"]
        assert [c.index for c in calls] == list(range(7))
        assert calls[1].offset == REC_OFF and calls[1].length == 7
        assert calls[1].path == str(p)
        assert "pwrite(s, 7 bytes @ 0x1000)" in str(calls[1])
        assert count_calls(lambda: _store_update(fio, p, b"new2"), module=fio) == 7
        assert _store_read(p) == b"new2"
        # the module is restored
        assert not hasattr(fio.pwrite, "__wrapped__")

    def test_nested_fileio_calls_count_once(self, tmp_path):
        fio = _standin_module()

        def fsync(fd):           # a fileio function built on another one
            fio.pwrite(fd, b"", 0)
            os.fdatasync(fd)
        fio.fsync = fsync
        p = tmp_path / "s"
        _store_init(p)
        assert count_calls(lambda: _store_update(fio, p, b"x"), module=fio) == 7

    def test_error_mode(self, tmp_path):
        fio = _standin_module()
        for i in range(7):
            p = tmp_path / f"s{i}"
            _store_init(p)
            with inject(i, "error", module=fio) as inj:
                with pytest.raises(OSError) as ei:
                    _store_update(fio, p, b"new")
            assert ei.value.errno == errno.EIO
            assert inj.triggered is not None and inj.triggered.index == i
            assert not inj.crashed
            # calls after the failing one still went through (finally block)
            buf = p.read_bytes()
            assert inj.count == min(i + 2, 7)     # the rest of try is skipped
            assert _store_read(p) == (b"new" if i >= 5 else b"old")
            if i != 6:
                assert buf[8:9] == b"C"
                assert inj.leaked_fds() == {}
            else:                 # the failed marker write skipped os.close: a leak
                assert list(inj.leaked_fds().values()) == [str(p)]
                _cleanup(inj)
            assert not hasattr(fio.pwrite, "__wrapped__")

    def test_crash_mode_stops_all_writes_and_drops_fds(self, tmp_path):
        fio = _standin_module()
        for i in range(7):
            p = tmp_path / f"s{i}"
            _store_init(p)
            before = p.read_bytes()
            with inject(i, "crash", module=fio, paths=[tmp_path]) as inj:
                with pytest.raises(SimulatedCrash):
                    _store_update(fio, p, b"new")
            assert not isinstance(SimulatedCrash("x"), Exception)
            assert inj.crashed and inj.triggered.index == i
            # the finally block's marker write was refused: nothing after i on disk
            buf = p.read_bytes()
            assert buf[8:9] == b"\0"
            assert inj.count == i + 1
            if i == 0:
                assert buf == before
            assert _store_read(p) == (b"new" if i >= 5 else b"old")
            # the leaked fd was dropped: it now points to /dev/null and the
            # OFD lock on the file is gone
            assert len(inj.dropped) == 1
            assert os.readlink(f"/proc/self/fd/{inj.dropped[0]}") == os.devnull
            fd2 = os.open(p, os.O_RDWR)
            try:
                fcntl.fcntl(fd2, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 100, 1, 0))
            finally:
                os.close(fd2)
            _cleanup(inj)     # what the dead stand-in object would do

    def test_every_point_finds_the_non_crash_safe_variant(self, tmp_path):
        """The loop used on the engine: a correct stand-in always reads old
        or new; the buggy one is caught at some call index."""
        fio = _standin_module()
        _store_init(tmp_path / "c")
        n = count_calls(lambda: _store_update(fio, tmp_path / "c", b"new"), module=fio)
        assert n == 7
        bad = {False: [], True: []}
        for buggy in (False, True):
            for mode in ("error", "crash"):
                for i in range(n):
                    p = tmp_path / f"b{buggy}{mode}{i}"
                    _store_init(p)
                    with inject(i, mode, module=fio, paths=[p]) as inj:
                        try:
                            _store_update(fio, p, b"new", buggy=buggy)
                        except (OSError, SimulatedCrash):
                            pass
                    _cleanup(inj)
                    try:
                        ok = _store_read(p) in (b"old", b"new")
                    except struct.error:
                        ok = False
                    if not ok:
                        bad[buggy].append((mode, i))
        assert bad[False] == []
        # header switched (call 1) before the record is written (call 2)
        assert ("crash", 2) in bad[True] and ("error", 2) in bad[True]

    def test_device_cache_modes_find_a_missing_flush(self, tmp_path):
        """lose-all / lose-some undo what was written since the file's last flush: the
        stand-in without its barrier between record and header passes the process-crash
        loop but breaks when the device writes the header back and not the record; with
        the barrier every point (and the power going after it returned) is old or new,
        new once it returned."""
        fio = _standin_module()
        _store_init(tmp_path / "c")
        found = {False: set(), True: set()}
        for noflush in (False, True):
            n = count_calls(lambda: _store_update(fio, tmp_path / "c", b"new",
                                                  noflush=noflush), module=fio)
            for mode in ("crash", "lose-all", "lose-some"):
                for i in range(n + 1):
                    for seed in range(8 if mode == "lose-some" else 1):
                        p = tmp_path / f"d{noflush}{mode}{i}-{seed}"
                        _store_init(p)
                        done = False
                        with inject(i, mode, module=fio, paths=[p], seed=seed) as inj:
                            try:
                                _store_update(fio, p, b"new", noflush=noflush)
                                done = True
                            except (OSError, SimulatedCrash):
                                pass
                        if done and mode != "crash":
                            inj.power_off()
                        _cleanup(inj)
                        try:
                            got = _store_read(p)
                        except struct.error:
                            got = None
                        if got not in (b"old", b"new") or (done and got != b"new"):
                            found[noflush].add(mode)
                        if mode == "lose-all" and i < n and inj.lost:
                            assert all(v > 0 for v in inj.lost.values())
        assert found[False] == set()
        assert "lose-some" in found[True] and "crash" not in found[True]

    def test_leak_and_bypass_detection(self, tmp_path):
        fio = _standin_module()
        p = tmp_path / "s"
        _store_init(p)
        with inject(3, "error", module=fio, paths=[tmp_path]) as inj:
            with pytest.raises(OSError):
                _store_update(fio, p, b"new", leak_on_error=True)
        leaked = inj.leaked_fds()
        assert list(leaked.values()) == [str(p)]
        assert inj.drop() == list(leaked)
        os.close(list(leaked)[0])

        _store_init(p)
        with inject(None, module=fio, paths=[tmp_path]) as inj:
            _store_update(fio, p, b"new", bypass=True)
        assert inj.bypasses and "os.pwrite" in inj.bypasses[0]
        # a write to an unrelated file (outside paths) is not a bypass
        q = tmp_path.parent / f"{tmp_path.name}-other"
        with inject(None, module=fio, paths=[tmp_path]) as inj:
            fd = os.open(q, os.O_RDWR | os.O_CREAT)
            os.pwrite(fd, b"x", 0)
            os.close(fd)
        assert inj.bypasses == []
        q.unlink()

    def test_injection_points(self):
        assert injection_points(5) == [0, 1, 2, 3, 4]
        pts = injection_points(500, first=40, sample=20)
        assert pts[:40] == list(range(40)) and pts[-1] == 499 and len(pts) == 61
        assert pts == injection_points(500, first=40, sample=20)
        assert len(set(pts)) == len(pts) and pts == sorted(pts)

    def test_real_kill_fork(self, tmp_path):
        fio = _standin_module()
        for i in (0, 1, 4, 6, 7):
            p = tmp_path / f"k{i}"
            _store_init(p)
            rc = _fork_with_module(fio, p, i)
            assert rc == (KILL_EXIT_CODE if i < 7 else 0)
            assert _store_read(p) == (b"new" if i >= 5 else b"old")
            assert (p.read_bytes()[8:9] == b"C") == (i == 7)

    def test_real_kill_script(self, tmp_path):
        moddir = tmp_path / "mods"
        moddir.mkdir()
        (moddir / "fake_fileio_mod.py").write_text(STANDIN_SOURCE)
        p = tmp_path / "s"
        env = dict(os.environ, PYTHONPATH=f"{moddir}{os.pathsep}{Path(__file__).parents[2]}")
        script = f"""
            import os, struct
            import fake_fileio_mod as fio
            fd = os.open({str(p)!r}, os.O_RDWR)
            fio.pwrite(fd, b"AAAA", 100)
            fio.fsync(fd)
            fio.pwrite(fd, b"BBBB", 200)
            raise SystemExit(5)
        """
        for i, rc, a, b in ((0, 137, False, False), (1, 137, True, False),
                            (2, 137, True, False), (3, 5, True, True)):
            _store_init(p)
            proc = run_killed_script(script, i, module="fake_fileio_mod", env=env)
            assert proc.returncode == rc, proc.stderr
            buf = p.read_bytes()
            assert (buf[100:104] == b"AAAA") == a
            assert (buf[200:204] == b"BBBB") == b


def _cleanup(inj) -> None:
    """Close what the dead stand-in left: dropped fds (now /dev/null) and
    fds leaked after an error."""
    for fd in list(inj.leaked_fds()) + inj.dropped:
        try:
            os.close(fd)
        except OSError:
            pass
    inj.dropped.clear()


def _fork_with_module(fio: types.ModuleType, p: Path, i: int) -> int:
    """run_killed with a stand-in module object: register it in sys.modules
    so that the child can import it by name."""
    sys.modules[fio.__name__] = fio
    try:
        return run_killed(lambda: _store_update(fio, p, b"new"), i, module=fio.__name__)
    finally:
        del sys.modules[fio.__name__]
