"""Backing-chain operations (rebase, commit, stream, convert, measure) against qemu-img 7.2.

Chains of depth 2..10 are built once per session with qemu-img / qemu-io: qcow2 and raw
bases, relative backing names across sub-folders (``base/base.raw <- l1/l1.qcow2 <-
top.qcow2``, stored as ``../base/base.raw``), overlays larger than their backing file,
extended_l2 layers, mixed cluster sizes (512 bytes .. 2 MiB), compressed bases (zlib and
zstd), zero writes and discards in the middle layers, an internal snapshot, and seeded
random data (patterns and random bytes).

Differential: for each operation the chain is copied twice; ``qemu-img OP ARGS`` runs on
copy A and ``qcow2engine OP ARGS`` on copy B, with the same cwd-relative arguments.
Afterwards both trees hold the same files, and for every image:

* format, virtual size, backing-filename and backing-filename-format
  (``qemu-img info --output=json``) are equal on A and B;
* the guest views are equal (``qemu-img compare``);
* every qcow2 of B passes ``qemu-img check`` (rc 0: no corruption, no leak).

``convert -B`` (target on a backing file) additionally must not allocate any target
cluster the source's top layer leaves entirely unallocated; ``measure`` must print
qemu-img's JSON exactly.  ``stream`` has no qemu-img equivalent and is checked against its
meaning: guest view unchanged, backing pointer = the base's relative name (or none),
check clean.  A refused ``rebase`` (no -F) leaves the file byte for byte unchanged.

Notes: an image whose file and chain are byte for byte the template's in both copies is
not re-examined; ``{D}`` in an argument is the copy's absolute directory (absolute backing
names are compared with it masked); ``commit -b`` names the base as qemu-img expects it
(as stored in the image above it, or absolute); ``convert -c`` must also compress the same
number of clusters; the engine's fdatasync is reduced to an fd check (speed only).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.helpers.chains import KiB, MiB, UNRELATED, UNRELATED_BIG, ChainSpec, Layer, build_chain
from tests.helpers.engine import engine
from tests.helpers.files import tree_hashes
from tests.helpers.qemu import par, qemu_img, qemu_img_check, qemu_io

pytestmark = pytest.mark.usefixtures("no_disk_flush")


# ==========================================================================
# Chain specifications
# ==========================================================================

def _deep_layers() -> list[Layer]:
    """Depth 10: sub-folders in both directions, growing sizes, zero writes and discards
    in the middle layers."""
    paths = ["b0/L0.qcow2", "b0/L1.qcow2", "m/L2.qcow2", "m/sub/L3.qcow2", "m/L4.qcow2",
             "L5.qcow2", "m/sub/deeper/L6.qcow2", "b0/L7.qcow2", "L8.qcow2", "top.qcow2"]
    sizes = [2, 2, 3, 3, 3, 4, 4, 4, 4, 4]
    out = []
    for i, (p, s) in enumerate(zip(paths, sizes)):
        mid = 0 < i < 9
        out.append(Layer(p, size=s * MiB, nops=4, kinds="PRZUD" if mid else "PR",
                         opts="cluster_size=16k" if i % 3 == 1 else "", maxlen=256 * KiB))
    return out


CHAINS = [
    ChainSpec("d2_qcow2", [
        Layer("base.qcow2", nops=6),
        Layer("top.qcow2", kinds="PRZ", nops=6),
    ]),
    ChainSpec("d3_raw_subdirs_growing", [
        Layer("base/base.raw", fmt="raw", size=4 * MiB, kinds="PRZ", nops=5),
        Layer("l1/l1.qcow2", size=6 * MiB, opts="cluster_size=4k", kinds="PRZUD", nops=8,
              cmds=["write -P 0x21 3968k 256k", "write -z 1M 128k", "discard 2M 64k"]),
        Layer("top.qcow2", size=8 * MiB, kinds="PR", nops=5,
              cmds=["write -P 0x31 7M 512k"]),
    ], seed=1),
    ChainSpec("d4_extended_l2", [
        Layer("base.qcow2", opts="extended_l2=on", gran=2 * KiB, kinds="PRZ", nops=8),
        Layer("l1/l1.qcow2", opts="extended_l2=on,cluster_size=32k", gran=KiB,
              kinds="PRZUD", nops=8, maxlen=64 * KiB),
        Layer("l2/l2.qcow2", opts="cluster_size=4k", gran=512, kinds="PZUD", nops=6),
        Layer("top.qcow2", size=5 * MiB, opts="extended_l2=on,cluster_size=128k",
              gran=4 * KiB, kinds="PRZ", nops=6),
    ], seed=2),
    ChainSpec("d3_compressed_zlib", [
        Layer("base.qcow2", kinds="C", nops=10,
              cmds=["write -c -P 0x51 0 1M", "write -c -P 0x52 1M 1M"]),
        Layer("l1.qcow2", kinds="PZUD", nops=6),
        Layer("top.qcow2", kinds="PR", nops=4),
    ], seed=3),
    ChainSpec("d3_compressed_zstd_sub", [
        Layer("img/base.qcow2", opts="compression_type=zstd,cluster_size=16k", kinds="CC",
              nops=16, cmds=["write -c -P 0x61 0 512k"]),
        Layer("img/over/l1.qcow2", size=5 * MiB, kinds="ZUDP", nops=6),
        Layer("top.qcow2", size=5 * MiB, kinds="PR", nops=4),
    ], seed=4),
    ChainSpec("d5_mixed_clusters", [
        Layer("base.qcow2", size=3 * MiB, opts="cluster_size=2M", kinds="PR", nops=4),
        Layer("l1.qcow2", size=3 * MiB, opts="cluster_size=512", gran=512, kinds="PZD",
              nops=6, maxlen=64 * KiB),
        Layer("l2.qcow2", opts="cluster_size=1M", kinds="PZUD", nops=5),
        Layer("l3.qcow2", opts="cluster_size=4k,refcount_bits=1", kinds="PRZD", nops=5),
        Layer("top.qcow2", opts="cluster_size=2M", kinds="PR", nops=4, gran=KiB),
    ], seed=5),
    ChainSpec("d10_deep", _deep_layers(), seed=6),
    ChainSpec("d3_snapshot", [
        Layer("base.qcow2", nops=4),
        Layer("l1.qcow2", kinds="PZD", nops=4),
        Layer("top.qcow2", kinds="PRZ", nops=5, snapshot="snap1"),
    ], seed=7),
]
CHAINS_BY_NAME = {c.name: c for c in CHAINS}


@pytest.fixture(scope="session")
def chain_templates(tmp_path_factory):
    """name -> directory of the chain, built once (do not modify)."""
    root = tmp_path_factory.mktemp("chains")
    rnd = root / "random.bin"
    rnd.write_bytes(random.Random(1234).randbytes(256 * KiB))
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_chain(CHAINS_BY_NAME[name], root / name, rnd)
        return built[name]
    return get


# ==========================================================================
# Comparison helpers
# ==========================================================================

def _fmt(p: Path) -> str:
    return "raw" if p.suffix == ".raw" else "qcow2"


def _images(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")
                  if p.is_file() and p.suffix in (".qcow2", ".raw"))


def _info(p: Path) -> dict:
    r = qemu_img("info", "-U", "--output=json", "-f", _fmt(p), p)
    assert r.returncode == 0, f"qemu-img info {p}: {r.stderr}"
    j = json.loads(r.stdout)
    return {k: j.get(k) for k in ("format", "virtual-size", "backing-filename",
                                  "backing-filename-format")}


def _check(p: Path) -> tuple[int, dict, str]:
    return qemu_img_check(p, fmt="qcow2")


def _compare(a: Path, b: Path) -> tuple[int, str]:
    r = qemu_img("compare", "-U", "-f", _fmt(a), "-F", _fmt(b), a, b)
    return r.returncode, (r.stdout + r.stderr).strip()


def image_problems(a: Path, b: Path, rel: str, same_backing: bool = True) -> list[str]:
    """Differences between image rel of tree a (qemu-img) and tree b (engine)."""
    pa, pb = a / rel, b / rel
    ia, ib = _info(pa), _info(pb)
    for i, root in ((ia, a), (ib, b)):        # an absolute name points into its own copy
        if i["backing-filename"]:
            i["backing-filename"] = i["backing-filename"].replace(str(root), "{D}")
    if not same_backing:
        for k in ("backing-filename", "backing-filename-format"):
            ia.pop(k)
            ib.pop(k)
    probs = []
    if ia != ib:
        probs.append(f"{rel}: info differs: qemu-img {ia} engine {ib}")
    rc, msg = _compare(pa, pb)
    if rc != 0:
        probs.append(f"{rel}: guest views differ (compare rc={rc}: {msg})")
    if _fmt(pb) == "qcow2":
        rc, data, err = _check(pb)
        if rc != 0:
            probs.append(f"{rel}: qemu-img check of the engine's image rc={rc} "
                         f"corruptions={data.get('corruptions')} leaks={data.get('leaks')} "
                         f"{err[:300]}")
    return probs


_TEMPLATE_HASHES: dict[Path, dict[str, str]] = {}
_TEMPLATE_OF: dict[Path, Path] = {}          # copy -> its template


def _below(rel: str) -> list[str]:
    """rel and the images under it in its chain (from the chain specs: a layer's chain is
    the layers below it; other images have no backing file)."""
    for c in CHAINS:
        paths = [L.path for L in c.layers]
        if rel in paths:
            return paths[:paths.index(rel) + 1]
    return [rel]


def tree_problems(a: Path, b: Path, rebased: str | None = None) -> list[str]:
    """Problems over every image of the trees (rebased: an image whose backing pointer is
    expected to differ, checked by the caller).  An image whose file and whose chain's
    files are byte for byte the template's in both trees is the same image: skipped."""
    ia, ib = _images(a), _images(b)
    if ia != ib:
        return [f"different files: qemu-img {ia} engine {ib}"]
    tmpl = _TEMPLATE_HASHES.get(_TEMPLATE_OF.get(b), {})
    ha, hb = tree_hashes(a), tree_hashes(b)
    untouched = {r for r in ia if tmpl.get(r) is not None and ha[r] == hb[r] == tmpl[r]}
    todo = [r for r in ia if not all(x in untouched for x in _below(r))]
    return [p for ps in par([lambda r=r: image_problems(a, b, r, r != rebased) for r in todo])
            for p in ps]


