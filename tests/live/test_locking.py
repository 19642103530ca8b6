"""Image locking against a live QEMU 7.2: our OFD locks and QEMU's must keep each other out.

QEMU (file-posix) holds shared OFD locks on byte 100+i for each permission it takes and 200+i
for each one it does not share (i: 0 consistent read, 1 write, 2 write unchanged, 3 resize).
A read-write qcow2 node holds 100, 101, 103, 201, 203; a read-only one 100, 201, 203.
"""
from __future__ import annotations

import json
import os

import pytest

import qcow2engine
from qcow2engine import ImageInUseError
from qmp_bridge import nodes as N
from qmp_bridge.errors import QMPImageInUseError
from qmp_bridge.launch import QemuProcess
from tests.helpers.engine import engine
from tests.helpers.files import file_sha256
from tests.helpers.qemu import qemu_img, qemu_io

SHARED_WRITE = 'Failed to get shared "write" lock'   # a reader meets a writer
WRITE = 'Failed to get "write" lock'                 # a writer meets a reader or writer


@pytest.fixture
def image(tmp_path):
    """A 16 MiB qcow2 image with data in the first 64 KiB and at 8 MiB."""
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "16M", check=True)
    qemu_io(path, "write -P 0xab 0 64k", "write -P 0xcd 8M 4k", fmt=None)
    return str(path)


def launch(machine: str = "none") -> QemuProcess:
    """A QEMU (TCG, prelaunch) with its log in its private dir: the image's folder must hold
    nothing but the image."""
    return QemuProcess(machine=machine, timeout=10.0)


@pytest.fixture
def vm():
    with launch() as v:
        yield v


def add_qcow2(vm: QemuProcess, path, node: str, read_only: bool = False) -> None:
    """blockdev-add a qcow2 node `node` over a file node `<node>-file`."""
    N.add_image(vm.qmp, path, node, fmt="qcow2", read_only=read_only)


def node_names(vm: QemuProcess) -> list:
    return [n["node-name"] for n in vm.qmp.execute("query-named-block-nodes", {"flat": True})]


def held_lock_bytes(path) -> list:
    """Sorted byte offsets locked on `path`'s inode by anyone (from /proc/locks)."""
    st = os.stat(path)
    dev = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    out = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if fields[1] == "->" or fields[5] != dev:  # "->" lines are blocked waiters
                continue
            end = int(fields[7]) if fields[7].isdigit() else 10 ** 6  # "EOF": to the end
            out.extend(range(int(fields[6]), min(end, 10 ** 6) + 1))
    return sorted(out)


def assert_one_line_error(rc, out, err, expected_rc, needle):
    assert rc == expected_rc, (rc, out, err)
    assert err.startswith("qcow2engine: ") and err.count("\n") == 1, err
    assert needle in err, err


# ---------------------------------------------------------------- QEMU holds the image
def test_qemu_writer_blocks_our_writers(image, vm):
    add_qcow2(vm, image, "d0")
    before = file_sha256(image)

    rc, out, err = engine("io", "-c", "write -P 0x55 0 4k", image)
    assert_one_line_error(rc, out, err, 1, WRITE)
    assert out == ""
    # qemu-io says the same
    assert WRITE in qemu_io(image, "write -P 0x55 0 4k", fmt=None, check=False)[2]

    with pytest.raises(ImageInUseError, match=WRITE):
        qcow2engine.open_chain(image, writable=True)
    with pytest.raises(ImageInUseError, match=SHARED_WRITE):
        qcow2engine.open_chain(image)

    assert file_sha256(image) == before
    # QEMU's node is untouched and still usable
    assert vm.qmp.hmp('qemu-io d0 "read -P 0xab 0 64k"') == ""
    assert vm.qmp.hmp('qemu-io d0 "write -P 0x77 2M 4k"') == ""
    assert "Pattern verification failed" not in vm.log()


