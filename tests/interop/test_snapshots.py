"""Internal snapshots (qcow2engine/snapshots.py, the `snapshot` CLI, `convert -l`)
against qemu-img 7.2.

* Differential: the same sequence of snapshot operations (create, apply by
  name and by ID, delete, with qemu-io writes in between) is run through
  ``qemu-img snapshot`` on copy A of a variant and through our CLI on copy B.
  After every step: ``qemu-img check`` of B is clean, the ``snapshot -l``
  listings of A and B are equal except for the DATE column, our listing of B
  is byte for byte qemu-img's listing of B, ``qemu-img compare A B`` finds the
  active disks identical and every snapshot's guest view (``qemu-img convert
  -l snapshot.id=ID``) is the same on A and B.  On the savevm variant the VM
  state of QEMU's snapshot (hashed straight from the file through the
  snapshot's L1 table) and its vm-state-size stay as they were, and a real
  ``qemu-system-x86_64 -loadvm`` of it still works at the end.
* Refusals: exit 1, one line on stderr, not one byte of the image changed.
* A seeded random sequence test against a Python model of every snapshot's
  and the active disk's contents.
* ``snapshot -l`` output byte for byte equal to qemu-img's on images QEMU made.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import struct
from pathlib import Path

import pytest

from tests.helpers.engine import engine
from tests.helpers.files import file_sha256, tree_hashes
from tests.helpers.images import VARIANTS_BY_NAME, read_header, variant_params
from tests.helpers.qemu import QEMU_SYSTEM, guest_bytes, par, qemu_img, qemu_img_info, qemu_io, run

KiB = 1024
MiB = 1024 * KiB


# --------------------------------------------------------------------------
# Templates (the session's variants, and two more built once per module)
# --------------------------------------------------------------------------

def _build_rc2_two_snaps(d: Path) -> Path:
    """refcount_bits=2 with s1 and s2: applying s1 needs a 4th reference (QEMU: EINVAL,
    and it leaks clusters on the way)."""
    img = VARIANTS_BY_NAME["refcount_bits_2"].build(d)
    run("qemu-img", "snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x77 0 64k")
    run("qemu-img", "snapshot", "-c", "s2", img)
    return img


def _build_bitmaps_snap(d: Path) -> Path:
    """Persistent bitmaps and a snapshot: qemu-img refuses to apply it ("Device has active
    dirty bitmaps"): reverting the disk would make the bitmaps lie."""
    img = VARIANTS_BY_NAME["bitmaps"].build(d)
    run("qemu-img", "snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x78 0 64k")
    return img


EXTRA_TEMPLATES = {"rc2_two_snaps": _build_rc2_two_snaps,
                   "bitmaps_snap": _build_bitmaps_snap}


@pytest.fixture(scope="module")
def templates(tmp_path_factory, variant_images):
    """name -> (template directory, image path relative to it): the session's image variants
    and the EXTRA_TEMPLATES, built once (do not modify)."""
    root = tmp_path_factory.mktemp("snapvariants")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            if name in EXTRA_TEMPLATES:
                d = root / name
                img = EXTRA_TEMPLATES[name](d)
            else:
                d = variant_images.directory(name)
                img = variant_images[name][1]
            cache[name] = (d, img.relative_to(d))
        return cache[name]
    return get


def _copy(templates, name: str, dst: Path) -> Path:
    d, rel = templates(name)
    shutil.copytree(d, dst)
    return dst / rel


# --------------------------------------------------------------------------
# Independent readers (struct only): snapshot table, VM state area
# --------------------------------------------------------------------------

L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def _snapshot_table(path: Path) -> list[dict]:
    h = read_header(path)
    out = []
    with open(path, "rb") as f:
        off = h["snapshots_offset"]
        for _ in range(h["nb_snapshots"]):
            f.seek(off)
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize,
             extra_size) = struct.unpack(">QIHHIIQII", f.read(40))
            extra = f.read(extra_size)
            id_str = f.read(id_len).decode()
            name = f.read(name_len).decode()
            out.append(dict(
                entry_offset=off, l1_offset=l1_off, l1_size=l1_size, id=id_str, name=name,
                date_sec=dsec, date_nsec=dnsec, vm_clock=clock, extra_size=extra_size,
                vm_state_size=(struct.unpack_from(">Q", extra, 0)[0] if extra_size >= 8
                               else vmsize),
                disk_size=(struct.unpack_from(">Q", extra, 8)[0] if extra_size >= 16
                           else h["size"])))
            off = (off + 40 + extra_size + id_len + name_len + 7) & ~7
    return out