def _copy(tmpl: Path, dst: Path) -> None:
    # cp keeps the template's holes (a hole in a qcow2 data cluster reads as zero status)
    r = subprocess.run(["cp", "-r", "--sparse=auto", str(tmpl), str(dst)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    if tmpl not in _TEMPLATE_HASHES:
        _TEMPLATE_HASHES[tmpl] = tree_hashes(tmpl)
    _TEMPLATE_OF[dst] = tmpl


def _copies(tmpl: Path, tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "A", tmp_path / "B"
    _copy(tmpl, a)
    _copy(tmpl, b)
    return a, b


def _subst(argv: list[str], d: Path) -> list[str]:
    """'{D}' in an argument stands for the (absolute) directory of the copy."""
    return [x.replace("{D}", str(d)) for x in argv]


def run_both(tmpl: Path, tmp_path: Path, argv: list[str]) -> tuple[Path, Path, tuple, tuple]:
    a, b = _copies(tmpl, tmp_path)
    ra = qemu_img(*_subst(argv, a), cwd=a)
    rb = engine(*_subst(argv, b), cwd=b)
    return a, b, (ra.returncode, ra.stdout, ra.stderr), rb


# ==========================================================================
# Operations
# ==========================================================================

def _top(c: ChainSpec) -> str:
    return c.layers[-1].path


def _ops(c: ChainSpec) -> dict[str, list[str] | None]:
    """op name -> argv (None: not applicable to this chain)."""
    n = c.depth
    L = c.layers
    top = n - 1
    ops: dict[str, list[str] | None] = {
        "commit": ["commit", _top(c)],
        "commit_p": ["commit", "-p", _top(c)],
        "commit_d": ["commit", "-d", _top(c)],
        # -b BASE: qemu-img looks BASE up relative to the directory of the image that
        # references it (the name stored there works), or as an absolute path
        "commit_b_base": ["commit", "-b", c.backing_name(1), _top(c)] if n >= 3 else None,
        "commit_b_base_abs": ["commit", "-p", "-b", "{D}/" + L[0].path, _top(c)]
        if n >= 3 else None,
        "commit_b_middle": ["commit", "-b", c.backing_name(n // 2), _top(c)] if n >= 4 else None,
        "commit_b_parent": ["commit", "-b", c.backing_name(n - 1), _top(c)],
        "commit_mid": ["commit", L[-2].path] if n >= 3 else None,
        "rebase_grandparent": (["rebase", "-b", c.rel(n - 3, top), "-F", L[n - 3].fmt, _top(c)]
                               if n >= 3 else None),
        "rebase_base": (["rebase", "-p", "-b", c.rel(0, top), "-F", L[0].fmt, _top(c)]
                        if n >= 3 else None),
        "rebase_unrelated": ["rebase", "-b", os.path.relpath(UNRELATED, os.path.dirname(_top(c))
                                                             or "."),
                             "-F", "qcow2", _top(c)],
        "rebase_unrelated_big_raw": ["rebase", "-b", UNRELATED_BIG, "-F", "raw", _top(c)],
        "rebase_abs_base": ["rebase", "-b", "{D}/" + L[0].path, "-F", L[0].fmt, _top(c)],
        "rebase_flatten": ["rebase", "-b", "", _top(c)],
        "rebase_mid_flatten": ["rebase", "-b", "", L[-2].path] if n >= 3 else None,
        "rebase_mid_grandparent": (["rebase", "-b", c.rel(n - 4, n - 2), "-F", L[n - 4].fmt,
                                    L[-2].path] if n >= 4 else None),
        "rebase_u_grandparent": (["rebase", "-u", "-b", c.rel(n - 3, top), "-F", L[n - 3].fmt,
                                  _top(c)] if n >= 3 else None),
        "rebase_u_unrelated": ["rebase", "-u", "-b", UNRELATED, "-F", "qcow2", _top(c)]
        if os.path.dirname(_top(c)) == "" else None,
        "rebase_u_flatten": ["rebase", "-u", "-b", "", _top(c)],
        "convert": ["convert", "-O", "qcow2", _top(c), "out.qcow2"],
        "convert_raw": ["convert", "-O", "raw", _top(c), "out.raw"],
        "convert_S0": ["convert", "-S", "0", "-O", "qcow2", _top(c), "out.qcow2"],
        "convert_S64k": ["convert", "-S", "64k", "-O", "qcow2", _top(c), "out.qcow2"],
        "convert_base": ["convert", "-f", L[0].fmt, "-O", "qcow2", L[0].path, "out.qcow2"],
        "convert_mid_c": ["convert", "-c", "-O", "qcow2", L[-2].path, "out.qcow2"],
        "convert_c_compat010": ["convert", "-c", "-O", "qcow2", "-o", "compat=0.10",
                                _top(c), "out.qcow2"],
        "convert_c_zlib": ["convert", "-c", "-O", "qcow2", _top(c), "out.qcow2"],
        "convert_c_zstd": ["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
                           _top(c), "out.qcow2"],
        "convert_cs4k": ["convert", "-O", "qcow2", "-o", "cluster_size=4k", _top(c),
                         "out.qcow2"],
        "convert_cs2M": ["convert", "-p", "-O", "qcow2", "-o", "cluster_size=2M", _top(c),
                         "out.qcow2"],
        "convert_extl2": ["convert", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k",
                          _top(c), "out.qcow2"],
    }
    return ops


DIFF_CASES = [pytest.param(c.name, op, id=f"{c.name}-{op}")
              for c in CHAINS for op, argv in _ops(c).items() if argv is not None]


@pytest.mark.parametrize("chain,op", DIFF_CASES)
def test_differential(chain_templates, tmp_path, chain, op):
    c = CHAINS_BY_NAME[chain]
    argv = _ops(c)[op]
    a, b, ra, rb = run_both(chain_templates(chain), tmp_path, argv)
    assert ra[0] == 0, f"qemu-img {argv} failed: {ra[2]}"
    assert rb[0] == 0, f"engine {argv} failed (rc={rb[0]}): {rb[2]}"
    probs = tree_problems(a, b)
    if "-c" in argv and not probs:
        # the same clusters end up compressed (qemu-img stores a cluster uncompressed when
        # compression does not make it smaller)
        ca, cb = _check(a / argv[-1])[1], _check(b / argv[-1])[1]
        for k in ("compressed-clusters", "allocated-clusters"):
            if ca.get(k) != cb.get(k):
                probs.append(f"{k}: qemu-img {ca.get(k)} engine {cb.get(k)}")
    assert not probs, f"{chain} {' '.join(argv)}:\n" + "\n".join(probs)


def test_case_count():
    assert len(DIFF_CASES) >= 150
    depths = {c.depth for c in CHAINS}
    assert min(depths) == 2 and max(depths) == 10


# --------------------------------------------------------------------------
# convert -B BACKING -F FMT: only the source's top layer is copied
# --------------------------------------------------------------------------

def _map(p: Path, fmt: str = "qcow2") -> list[dict]:
    r = qemu_img("map", "--output=json", "-f", fmt, p)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _top_ranges(m: list[dict]) -> list[tuple[int, int]]:
    return [(e["start"], e["start"] + e["length"]) for e in m if e["depth"] == 0]


def _overlaps(ranges, s, e) -> bool:
    return any(a < e and s < b for a, b in ranges)


CONVERT_B_CASES = []
for _c in CHAINS:
    for _extra in ([], ["-o", "cluster_size=4k"], ["-c"]):
        CONVERT_B_CASES.append(pytest.param(_c.name, _extra,
                                            id=f"{_c.name}-{'_'.join(_extra) or 'default'}"))


@pytest.mark.parametrize("chain,extra", CONVERT_B_CASES)
def test_convert_with_backing(chain_templates, tmp_path, chain, extra):
    c = CHAINS_BY_NAME[chain]
    top = _top(c)
    # the target lives in the top's directory, so the top's backing name fits it too
    tdir = os.path.dirname(top)
    out = os.path.join(tdir, "out.qcow2")
    argv = ["convert", "-O", "qcow2", *extra, "-B", c.backing_name(c.depth - 1),
            "-F", c.layers[-2].fmt, top, out]
    a, b, ra, rb = run_both(chain_templates(chain), tmp_path, argv)
    assert ra[0] == 0, ra[2]
    assert rb[0] == 0, rb[2]
    probs = tree_problems(a, b)
    # the guest view through the backing file is the source's
    rc, msg = _compare(b / top, b / out)
    if rc:
        probs.append(f"target differs from the source: {msg}")
    # no target cluster allocated where the source's top has nothing
    src = _top_ranges(_map(b / top))
    cs = json.loads(qemu_img("info", "--output=json", b / out).stdout)["cluster-size"]
    for s, e in _top_ranges(_map(b / out)):
        for k in range(s // cs * cs, e, cs):
            if not _overlaps(src, max(k, s), min(k + cs, e)):
                probs.append(f"target allocates [{k:#x}, {k + cs:#x}) which the source's top "
                             f"leaves unallocated")
                break
    assert not probs, f"{chain} {' '.join(argv)}:\n" + "\n".join(probs)


@pytest.mark.parametrize("top_cmds", [["write -P 0x33 64k 4k"], ["write -z 64k 4k"],
                                      ["write -P 0x33 64k 4k", "write -z 200k 8k",
                                       "write -P 0x34 1M 192k"]],
                         ids=["data", "zero", "mixed"])
def test_convert_with_backing_fine_top(tmp_path, top_cmds):
    """The source's top has smaller clusters than the target: a target cluster is only
    partly covered by the top's allocation, the rest must still read from the backing."""
    d = tmp_path / "t"
    d.mkdir()
    assert qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d).returncode == 0
    qemu_io("base.qcow2", "write -P 0x11 0 4M", cwd=d)
    assert qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2",
                "-F", "qcow2", "top.qcow2", "4M", cwd=d).returncode == 0
    qemu_io("top.qcow2", *top_cmds, cwd=d)
    argv = ["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2",
            "out.qcow2"]
    a, b, ra, rb = run_both(d, tmp_path, argv)
    assert ra[0] == 0 and rb[0] == 0, (ra, rb)
    probs = tree_problems(a, b)
    rc, msg = _compare(b / "top.qcow2", b / "out.qcow2")
    if rc:
        probs.append(f"target differs from the source: {msg}")
    assert not probs, "\n".join(probs)


# --------------------------------------------------------------------------
# convert -l snapshot.name=X
# --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,extra", [("qcow2", []), ("qcow2", ["-c"]), ("raw", []),
                                       ("qcow2", ["-o", "cluster_size=4k"])])
@pytest.mark.parametrize("sel", ["snapshot.name=snap1", "snap1"])
def test_convert_snapshot(chain_templates, tmp_path, fmt, extra, sel):
    out = f"out.{fmt}"
    argv = ["convert", "-l", sel, "-O", fmt, *extra, "top.qcow2", out]
    a, b, ra, rb = run_both(chain_templates("d3_snapshot"), tmp_path, argv)
    assert ra[0] == 0, ra[2]
    assert rb[0] == 0, rb[2]
    probs = tree_problems(a, b)
    # and it really is the snapshot, not the active layer
    ref = tmp_path / "ref.raw"
    r = qemu_img("convert", "-l", "snapshot.name=snap1", "-O", "raw", a / "top.qcow2", ref)
    assert r.returncode == 0, r.stderr
    rc, msg = _compare(ref, b / out)
    assert rc == 0, msg
    rc, msg = _compare(b / "top.qcow2", b / out)
    assert rc == 1, "the snapshot should differ from the active layer"
    assert not probs, "\n".join(probs)


# --------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------

MEASURE_OPTS = [
    ["-O", "qcow2"],
    ["-O", "raw"],
    ["-O", "qcow2", "-o", "cluster_size=4k"],
    ["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=1"],
    ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k"],
    ["-O", "qcow2", "-o", "refcount_bits=64,cluster_size=512"],
    ["-O", "qcow2", "-o", "compat=0.10"],
]


@pytest.mark.parametrize("chain", [c.name for c in CHAINS])
def test_measure_images(chain_templates, chain):
    d = chain_templates(chain)
    c = CHAINS_BY_NAME[chain]
    jobs = []
    for L in c.layers + [Layer(UNRELATED)]:
        for o in MEASURE_OPTS:
            jobs.append(["measure", "--output=json", "-f", L.fmt, *o, L.path])
    if chain == "d3_snapshot":
        jobs.append(["measure", "--output=json", "-l", "snapshot.name=snap1", "-O", "qcow2",
                     "top.qcow2"])
    qres = par([lambda j=j: qemu_img(*j, cwd=d) for j in jobs])
    probs = []
    for j, q in zip(jobs, qres):
        assert q.returncode == 0, f"qemu-img {j}: {q.stderr}"
        rc, out, err = engine(*j, cwd=d)
        if rc != 0:
            probs.append(f"{' '.join(j)}: engine rc={rc} {err.strip()}")
        elif json.loads(out) != json.loads(q.stdout):
            probs.append(f"{' '.join(j)}: engine {out.strip()} qemu-img {q.stdout.strip()}")
    assert not probs, "\n".join(probs)


@pytest.mark.parametrize("size", ["0", "1", "512", "4M", "1000001", "1G", "100G", "3T"])
def test_measure_size(tmp_path, size):
    probs = []
    for o in MEASURE_OPTS + [["-O", "qcow2", "-o", "cluster_size=64k,extended_l2=on"],
                             ["-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on"]]:
        j = ["measure", "--output=json", *o, "--size", size]
        q = qemu_img(*j)
        rc, out, err = engine(*j)
        if q.returncode:
            # e.g. 3T with 512-byte clusters: "The image size is too large ..."
            if rc != 1 or len(err.strip().splitlines()) != 1 or "internal error" in err:
                probs.append(f"{' '.join(j)}: qemu-img fails ({q.stderr.strip()}), engine "
                             f"rc={rc} {out.strip()} {err.strip()}")
        elif rc != 0 or json.loads(out) != json.loads(q.stdout):
            probs.append(f"{' '.join(j)}: engine rc={rc} {out.strip()} {err.strip()} "
                         f"qemu-img {q.stdout.strip()}")
    assert not probs, "\n".join(probs)


# --------------------------------------------------------------------------
# stream (no qemu-img equivalent)
# --------------------------------------------------------------------------

def _stream_cases():
    out = []
    for c in CHAINS:
        n = c.depth
        out.append(pytest.param(c.name, n - 1, None, "", id=f"{c.name}-top-all"))
        if n >= 3:
            out.append(pytest.param(c.name, n - 1, 0, "cwd", id=f"{c.name}-top-to-base"))
            out.append(pytest.param(c.name, n - 1, 0, "stored",
                                    id=f"{c.name}-top-to-base-stored-name"))
            out.append(pytest.param(c.name, n - 2, 0, "cwd", id=f"{c.name}-mid-to-base"))
        out.append(pytest.param(c.name, n - 1, n - 2, "stored", id=f"{c.name}-top-to-parent"))
        if n >= 5:
            out.append(pytest.param(c.name, n - 2, n // 2 - 1, "cwd",
                                    id=f"{c.name}-mid-to-mid"))
    return out


@pytest.mark.parametrize("chain,which,base,form", _stream_cases())
def test_stream(chain_templates, tmp_path, chain, which, base, form):
    c = CHAINS_BY_NAME[chain]
    a, b = _copies(chain_templates(chain), tmp_path)
    img = c.layers[which].path
    argv = ["stream", img]
    if base is not None:
        # BASE relative to the current directory, or (like qemu-img commit -b) as the
        # image above it stores it
        name = c.layers[base].path if form == "cwd" else c.backing_name(base + 1)
        argv[1:1] = ["-b", name]
    before = tree_hashes(b)
    rc, out, err = engine(*argv, cwd=b)
    assert rc == 0, err
    after = tree_hashes(b)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed <= {img}, f"stream changed other files: {changed - {img}}"
    assert set(after) == set(before)
    probs = tree_problems(a, b, img)     # every image still reads as before
    info = _info(b / img)
    want = (None, None) if base is None else (c.rel(base, which), c.layers[base].fmt)
    got = (info["backing-filename"], info["backing-filename-format"])
    if got != want:
        probs.append(f"backing pointer {got}, expected {want}")
    assert not probs, f"{chain} {' '.join(argv)}:\n" + "\n".join(probs)


# --------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["rebase", "-b", "base.qcow2", "top.qcow2"],
    ["rebase", "-b", "other/unrelated.qcow2", "top.qcow2"],
    ["rebase", "-u", "-b", "base.qcow2", "top.qcow2"],
    ["rebase", "-b", "missing.qcow2", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-b", "top.qcow2", "-F", "qcow2", "top.qcow2"],
    ["commit", "base.qcow2"],
    ["commit", "-b", "other/unrelated.qcow2", "top.qcow2"],
    ["stream", "-b", "other/unrelated.qcow2", "top.qcow2"],
], ids=["rebase-no-F", "rebase-unrelated-no-F", "rebase-u-no-F", "rebase-missing",
        "rebase-onto-itself", "commit-no-backing", "commit-foreign-base", "stream-foreign-base"])
def test_refused(chain_templates, tmp_path, argv):
    b = tmp_path / "B"
    _copy(chain_templates("d2_qcow2"), b)
    before = tree_hashes(b)
    rc, out, err = engine(*argv, cwd=b)
    assert rc == 1, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcow2engine: "), err
    assert "internal error" not in err and "Traceback" not in err, err
    assert tree_hashes(b) == before, "a refused operation changed a file"
    if argv[:2] == ["rebase", "-b"] and "-F" not in argv:
        assert "-F" in err or "format" in err.lower(), err


def test_rebase_without_F_fails_python_api(chain_templates, tmp_path):
    from qcow2engine.chain import ops as chainops
    from qcow2engine.errors import Qcow2Error
    b = tmp_path / "B"
    _copy(chain_templates("d3_raw_subdirs_growing"), b)
    before = tree_hashes(b)
    with pytest.raises(Qcow2Error):
        chainops.rebase(str(b / "top.qcow2"), "base/base.raw")
    assert tree_hashes(b) == before