@pytest.mark.parametrize("argv, needle", [
    pytest.param(["io", "-c", "write 0 4k", "{img}"], WRITE, id="io-write"),
    pytest.param(["io", "-c", "discard 0 64k", "{img}"], WRITE, id="io-discard"),
    # qemu-img says 'Failed to get "write" lock'; we open read-only first (shared "write")
    pytest.param(["check", "-r", "leaks", "{img}"], "lock", id="check-r"),
    pytest.param(["resize", "{img}", "+1M"], WRITE, id="resize"),
    pytest.param(["amend", "-o", "lazy_refcounts=on", "{img}"], WRITE, id="amend"),
    pytest.param(["snapshot", "-c", "s1", "{img}"], WRITE, id="snapshot-c"),
    pytest.param(["create", "-q", "-f", "qcow2", "{img}", "16M"], WRITE, id="create"),
])
def test_qemu_writer_refuses_our_modifying_commands(image, vm, argv, needle):
    """Every modifying command fails like qemu-img (exit 1, lock error) and changes nothing."""
    add_qcow2(vm, image, "d0")
    before = file_sha256(image)
    argv = [a.format(img=image) for a in argv]
    if argv[0] != "io":
        q_rc, _, q_err = qemu_img(*argv)
        assert q_rc == 1 and WRITE in q_err, q_err
    rc, out, err = engine(*argv)
    assert_one_line_error(rc, out, err, 1, needle)
    assert file_sha256(image) == before
    assert [n for n in os.listdir(os.path.dirname(image)) if n != "disk.qcow2"] == []


@pytest.mark.parametrize("argv, qemu_rc", [
    pytest.param(["info"], 1, id="info"),
    pytest.param(["info", "--output=json"], 1, id="info-json"),
    pytest.param(["check"], 1, id="check"),
    pytest.param(["map"], 1, id="map"),
    pytest.param(["map", "--output=json"], 1, id="map-json"),
    pytest.param(["convert", "-O", "raw", "{tmp}/out.raw"], 1, id="convert"),
    pytest.param(["compare", "{img}"], 2, id="compare"),
])
def test_qemu_writer_blocks_our_readers_without_U(image, vm, tmp_path, argv, qemu_rc):
    add_qcow2(vm, image, "d0")
    before = file_sha256(image)
    argv = [a.format(tmp=tmp_path, img=image) for a in argv]
    cmd, rest = argv[0], argv[1:]

    q_rc, _, q_err = qemu_img(cmd, image, *rest)
    assert q_rc == qemu_rc and SHARED_WRITE in q_err, q_err
    assert not os.path.exists(tmp_path / "out.raw")
    rc, out, err = engine(cmd, image, *rest)
    assert_one_line_error(rc, out, err, qemu_rc, SHARED_WRITE)
    assert out == ""
    assert not os.path.exists(tmp_path / "out.raw")  # convert gave up before creating it

    with pytest.raises(ImageInUseError, match=SHARED_WRITE):
        qcow2engine.open_chain(image)
    assert file_sha256(image) == before


def test_qemu_writer_force_share_readers_match_qemu_img(image, vm, tmp_path):
    add_qcow2(vm, image, "d0")
    before = file_sha256(image)

    for argv in (["info", "-U", "--output=json"], ["info", "-U"], ["check", "-U"],
                 ["check", "-U", "--output=json"], ["map", "-U", "--output=json"], ["map", "-U"]):
        q = qemu_img(*argv, image)
        e = engine(*argv, image)
        assert q[0] == 0, q
        assert e == q, argv
    assert json.loads(engine("info", "-U", "--output=json", image)[1])["dirty-flag"] is False

    # read-only I/O and convert work with -U too, and see the guest data
    rc, out, err = engine("io", "-r", "-U", "-c", "read -P 0xab 0 64k", "-c", "read -P 0xcd 8M 4k",
                          image)
    assert rc == 0 and "Pattern verification failed" not in out, (out, err)
    assert engine("convert", "-U", "-O", "raw", image, tmp_path / "ours.raw")[0] == 0
    assert qemu_img("convert", "-U", "-O", "raw", image, tmp_path / "theirs.raw")[0] == 0
    assert file_sha256(tmp_path / "ours.raw") == file_sha256(tmp_path / "theirs.raw")
    with qcow2engine.open_chain(image, force_share=True) as chain:
        assert chain.read(8 << 20, 4096) == b"\xcd" * 4096

    assert file_sha256(image) == before