def _vmstate_digest(path: Path, name: str) -> tuple[int, str]:
    """(size, sha256) of the VM state of snapshot `name`: guest bytes from the first L1
    entry boundary at or after the disk size, read through the snapshot's own L1 table."""
    h = read_header(path)
    cs = h["cluster_size"]
    esz = 16 if h["incompatible_features"] & (1 << 4) else 8
    l2n = cs // esz
    sn = next(s for s in _snapshot_table(path) if s["name"] == name)
    span = cs * l2n
    start = -(-sn["disk_size"] // span) * span
    end = start + sn["vm_state_size"]
    dig = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(sn["l1_offset"])
        l1 = struct.unpack(">%dQ" % sn["l1_size"], f.read(8 * sn["l1_size"]))
        pos = start
        while pos < end:
            n = min(cs - pos % cs, end - pos)
            l1i, l2i = divmod(pos // cs, l2n)
            l2off = (l1[l1i] if l1i < len(l1) else 0) & L2E_OFFSET_MASK
            data = bytes(n)
            if l2off:
                f.seek(l2off + esz * l2i)
                (e,) = struct.unpack(">Q", f.read(8))
                assert not e & (1 << 62), "compressed VM state cluster"
                host = e & L2E_OFFSET_MASK
                if host and not e & 1:
                    f.seek(host + pos % cs)
                    data = f.read(n)
                    assert len(data) == n
            dig.update(data)
            pos += n
    return sn["vm_state_size"], dig.hexdigest()


def _loadvm(img: Path, name: str):
    """Boot the savevm machine configuration with -loadvm NAME, print the status, quit."""
    argv = [QEMU_SYSTEM, "-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none",
            "-m", "64", "-S", "-drive", f"file={img.name},format=qcow2,if=virtio",
            "-monitor", "stdio", "-loadvm", name]
    return run(*argv, check=False, cwd=img.parent, input="info status\nquit\n", timeout=10)


def _loadvm_ok(p) -> bool:
    return (p.returncode == 0 and "VM status: paused" in p.stdout
            and "rror" not in p.stderr + p.stdout)


# --------------------------------------------------------------------------
# Differential against qemu-img snapshot
# --------------------------------------------------------------------------

DATE_RE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

DIFF_VARIANTS = [
    *[f"refcount_bits_{b}" for b in (2, 4, 8, 16, 32, 64)],
    "cluster_512", "cluster_4k", "cluster_64k", "cluster_2M", "compat_0.10",
    "compressed_zlib_qemuio", "compressed_zlib_convert", "compressed_zstd",
    "extended_l2", "extended_l2_backing", "backing_chain_relative", "backing_shorter",
    "internal_snapshots", "savevm", "bitmaps", "prealloc_metadata",
]

# guest writes (qemu-io on both copies); every variant is >= 8 MiB
W1 = ("write -P 0xc1 0 64k", "write -P 0xc2 1000000 100000", "write -z 3M 64k",
      "discard 1M 192k")
W2 = ("write -P 0xd1 32k 64k", "write -P 0xd2 5M 70000", "write -z 100000 4k",
      "write -P 0xd3 7M 1M")
W3 = ("write -P 0xe1 0 4k", "write -P 0xe2 2M 1M", "discard 5M 64k")
W4 = ("write -P 0xf1 4M 300k", "write -z 7M 64k")


def _sequence(pre: list[tuple[str, str]], keep: set[str]) -> list[tuple]:
    """Operations; ("apply", ("id", NAME)) applies the snapshot named NAME by its ID."""
    seq = [("create", "s1"), ("write", W1), ("create", "s2"), ("apply", "s1"),
           ("write", W2), ("delete", "s2"), ("create", "s3"), ("apply", ("id", "s3")),
           ("delete", "s1"), ("write", W3), ("create", "s1"), ("create", "s4")]
    if pre:                    # a snapshot made by QEMU, by ID
        seq += [("apply", ("id", pre[-1][1])), ("write", W4)]
    else:
        seq += [("apply", "s3"), ("write", W4)]
    seq += [("delete", "s3"), ("create", "s5")]
    seq += [("delete", name) for _, name in pre if name not in keep][:1]
    seq += [("apply", "s5"), ("delete", "s4")]
    return seq


def _listing_rows(text: str) -> list[tuple[str, str]]:
    """(ID, TAG) of each row of a snapshot -l listing."""
    lines = text.splitlines()
    return [tuple(ln.split()[:2]) for ln in lines[2:]]


def _mask_dates(text: str) -> str:
    return DATE_RE.sub("YYYY-MM-DD hh:mm:ss", text)


def _step_problems(a: Path, b: Path, scratch: Path, cache: dict, vm: dict | None,
                   bitmaps: bool = False) -> list[str]:
    probs: list[str] = []
    check_b, check_a, list_a, list_b, cmp = par([
        lambda: qemu_img("check", "--output=json", b, cwd=b.parent),
        lambda: qemu_img("check", a, cwd=a.parent),
        lambda: qemu_img("snapshot", "-l", a, cwd=a.parent),
        lambda: qemu_img("snapshot", "-l", b, cwd=b.parent),
        lambda: qemu_img("compare", a, b, cwd=b.parent)])
    data = json.loads(check_b.stdout) if check_b.stdout.strip() else {}
    if check_b.returncode != 0 or data.get("leaks") or data.get("corruptions"):
        probs.append(f"qemu-img check B: rc={check_b.returncode} {data} "
                     f"{check_b.stderr.strip()}")
    if check_a.returncode not in (0, 3):     # QEMU leaks on a failed apply (refcount overflow)
        probs.append(f"(oracle) qemu-img check A rc={check_a.returncode}")
    if list_a.returncode or list_b.returncode:
        probs.append(f"snapshot -l failed: {list_a.stderr} {list_b.stderr}")
    if _mask_dates(list_a.stdout) != _mask_dates(list_b.stdout):
        probs.append(f"listings differ:\nA (qemu-img):\n{list_a.stdout}B (ours):\n"
                     f"{list_b.stdout}")
    rc, out, err = engine("snapshot", "-l", b)
    if (rc, out) != (0, list_b.stdout):
        probs.append(f"our snapshot -l of B differs from qemu-img's: rc={rc} {err}\n"
                     f"ours:\n{out}qemu-img:\n{list_b.stdout}")
    if cmp.returncode != 0:
        probs.append(f"qemu-img compare A B rc={cmp.returncode}: "
                     f"{(cmp.stdout + cmp.stderr).strip()}")
    # A's snapshots never change after their creation: their guest views are converted once
    # (a deleted snapshot leaves `cache` in the step that deletes it, before its ID or name
    # can be reused); B's are converted after every step
    rows = _listing_rows(list_a.stdout)
    for key in set(cache) - set(rows):
        cache.pop(key).unlink()
    jobs = []
    for key in rows:
        i = key[0]
        if key not in cache:
            cache[key] = scratch / f"A-{i}-{len(cache)}-{os.urandom(4).hex()}.raw"
            jobs.append(lambda i=i, out=cache[key]: qemu_img(
                "convert", "-l", f"snapshot.id={i}", "-O", "raw", a, out, cwd=a.parent))
        jobs.append(lambda i=i: qemu_img("convert", "-l", f"snapshot.id={i}", "-O", "raw", b,
                                          scratch / f"B-{i}.raw", cwd=b.parent))
    for p in par(jobs):
        if p.returncode:
            probs.append(f"{' '.join(p.args)} failed: {p.stderr.strip()}")
    cmps = par([lambda key=key: qemu_img("compare", "-f", "raw", "-F", "raw",
                                         cache[key], scratch / f"B-{key[0]}.raw")
                for key in rows])
    for key, c in zip(rows, cmps):
        if c.returncode != 0:
            probs.append(f"snapshot ID {key[0]} ({key[1]}): guest views of A and B differ: "
                         f"{c.stdout.strip()}")
    for key in rows:
        (scratch / f"B-{key[0]}.raw").unlink(missing_ok=True)
    if bitmaps:
        ia, ib = qemu_img_info(a), qemu_img_info(b)
        fa, fb = (i["format-specific"]["data"].get("bitmaps") for i in (ia, ib))
        if fa != fb or not fb:
            probs.append(f"bitmaps differ: A {fa} B {fb}")
    if vm is not None:
        info = qemu_img_info(b)
        sizes = {s["name"]: s["vm-state-size"] for s in info.get("snapshots", [])}
        if sizes.get(vm["name"]) != vm["size"]:
            probs.append(f"vm-state-size of {vm['name']} is now {sizes.get(vm['name'])}, "
                         f"was {vm['size']}")
        if _vmstate_digest(b, vm["name"]) != (vm["size"], vm["digest"]):
            probs.append(f"VM state bytes of {vm['name']} changed")
    return probs


@pytest.mark.parametrize("name", variant_params(DIFF_VARIANTS))
def test_differential_vs_qemu_img(templates, tmp_path, name):
    a = _copy(templates, name, tmp_path / "A")
    b = _copy(templates, name, tmp_path / "B")
    scratch = tmp_path / "raw"
    scratch.mkdir()
    cache: dict = {}
    pre = [(s["id"], s["name"]) for s in _snapshot_table(a)]
    vm = None
    keep: set[str] = set()
    if VARIANTS_BY_NAME[name].has_vmstate:
        keep = {"snap1"}
        size, digest = _vmstate_digest(b, "snap1")
        assert size > 0
        vm = dict(name="snap1", size=size, digest=digest)
        # the oracle itself: the unmodified image loads (on a third copy: -loadvm reverts
        # the active disk to the snapshot)
        c = _copy(templates, name, tmp_path / "C")
        assert _loadvm_ok(_loadvm(c, "snap1"))
    assert not _step_problems(a, b, scratch, cache, vm)
    refused: list[str] = []
    for n, (op, arg) in enumerate(_sequence(pre, keep)):
        label = f"step {n} {op} {arg}"
        if op == "write":
            par([lambda: qemu_io(a, *arg, cwd=a.parent), lambda: qemu_io(b, *arg, cwd=b.parent)])
        else:
            if isinstance(arg, tuple):
                arg = next(s["id"] for s in _snapshot_table(a) if s["name"] == arg[1])
                label += f" (ID {arg})"
            flag = {"create": "-c", "apply": "-a", "delete": "-d"}[op]
            before = file_sha256(b)
            qa = qemu_img("snapshot", flag, arg, a, cwd=a.parent)
            rc, out, err = engine("snapshot", flag, arg, b, cwd=b.parent)
            assert qa.returncode == rc, (f"{name} {label}: qemu-img rc={qa.returncode} "
                                         f"{qa.stderr.strip()!r}, ours rc={rc} {err.strip()!r}")
            assert out == ""
            if rc:
                # both refused: a refcount overflow (refcount_bits=2) or, for apply, dirty
                # bitmaps.  QEMU may leave leaked clusters behind; we must change nothing.
                # (or a snapshot that an earlier refused create never made)
                why = r"overflow|bitmap" + (r"|not found|No such file" if refused else "")
                assert re.search(why, err, re.I), \
                    f"{name} {label}: both failed: {qa.stderr.strip()!r} / {err.strip()!r}"
                assert err.count("\n") == 1 and file_sha256(b) == before, \
                    f"{name} {label}: the refused operation changed the image"
                refused.append(label)
                if qemu_img("check", a, cwd=a.parent).returncode == 3:
                    # QEMU's failed apply leaves leaked (over-counted) clusters, which would
                    # make its later operations overflow where ours do not: repair them
                    r = qemu_img("check", "-r", "leaks", a, cwd=a.parent)
                    assert r.returncode == 0, r.stdout + r.stderr
        probs = _step_problems(a, b, scratch, cache, vm, bitmaps=VARIANTS_BY_NAME[name].has_bitmaps)
        assert not probs, f"{name} {label}:\n" + "\n".join(probs)
    assert not refused or name in ("refcount_bits_2", "bitmaps"), refused
    if vm is not None:
        pa, pb = par([lambda: _loadvm(a, "snap1"), lambda: _loadvm(b, "snap1")])
        assert _loadvm_ok(pa), f"(oracle) loadvm on A: {pa.stdout} {pa.stderr}"
        assert _loadvm_ok(pb), f"loadvm snap1 after our operations: {pb.stdout} {pb.stderr}"


@pytest.mark.live
def test_loadvm_oracle_detects_damage(templates, tmp_path):
    """The loadvm check has teeth: zeroing the VM state's first data cluster breaks it,
    and a snapshot that does not exist is refused."""
    img = _copy(templates, "savevm", tmp_path / "w")
    assert not _loadvm_ok(_loadvm(img, "nosuch"))
    h = read_header(img)
    cs = h["cluster_size"]
    sn = next(s for s in _snapshot_table(img) if s["name"] == "snap1")
    span = cs * (cs // 8)
    start = -(-sn["disk_size"] // span) * span
    with open(img, "r+b") as f:
        f.seek(sn["l1_offset"] + 8 * (start // span))
        (l1e,) = struct.unpack(">Q", f.read(8))
        f.seek(l1e & L2E_OFFSET_MASK)
        (e,) = struct.unpack(">Q", f.read(8))
        f.seek(e & L2E_OFFSET_MASK)
        f.write(bytes(cs))
    assert not _loadvm_ok(_loadvm(img, "snap1"))


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------

def _assert_refused(rc, out, err, what):
    assert rc == 1, f"{what}: rc={rc} {err!r}"
    assert out == ""
    assert err.startswith("qcow2engine: ") and err.endswith("\n") and err.count("\n") == 1, \
        f"{what}: not a one-line error: {err!r}"


REFUSALS = [
    ("refcount_bits_1", ("-c", "new"), "overflow"),
    ("data_file", ("-c", "new"), "data file"),
    ("data_file_raw", ("-c", "new"), "data file"),
    ("internal_snapshots", ("-c", "snap1"), "already exists"),
    ("internal_snapshots", ("-c", "n" * 256), "255"),
    ("internal_snapshots", ("-c", "é" * 128), "255"),      # 256 bytes, 128 characters
    ("internal_snapshots", ("-a", "nosuch"), "No such file"),
    ("internal_snapshots", ("-a", "2"), "No such file"),    # deleted ID
    ("internal_snapshots", ("-d", "nosuch"), "not found"),
    ("internal_snapshots", ("-d", "3"), "not found"),       # -d is by name only, like qemu-img
    ("rc2_two_snaps", ("-a", "s1"), "overflow"),
    ("bitmaps_snap", ("-a", "s1"), "bitmap"),
    ("cluster_4k", ("-a", "1"), "No such file"),
    ("cluster_4k", ("-d", "s1"), "not found"),
]


@pytest.mark.parametrize("name,args,needle", REFUSALS,
                         ids=[f"{n}{a[0]}{a[1][:8]}" for n, a, _ in REFUSALS])
def test_refusal_leaves_image_unchanged(templates, tmp_path, name, args, needle):
    img = _copy(templates, name, tmp_path / "w")
    before = tree_hashes(img.parent)
    rc, out, err = engine("snapshot", *args, img.name, cwd=img.parent)
    _assert_refused(rc, out, err, f"{name} snapshot {args[0]}")
    assert needle.lower() in err.lower(), err
    assert tree_hashes(img.parent) == before, "a refused operation changed the image"


def test_refusals_through_the_api(templates, tmp_path):
    """The same refusals raise SnapshotError (or RefcountOverflow) from the Python API and
    leave the files untouched."""
    from qcow2engine.errors import Qcow2Error
    from qcow2engine.image.qcow2 import Qcow2Image
    from qcow2engine.image import snapshots as S
    cases = [("refcount_bits_1", lambda i: S.create_snapshot(i, "x")),
             ("internal_snapshots", lambda i: S.create_snapshot(i, "snap3")),
             ("internal_snapshots", lambda i: S.create_snapshot(i, "x" * 256)),
             ("internal_snapshots", lambda i: S.apply_snapshot(i, "snap2")),
             ("internal_snapshots", lambda i: S.delete_snapshot(i, "9", by_id=True)),
             ("internal_snapshots", lambda i: S.rename_snapshot(i, "snap1", "snap3")),
             ("internal_snapshots", lambda i: S.rename_snapshot(i, "nosuch", "x"))]
    for k, (name, fn) in enumerate(cases):
        img = _copy(templates, name, tmp_path / f"w{k}")
        before = tree_hashes(img.parent)
        q = Qcow2Image(str(img), writable=True)
        try:
            with pytest.raises(Qcow2Error):
                fn(q)
        finally:
            q.close()
        assert tree_hashes(img.parent) == before, f"case {k} ({name}) changed the image"
    # data_file: refused on open for writing or on the operation, never a change
    img = _copy(templates, "data_file", tmp_path / "wd")
    before = tree_hashes(img.parent)
    old = os.getcwd()
    os.chdir(img.parent)
    try:
        with pytest.raises(Qcow2Error):
            q = Qcow2Image(img.name, writable=True)
            try:
                S.create_snapshot(q, "x")
            finally:
                q.close()
    finally:
        os.chdir(old)
    assert tree_hashes(img.parent) == before


def test_longest_name_and_rename(templates, tmp_path):
    """A 255-byte name is accepted and read back by QEMU; rename is seen by qemu-img."""
    from qcow2engine.image.qcow2 import Qcow2Image
    from qcow2engine.image import snapshots as S
    img = _copy(templates, "cluster_4k", tmp_path / "w")
    long = "é" * 127 + "x"                 # 255 bytes
    rc, out, err = engine("snapshot", "-c", long, img)
    assert rc == 0, err
    q = Qcow2Image(str(img), writable=True)
    try:
        S.rename_snapshot(q, long, "short")
        S.create_snapshot(q, long)
    finally:
        q.close()
    assert qemu_img("check", img).returncode == 0
    names = [s["name"] for s in qemu_img_info(img)["snapshots"]]
    assert names == ["short", long]
    rc, out, err = engine("snapshot", "-l", img)
    assert out == qemu_img("snapshot", "-l", img).stdout


# --------------------------------------------------------------------------
# Random sequences against a model
# --------------------------------------------------------------------------

N_SEQ = int(os.environ.get("QCOW2ENGINE_SNAP_SEQS", "30"))
N_OPS = 15


class Model:
    def __init__(self, size: int):
        self.active = bytearray(size)
        self.snaps: dict[str, tuple[str, bytearray]] = {}    # id -> (name, content)

    def next_id(self) -> str:
        return str(max([int(i) for i in self.snaps] + [0]) + 1)


def _rand_range(rng: random.Random, size: int, cs: int) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.3:                                  # cluster aligned
        c = size // cs
        a = rng.randrange(c)
        return a * cs, min(rng.randint(1, 40), c - a) * cs
    off = rng.randrange(size - 1)
    return off, rng.randint(1, min(size - off, rng.choice([600, 9000, 200_000])))


def _engine_view(path: Path, snap_id: str | None, size: int) -> bytes:
    from qcow2engine import open_chain
    with open_chain(str(path), snapshot=None if snap_id is None else f"snapshot.id={snap_id}") as c:
        data = c.read(0, c.size)
    if snap_id is None:
        assert len(data) == size, f"size {len(data)} != {size}"
        return data
    # like qemu-img convert -l, a snapshot is shown at the image's current size
    assert len(data) == size, f"size {len(data)} != {size}"
    return data


def _qemu_view(path: Path, snap_id: str | None) -> bytes:
    return guest_bytes(path, snapshot=None if snap_id is None else f"snapshot.id={snap_id}")


def _first_diff(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"length {len(a)} != {len(b)}"
    i = next(k for k in range(len(a)) if a[k] != b[k])
    return f"first difference at {i:#x}: {a[i]:#04x} != {b[i]:#04x}"


def _run_sequence(seed: int, root: Path) -> None:
    from qcow2engine.image import snapshots as S
    from qcow2engine import open_chain
    from qcow2engine.image.qcow2 import Qcow2Image
    from qcow2engine.api import resize as resize_image
    rng = random.Random(seed)
    d = root / f"seq{seed}"
    d.mkdir()
    img = d / "img.qcow2"
    size = rng.choice([1, 2, 3, 4]) * MiB + rng.choice([0, 0, 512, 3 * 4096 + 1536])
    cs = 4096
    opts = "refcount_bits=%d" % rng.choice([4, 16, 64])
    if rng.random() < 0.2:          # extended L2 needs clusters of at least 16k
        cs = 16384
        opts += ",extended_l2=on"
    opts += f",cluster_size={cs}"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img, size)
    m = Model(size)
    names = 0
    log: list[str] = [f"seed {seed}: {opts} size {size}"]

    def api(fn):
        q = Qcow2Image(str(img), writable=True)
        try:
            return fn(q)
        finally:
            q.close()

    for step in range(N_OPS):
        cli = rng.random() < 0.4
        choices = ["write"] * 3 + ["zero", "discard", "create", "create", "grow"]
        if m.snaps:
            choices += ["apply", "apply", "delete", "delete"]
        op = rng.choice(choices) if step else "write"
        size = len(m.active)
        if op in ("write", "zero", "discard"):
            off, n = _rand_range(rng, size, cs)
            if op == "discard":              # whole clusters: then they read as zeros
                off = off // cs * cs
                n = min(-(-n // cs) * cs, size - off)
            data = bytes(n)
            unmap = rng.random() < 0.5
            if op == "write":
                pat = rng.randrange(1, 256)
                data = bytes([pat]) * n if cli else rng.randbytes(n)
                cmd = f"write -P {pat:#x} {off} {n}"
            elif op == "zero":
                cmd = f"write -z{' -u' if unmap else ''} {off} {n}"
            else:
                cmd = f"discard {off} {n}"
            if cli:
                log.append(f"cli io {cmd}")
                rc, out, err = engine("io", "-c", cmd, img)
                assert rc == 0 and "failed" not in out, "\n".join(log) + f"\n{out}{err}"
            else:
                log.append(f"api {op} {off} {n}" + (f" unmap={unmap}" if op == "zero" else ""))
                with open_chain(str(img), writable=True) as c:
                    if op == "write":
                        c.write(off, data)
                    elif op == "zero":
                        c.write_zeroes(off, n, unmap=unmap)
                    else:
                        c.discard(off, n)
            m.active[off:off + n] = data
        elif op == "create":
            names += 1
            name = f"snap{names}-{seed}"
            log.append(f"{'cli' if cli else 'api'} create {name}")
            if cli:
                rc, out, err = engine("snapshot", "-c", name, img)
                assert rc == 0, "\n".join(log) + err
            else:
                e = api(lambda q: S.create_snapshot(q, name))
                assert e.id_str == m.next_id()
            m.snaps[m.next_id()] = (name, bytearray(m.active))
        elif op == "grow":
            new = size + rng.choice([512, 4096, 70_144, MiB])
            log.append(f"api resize {new}")
            resize_image(str(img), new)
            m.active += bytes(new - size)
        else:
            sid = rng.choice(sorted(m.snaps))
            name = m.snaps[sid][0]
            key = sid if rng.random() < 0.5 else name
            log.append(f"{'cli' if cli else 'api'} {op} {key} (ID {sid})")
            if op == "apply":
                if cli:
                    rc, out, err = engine("snapshot", "-a", key, img)
                    assert rc == 0, "\n".join(log) + err
                else:
                    api(lambda q: S.apply_snapshot(q, key))
                m.active = bytearray(m.snaps[sid][1])
            else:
                if cli:                      # the CLI deletes by name
                    rc, out, err = engine("snapshot", "-d", name, img)
                    assert rc == 0, "\n".join(log) + err
                else:
                    api(lambda q: S.delete_snapshot(q, key, by_id=key == sid))
                del m.snaps[sid]
        # --- verification after every operation
        where = "\n".join(log)
        p = qemu_img("check", "--output=json", img)
        data = json.loads(p.stdout) if p.stdout.strip() else {}
        assert p.returncode == 0 and not data.get("leaks"), \
            f"{where}\nqemu-img check rc={p.returncode} {data} {p.stderr}"
        listed = [(s.id_str, s.name) for s in api_ro(img)]
        assert listed == [(i, n) for i, (n, _) in m.snaps.items()], f"{where}\n{listed}"
        got = _engine_view(img, None, len(m.active))
        assert got == m.active, f"{where}\nactive disk: {_first_diff(got, m.active)}"
        for sid, (_, content) in m.snaps.items():
            # a snapshot is read at the image's current size (as qemu-img convert -l does)
            cur = len(m.active)
            want = bytes(content[:cur]).ljust(cur, b"\0")
            got = _engine_view(img, sid, cur)
            assert got == want, f"{where}\nsnapshot {sid}: {_first_diff(got, want)}"
        if step == N_OPS - 1 or rng.random() < 0.15:     # QEMU's view, on a sample
            assert _qemu_view(img, None) == m.active, f"{where}\nqemu active"
            if m.snaps:
                sid = rng.choice(sorted(m.snaps))
                # qemu-img 7.2 reads a snapshot at the image's *current* virtual size
                # (qcow2_snapshot_load_tmp keeps bs->total_sectors): zero padded here
                cur = len(m.active)
                want = bytes(m.snaps[sid][1][:cur]).ljust(cur, b"\0")
                assert _qemu_view(img, sid) == want, \
                    f"{where}\nqemu-img convert -l snapshot.id={sid}"
                # our convert -l, with each way of naming the snapshot: like qemu-img, at
                # the image's current size
                name = m.snaps[sid][0]
                spec = rng.choice([f"snapshot.id={sid}", f"snapshot.name={name}", name])
                rc, out, err = engine("convert", "-l", spec, "-O", "raw", img, d / "our.raw")
                assert rc == 0, f"{where}\nconvert -l {spec}: {err}"
                assert (d / "our.raw").read_bytes() == want, \
                    f"{where}\nour convert -l {spec}"
                (d / "our.raw").unlink()
    if m.snaps:
        info = qemu_img_info(img)
        assert [(s["id"], s["name"]) for s in info["snapshots"]] == \
            [(i, n) for i, (n, _) in m.snaps.items()]
    shutil.rmtree(d)


def api_ro(img: Path):
    from qcow2engine.image.qcow2 import Qcow2Image
    q = Qcow2Image(str(img))
    try:
        return list(q.snapshots)
    finally:
        q.close()


def test_random_sequences_against_model(tmp_path):
    for seed in range(N_SEQ):
        _run_sequence(seed, tmp_path)


# --------------------------------------------------------------------------
# snapshot -l byte for byte
# --------------------------------------------------------------------------

def _listing_pair(img: Path, *extra) -> tuple[str, str]:
    p = qemu_img("snapshot", "-l", *extra, img, cwd=img.parent)
    assert p.returncode == 0, p.stderr
    rc, out, err = engine("snapshot", "-l", *extra, img, cwd=img.parent)
    assert rc == 0, err
    return out, p.stdout


@pytest.mark.parametrize("name", variant_params(["internal_snapshots", "savevm", "cluster_4k"]))
def test_listing_matches_qemu_img(templates, tmp_path, name):
    img = _copy(templates, name, tmp_path / "w")
    ours, theirs = _listing_pair(img)
    assert ours == theirs
    ours, theirs = _listing_pair(img, "-U")
    assert ours == theirs
    if name == "savevm":
        assert "763 KiB" in theirs or "KiB" in theirs.splitlines()[2]
        assert theirs.splitlines()[2].endswith(" " * 11)     # no ICOUNT
    if name == "cluster_4k":
        assert theirs == ""


def _many_snapshots(tmp_path: Path) -> Path:
    img = tmp_path / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, 4 * MiB)
    names = ["a", "exactly-16-chars", "seventeen-chars-x", "ünïcödé", "日本語のスナップ",
             "with space", "x" * 100, "é" * 127 + "x"] + [f"n{k}" for k in range(6)]
    for k, n in enumerate(names):
        qemu_io(img, f"write -P {k + 1} {k * 64}k 4k")
        run("qemu-img", "snapshot", "-c", n, img)
    run("qemu-img", "snapshot", "-d", "with space", img)
    return img


def test_listing_many_and_odd_names(tmp_path):
    """Many snapshots made by qemu-img (two-digit IDs), long and non-ASCII names (padding
    counts bytes), a deleted ID in the middle."""
    img = _many_snapshots(tmp_path)
    ours, theirs = _listing_pair(img)
    assert ours == theirs, f"ours:\n{ours}\nqemu-img:\n{theirs}"


def _poke(img: Path, pokes) -> None:
    """Rewrite VM state size (both fields), VM clock and icount of entries in place."""
    table = _snapshot_table(img)
    with open(img, "r+b") as f:
        for idx, vmsize, clock, icount in pokes:
            e = table[idx]
            assert e["extra_size"] >= 24
            f.seek(e["entry_offset"] + 24)
            f.write(struct.pack(">QI", clock, min(vmsize, 2**32 - 1)))
            f.seek(e["entry_offset"] + 40)
            f.write(struct.pack(">QQQ", vmsize, e["disk_size"],
                                2**64 - 1 if icount is None else icount))


def test_listing_large_field_values(tmp_path):
    """VM SIZE in MiB/GiB/TiB, VM CLOCK of many hours, large icounts."""
    img = _many_snapshots(tmp_path)
    _poke(img, [(0, 1536 * KiB, 3_600_000_000_000 * 27 + 123_456_789, 12345),
                (1, 5 * 2**30 + 7, 359_999_999_999_999, 0),
                (2, 3 * 2**40, 2**63 + 5, 2**40),
                (3, 1023 * MiB + 1, 59_999_000_000, None),
                (4, 1000, 2**64 - 1, 2**62)])
    ours, theirs = _listing_pair(img)
    assert ours == theirs, f"ours:\n{ours}\nqemu-img:\n{theirs}"


def test_listing_icount_above_int64_max(tmp_path):
    """QEMU keeps icount as int64_t and prints it signed: 2**63 lists as
    -9223372036854775808 (only 2**64-1, "no icount", is blank)."""
    img = _many_snapshots(tmp_path)
    _poke(img, [(2, 999, 1_000_000, 2**63), (5, 0, 0, 2**64 - 2)])
    ours, theirs = _listing_pair(img)
    assert ours == theirs, f"ours:\n{ours}\nqemu-img:\n{theirs}"