def test_qemu_reader_allows_our_readers_blocks_our_writers(image, vm):
    add_qcow2(vm, image, "d0", read_only=True)
    before = file_sha256(image)

    for argv in (["info", "--output=json"], ["check"], ["map", "--output=json"]):
        q = qemu_img(*argv, image)
        assert q[0] == 0, q
        assert engine(*argv, image) == q, argv
    with qcow2engine.open_chain(image) as chain:
        assert chain.read(0, 4096) == b"\xab" * 4096

    rc, out, err = engine("io", "-c", "write -P 0x55 0 4k", image)
    assert_one_line_error(rc, out, err, 1, WRITE)
    with pytest.raises(ImageInUseError, match=WRITE):
        qcow2engine.open_chain(image, writable=True)
    assert file_sha256(image) == before


# ---------------------------------------------------------------- we hold the image
def test_our_writer_blocks_qemu(image, vm):
    with qcow2engine.open_chain(image, writable=True) as chain:
        with pytest.raises(QMPImageInUseError, match=WRITE):
            add_qcow2(vm, image, "d0")
        with pytest.raises(QMPImageInUseError, match=SHARED_WRITE):
            add_qcow2(vm, image, "d0", read_only=True)
        assert node_names(vm) == []  # failed adds leave nothing behind

        rc, _, err = qemu_img("info", image)
        assert rc == 1 and SHARED_WRITE in err, err
        rc, out, err = qemu_img("info", "-U", "--output=json", image)
        assert rc == 0 and json.loads(out)["virtual-size"] == 16 << 20, err
        rc, _, err = qemu_io(image, "write 0 4k", fmt=None, check=False)
        assert rc == 1 and WRITE in err, err

        chain.write(4096, b"\x42" * 4096)  # our handle still works

    # after we close, QEMU gets the image read-write and can write to it
    add_qcow2(vm, image, "d0")
    assert vm.qmp.hmp('qemu-io d0 "read -P 0x42 4k 4k"') == ""
    assert vm.qmp.hmp('qemu-io d0 "write -P 0x5a 1M 64k"') == ""
    assert "Pattern verification failed" not in vm.log()
    N.delete_node(vm.qmp, "d0")
    with qcow2engine.open_chain(image, writable=True) as chain:  # and QEMU let go again
        assert chain.read(1 << 20, 65536) == b"\x5a" * 65536
    assert qemu_img("check", image)[0] == 0


def test_our_reader_allows_qemu_img_blocks_qemu_writer(image, vm):
    with qcow2engine.open_chain(image) as chain:
        rc, out, err = qemu_img("info", "--output=json", image)
        assert rc == 0, err
        rc, _, err = qemu_img("check", image)
        assert rc == 0, err

        with pytest.raises(QMPImageInUseError, match=WRITE):
            add_qcow2(vm, image, "d0")
        add_qcow2(vm, image, "r0", read_only=True)  # readers coexist
        N.delete_node(vm.qmp, "r0")
        assert chain.read(0, 4096) == b"\xab" * 4096

    add_qcow2(vm, image, "d0")
    assert vm.qmp.hmp('qemu-io d0 "write -P 0x11 0 4k"') == ""


def test_lock_bytes_match_qemu(image, vm):
    """Our writer takes exactly QEMU's read-write bytes; our reader 100 and 201
    (QEMU's read-only node also unshares resize, byte 203)."""
    qemu_rw = [100, 101, 103, 201, 203]
    add_qcow2(vm, image, "d0")
    assert held_lock_bytes(image) == qemu_rw
    N.delete_node(vm.qmp, "d0")
    assert held_lock_bytes(image) == []
    with qcow2engine.open_chain(image, writable=True):
        assert held_lock_bytes(image) == qemu_rw
    with qcow2engine.open_chain(image):
        assert held_lock_bytes(image) == [100, 201]
    with qcow2engine.open_chain(image, force_share=True):
        assert held_lock_bytes(image) == []
    assert held_lock_bytes(image) == []


def test_killed_qemu_releases_its_locks(image):
    """OFD locks die with the process: after a QEMU crash we can write again."""
    with launch() as vm:
        add_qcow2(vm, image, "d0")
        pid = vm.pid
        with pytest.raises(ImageInUseError):
            qcow2engine.open_chain(image, writable=True)
        vm.kill()
        assert not vm.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with qcow2engine.open_chain(image, writable=True) as chain:
        assert chain.read(0, 4096) == b"\xab" * 4096


def test_vm_torn_down_when_test_body_fails(image):
    class Boom(Exception):
        pass
    with pytest.raises(Boom):
        with launch() as vm:
            add_qcow2(vm, image, "d0")
            pid = vm.pid
            raise Boom
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert held_lock_bytes(image) == []


# ---------------------------------------------------------------- engine vs engine
def test_two_engine_writers_in_one_process_conflict(image):
    """OFD locks belong to the open file description, so two opens in one process conflict."""
    with qcow2engine.open_chain(image, writable=True) as first:
        with pytest.raises(ImageInUseError, match=WRITE):
            qcow2engine.open_chain(image, writable=True)
        with pytest.raises(ImageInUseError, match=SHARED_WRITE):
            qcow2engine.open_chain(image)
        rc, out, err = engine("io", "-c", "write 0 4k", image)
        assert_one_line_error(rc, out, err, 1, WRITE)
        rc, out, err = engine("info", image)
        assert_one_line_error(rc, out, err, 1, SHARED_WRITE)
        assert engine("info", "-U", image)[0] == 0
        first.write(0, b"\x01" * 4096)
    # readers share; a writer is refused while any reader holds the image
    with qcow2engine.open_chain(image) as r1, qcow2engine.open_chain(image) as r2:
        assert r1.read(0, 4096) == r2.read(0, 4096) == b"\x01" * 4096
        with pytest.raises(ImageInUseError, match=WRITE):
            qcow2engine.open_chain(image, writable=True)
    with qcow2engine.open_chain(image, writable=True):
        pass
    assert held_lock_bytes(image) == []


def test_force_share_never_writes(image, vm):
    """-U is for read-only use: a writer with it is refused, as qemu-io refuses it."""
    add_qcow2(vm, image, "d0")
    before = file_sha256(image)
    rc, out, err = engine("io", "-U", "-c", "write -P 0x66 0 4k", image)
    assert rc == 1 and "force-share" in err and err.count("\n") == 1
    with pytest.raises(qcow2engine.Qcow2Error):
        qcow2engine.open_chain(image, writable=True, force_share=True)
    assert file_sha256(image) == before


def test_create_raw_over_image_in_use_refused(image, vm):
    add_qcow2(vm, image, "d0")
    before = file_sha256(image)
    rc, out, err = engine("create", "-q", "-f", "raw", image, "16M")
    assert rc == 1 and "lock" in err
    assert file_sha256(image) == before


def test_create_does_not_truncate_a_data_file_in_use(tmp_path, vm):
    a = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "data_file=%s,data_file_raw=on" % (tmp_path / "d.raw"), a, "16M", cwd=tmp_path,
             check=True)
    qemu_io(a, "write -P 0x42 0 1M", fmt=None, cwd=tmp_path)
    data = tmp_path / "d.raw"
    before = file_sha256(data)
    add_qcow2(vm, str(a), "d0")
    rc, out, err = engine("create", "-q", "-f", "qcow2", "-o", "data_file=%s" % data,
                          tmp_path / "c.qcow2", "16M", cwd=tmp_path)
    assert rc == 1 and "lock" in err
    assert file_sha256(data) == before


def test_raw_image_in_use_is_locked(tmp_path):
    raw = tmp_path / "r.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "16M", check=True)
    before = file_sha256(raw)
    with launch("pc") as v:
        v.qmp.execute("blockdev-add", {"driver": "file", "node-name": "r0",
                                       "filename": str(raw), "read-only": False})
        v.qmp.execute("device_add", {"driver": "virtio-blk-pci", "drive": "r0", "id": "vd0"})
        rc, out, err = engine("io", "-f", "raw", "-c", "write 0 4k", raw)
        assert rc == 1 and "lock" in err
    assert file_sha256(raw) == before
