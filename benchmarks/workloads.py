"""The workloads: how each input image is built and which commands are compared.

``ARTIFACTS`` are the input images (built and cached by ``harness.artifacts``),
``WORKLOADS`` the benchmarks of ``python -m benchmarks.run``: a reference command
(``qemu-img ...``, or ``qemu-io ...`` for the ``write-*`` ones), the engine runs the
same arguments, a target and a check that both outputs agree.  Add new ones here.

Workloads that modify an image (the qemu-io ``write-*`` ones, commit, rebase) have a
``prepare`` hook: before every run (warm-up and timed), untimed, it puts a fresh copy
of the starting image in place (``cp --sparse=always`` of a cached template) and the
harness syncs, so each run of either tool starts from the same bytes and only the
command itself is timed.  Their qemu-io command scripts (``-c`` arguments) are
generated per profile and, should the argument list get long, split into several
invocations run back to back inside one timed measurement, identically for both tools
(see ``harness.compare.IO_ARGV_BYTES``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .harness.artifacts import Artifact, qemu_io_for, run_checked, sparse_copy
from .harness.compare import IO_COMMANDS, Target, Workload
from .harness.runner import GiB, KiB, MiB, TiB, log
from .harness.verify import chain_equal, files_equal, images_equal, json_equal
from .tree_bench import TREE_ARTIFACT, TREE_WORKLOADS


# --------------------------------------------------------------------------
# Building input images (artifacts)
# --------------------------------------------------------------------------

def build_prealloc_metadata(d: Path, p: dict, qemu_img: str) -> None:
    """Empty image with all L2 tables and refcounts preallocated."""
    run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                 "preallocation=metadata", "img.qcow2", str(p["size"])], cwd=d)


def build_prealloc_512(d: Path, p: dict, qemu_img: str) -> None:
    """preallocation=metadata with 512-byte clusters (qemu-img needs a while: built once)."""
    run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                 "preallocation=metadata,cluster_size=512", "img.qcow2", str(p["size"])],
                cwd=d)


def build_scattered(d: Path, p: dict, qemu_img: str) -> None:
    """qcow2 with ``data`` bytes of random data in randomly chosen clusters.

    A sparse raw file is written with os.pwrite (holes elsewhere), then
    converted with ``qemu-img convert -O qcow2 -o cluster_size=...``.
    """
    import numpy as np

    bs = p["cluster_size"]
    nblocks = p["size"] // bs
    ndata = p["data"] // bs
    rng = np.random.default_rng(p["seed"])
    pos = np.sort(rng.choice(nblocks, size=ndata, replace=False))
    raw = d / "src.raw"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, p["size"])
        batch = 16384
        for b0 in range(0, ndata, batch):
            bpos = pos[b0:b0 + batch]
            n = len(bpos)
            # Random, hence incompressible and (practically) never zero.
            data = rng.integers(0, 256, n * bs, dtype=np.uint8)
            mv = memoryview(data).cast("B")
            # write runs of consecutive blocks with one pwrite each
            breaks = np.flatnonzero(np.diff(bpos) != 1) + 1
            starts = np.concatenate(([0], breaks))
            ends = np.concatenate((breaks, [n]))
            for i, j in zip(starts.tolist(), ends.tolist()):
                os.pwrite(fd, mv[i * bs:j * bs], int(bpos[i]) * bs)
    finally:
        os.close(fd)
    run_checked([qemu_img, "convert", "-f", "raw", "-O", "qcow2", "-o",
                 f"cluster_size={bs}", str(raw), "img.qcow2"], cwd=d)
    raw.unlink()


def _text_chunk(np, rng, vocab, table, nbytes: int):
    """``nbytes`` of space-separated pseudo words (8-byte padded tokens)."""
    idx = table[rng.integers(0, len(table), nbytes // 8)]
    return vocab[idx]


def build_compressed(d: Path, p: dict, qemu_img: str) -> None:
    """zlib-compressed qcow2 made from ~3:1 compressible pseudo text."""
    import numpy as np

    rng = np.random.default_rng(p["seed"])
    nvocab = 16384
    lens = rng.integers(2, 8, nvocab)
    words = np.full((nvocab, 8), ord(" "), np.uint8)
    letters = rng.integers(ord("a"), ord("z") + 1, (nvocab, 8), dtype=np.uint8)
    mask = np.arange(8)[None, :] < lens[:, None]
    words[mask] = letters[mask]
    vocab = words.view(np.uint64).ravel()
    # Zipf-like word frequencies via a lookup table (fast sampling).
    weights = 1.0 / np.arange(1, nvocab + 1)
    counts = np.maximum(1, np.round(weights / weights.sum() * (1 << 20)))
    table = np.repeat(np.arange(nvocab), counts.astype(np.int64))

    raw = d / "src.raw"
    chunk = 64 * MiB
    with open(raw, "wb") as f:
        left = p["size"]
        while left > 0:
            n = min(chunk, left)
            f.write(_text_chunk(np, rng, vocab, table, n).tobytes())
            left -= n
    run_checked([qemu_img, "convert", "-c", "-f", "raw", "-O", "qcow2",
                 str(raw), "img.qcow2"], cwd=d)
    raw.unlink()
    real = (d / "img.qcow2").stat().st_size
    log(f"    compressed {p['size'] / MiB:.0f} MiB -> {real / MiB:.0f} MiB "
        f"({p['size'] / real:.2f}:1)")


def build_small(d: Path, p: dict, qemu_img: str) -> None:
    """Small image with a little data, some zero clusters."""
    run_checked([qemu_img, "create", "-q", "-f", "qcow2", "img.qcow2",
                 str(p["size"])], cwd=d)
    run_checked([qemu_io_for(qemu_img), "-f", "qcow2",
                 "-c", "write -q -P 0x11 0 4M",
                 "-c", "write -q -P 0x22 256M 1M",
                 "-c", "write -q -z 512M 1M",
                 "img.qcow2"], cwd=d)


def build_thin(d: Path, p: dict, qemu_img: str) -> None:
    """A thin disk of p["size"] with the same 4 MiB of data whatever the size: 1 MiB at 0,
    1 MiB in the middle, 2 MiB 64 MiB before the end (issue 13's flatness rows)."""
    size = p["size"]
    run_checked([qemu_img, "create", "-q", "-f", "qcow2", "img.qcow2", str(size)], cwd=d)
    run_checked([qemu_io_for(qemu_img), "-f", "qcow2",
                 "-c", "write -q -P 0x11 0 1M",
                 "-c", "write -q -P 0x22 %d 1M" % (size // 2),
                 "-c", "write -q -P 0x33 %d 2M" % (size - 64 * MiB),
                 "img.qcow2"], cwd=d)


THIN_SIZES = (("64g", 64 * GiB), ("1t", 1 * TiB), ("4t", 4 * TiB), ("64t", 64 * TiB))


def build_empty(d: Path, p: dict, qemu_img: str) -> None:
    """Empty qcow2 (the starting image of the sequential write workloads)."""
    run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                 f"cluster_size={p['cluster_size']}", "img.qcow2",
                 str(p["size"])], cwd=d)


def build_backing(d: Path, p: dict, qemu_img: str) -> None:
    """A qcow2 base full of data and two empty overlays on it.

    ``base.qcow2`` (default 64 KiB clusters) is written whole with
    ``qemu-io -c 'write -P 0x5a 0 SIZE'``.  ``overlay.qcow2`` and
    ``overlay-extl2.qcow2`` (``extended_l2=on``) have the given cluster size
    and name the base by its absolute path, so copies of them placed anywhere
    (by the workloads' prepare step) still find it.
    """
    size = str(p["size"])
    base = (d / "base.qcow2").resolve()
    run_checked([qemu_img, "create", "-q", "-f", "qcow2", str(base), size])
    run_checked([qemu_io_for(qemu_img), "-f", "qcow2", "-c",
                 f"write -q -P 0x5a 0 {size}", str(base)])
    cs = p["cluster_size"]
    for name, extra in (("overlay.qcow2", ""),
                        ("overlay-extl2.qcow2", ",extended_l2=on")):
        run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                     f"cluster_size={cs}{extra}", "-b", str(base),
                     "-F", "qcow2", name, size], cwd=d)


def build_commit_chain(d: Path, p: dict, qemu_img: str) -> None:
    """A 1 GiB qcow2 base full of data and an overlay with ``overlay_data`` bytes of
    other data written over it (in 1 MiB stripes spread over the disk)."""
    size = p["size"]
    base = (d / "base.qcow2").resolve()
    run_checked([qemu_img, "create", "-q", "-f", "qcow2", str(base), str(size)])
    run_checked([qemu_io_for(qemu_img), "-f", "qcow2", "-c",
                 f"write -q -P 0x5a 0 {size}", str(base)])
    run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                 "overlay.qcow2", str(size)], cwd=d)
    stripe = 1 * MiB
    n = p["overlay_data"] // stripe
    step = size // n
    cmds = []
    for i in range(n):
        cmds += ["-c", f"write -q -P {i % 250 + 3} {i * step} {stripe}"]
    run_checked([qemu_io_for(qemu_img), "-f", "qcow2", *cmds, "overlay.qcow2"], cwd=d)


def build_chain(d: Path, p: dict, qemu_img: str) -> None:
    """``depth`` images: a base and depth-1 overlays, each with a bit of data.

    Backing file names are stored relative (bare file names).  The top of
    the chain is ``img.qcow2``.
    """
    depth = p["depth"]
    names = [f"layer-{i:03d}.qcow2" for i in range(depth - 1)] + ["img.qcow2"]
    run_checked([qemu_img, "create", "-q", "-f", "qcow2", names[0],
                 str(p["size"])], cwd=d)
    for i in range(1, depth):
        run_checked([qemu_img, "create", "-q", "-f", "qcow2", "-b",
                     names[i - 1], "-F", "qcow2", names[i]], cwd=d)
    for i, name in enumerate(names):
        run_checked([qemu_io_for(qemu_img), "-f", "qcow2", "-c",
                     f"write -q -P {i % 255 + 1} {i * 64}k 64k", name], cwd=d)


ARTIFACTS: dict[str, Artifact] = {a.name: a for a in [
    Artifact("prealloc-metadata", build_prealloc_metadata, {
        "full": {"size": 1 * TiB},
        "quick": {"size": 256 * GiB},
    }),
    Artifact("scattered-4k", build_scattered, {
        "full": {"size": 4 * GiB, "data": 1 * GiB, "cluster_size": 4096,
                 "seed": 1},
        "quick": {"size": 1 * GiB, "data": 256 * MiB, "cluster_size": 4096,
                  "seed": 1},
    }),
    Artifact("compressed-zlib", build_compressed, {
        "full": {"size": 1 * GiB, "seed": 2},
        "quick": {"size": 256 * MiB, "seed": 2},
    }),
    Artifact("prealloc-512", build_prealloc_512, {
        "full": {"size": 256 * MiB},
        "quick": {"size": 32 * MiB},
    }),
    Artifact("small", build_small, {
        "full": {"size": 1 * GiB},
        "quick": {"size": 1 * GiB},
    }),
    Artifact("chain-64", build_chain, {
        "full": {"depth": 64, "size": 1 * GiB},
        "quick": {"depth": 64, "size": 1 * GiB},
    }),
    Artifact("empty-64k", build_empty, {
        "full": {"size": 2 * GiB, "cluster_size": 64 * KiB},
        "quick": {"size": 512 * MiB, "cluster_size": 64 * KiB},
    }),
    *[Artifact("thin-" + tag, build_thin, {"full": {"size": size}, "quick": {"size": size}})
      for tag, size in THIN_SIZES],
    Artifact("backing-data", build_backing, {
        "full": {"size": 1 * GiB, "cluster_size": 64 * KiB},
        "quick": {"size": 256 * MiB, "cluster_size": 64 * KiB},
    }, files={"base": "base.qcow2", "overlay": "overlay.qcow2",
              "overlay_extl2": "overlay-extl2.qcow2"}),
    Artifact("commit-chain", build_commit_chain, {
        "full": {"size": 1 * GiB, "overlay_data": 768 * MiB},
        "quick": {"size": 256 * MiB, "overlay_data": 192 * MiB},
    }, files={"base": "base.qcow2", "overlay": "overlay.qcow2"}),
    # the 4 disks of the machine snapshot-tree workloads (tree-*, see tree_bench.py)
    TREE_ARTIFACT,
]}


# --------------------------------------------------------------------------
# Per-run set-up (prepare hooks) and qemu-io scripts
# --------------------------------------------------------------------------

def copy_image(src: str, dst: str = "out"):
    """Prepare hook: ``cp --sparse=always`` artifact file ``{src}`` to ``{dst}``."""
    def prepare(inputs: dict[str, Path], outputs: dict[str, Path],
                qemu_img: str) -> None:
        sparse_copy(inputs[src], outputs[dst])
    prepare.__doc__ = f"copy {{{src}}} to {{{dst}}}"
    return prepare


def _qsize(n: int) -> str:
    """A byte count in qemu-io's notation (1G, 1M, 4k, or plain bytes)."""
    for suffix, unit in (("G", GiB), ("M", MiB), ("k", KiB)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def seq_write_script(p: dict) -> list[str]:
    """``length`` bytes from offset 0 in requests of ``request`` bytes."""
    req = p["request"]
    return [f"write -P {p['pattern']:#04x} {_qsize(off)} {_qsize(min(req, p['length'] - off))}"
            for off in range(0, p["length"], req)]


def random_write_script(p: dict) -> list[str]:
    """``count`` writes of ``request`` bytes at random ``request``-aligned
    offsets below ``size`` (the artifact's disk size; offsets may repeat), each with a random pattern byte
    1..255, from ``random.Random(seed)``."""
    import random
    rng = random.Random(p["seed"])
    req = p["request"]
    out = []
    for _ in range(p["count"]):
        off = rng.randrange(p["size"] // req) * req
        out.append(f"write -P {rng.randrange(1, 256):#04x} {off} {_qsize(req)}")
    return out


def copy_chain(outbase: str = "outbase", out: str = "out"):
    """Prepare hook: fresh copies of the base and the overlay, the overlay re-pointed at
    the copied base (so the timed command never touches the cached artifact)."""
    def prepare(inputs: dict[str, Path], outputs: dict[str, Path], qemu_img: str) -> None:
        sparse_copy(inputs["base"], outputs[outbase])
        sparse_copy(inputs["overlay"], outputs[out])
        run_checked([qemu_img, "rebase", "-u", "-b", str(outputs[outbase]), "-F", "qcow2",
                     str(outputs[out])])
    prepare.__doc__ = "copy base and overlay"
    return prepare


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------

WORKLOADS: list[Workload] = [
    Workload("check-1t-prealloc",
             "check of a 1 TiB preallocation=metadata image (16.7M clusters)",
             "prealloc-metadata",
             ("check", "--output=json", "{img}"),
             Target("ratio", 1.0, rss_mib=200), json_equal()),
    Workload("map-4g-scattered",
             "map --output=json, 4 GiB image, 1 GiB data in scattered 4 KiB "
             "clusters",
             "scattered-4k",
             ("map", "--output=json", "{img}"),
             Target("ratio", 1.0), json_equal()),
    Workload("convert-raw-scattered",
             "convert -O raw of the scattered 4 KiB-cluster image",
             "scattered-4k",
             ("convert", "-O", "raw", "{img}", "{out}"),
             Target("ratio", 1.0), files_equal("out"), outputs=("out",)),
    Workload("convert-raw-zlib",
             "convert -O raw of a zlib-compressed image (1 GiB, ~3:1)",
             "compressed-zlib",
             ("convert", "-O", "raw", "{img}", "{out}"),
             Target("ratio", 1.0), files_equal("out"), outputs=("out",)),
    Workload("info-small",
             "info --output=json of a small image (process wall time)",
             "small",
             ("info", "--output=json", "{img}"),
             Target("seconds", 0.15), json_equal()),
    Workload("info-chain-64",
             "info --output=json --backing-chain of a 64-deep chain",
             "chain-64",
             ("info", "--output=json", "--backing-chain", "{img}"),
             Target("seconds", 0.15), json_equal()),
    # qemu-io write workloads: {out} is a fresh copy of the starting image
    # for every run (prepare hook), written in place by the timed command.
    Workload("write-seq-1g",
             "qemu-io write -P 0xab 0 1G (one request) into an empty 2 GiB "
             "image, 64 KiB clusters",
             "empty-64k",
             ("-f", "qcow2", IO_COMMANDS, "{out}"),
             Target("ratio", 1.0), images_equal("out"), outputs=("out",),
             tool="qemu-io", prepare=copy_image("img"),
             io_script=seq_write_script,
             params={"full": {"length": 1 * GiB, "request": 1 * GiB,
                              "pattern": 0xab},
                     "quick": {"length": 256 * MiB, "request": 256 * MiB,
                               "pattern": 0xab}}),
    Workload("write-seq-1g-1m",
             "the same 1 GiB as 1024 requests of 1 MiB (-c each), one "
             "invocation",
             "empty-64k",
             ("-f", "qcow2", IO_COMMANDS, "{out}"),
             Target("ratio", 1.0), images_equal("out"), outputs=("out",),
             tool="qemu-io", prepare=copy_image("img"),
             io_script=seq_write_script,
             params={"full": {"length": 1 * GiB, "request": 1 * MiB,
                              "pattern": 0xab},
                     "quick": {"length": 256 * MiB, "request": 1 * MiB,
                               "pattern": 0xab}}),
    Workload("write-rand-4k-backing",
             "2000 random 4 KiB writes (seeded, -c each) into an empty "
             "1 GiB overlay (64 KiB clusters, COW) of a full 1 GiB base",
             "backing-data",
             ("-f", "qcow2", IO_COMMANDS, "{out}"),
             Target("ratio", float("inf")), images_equal("out"),
             outputs=("out",), tool="qemu-io", prepare=copy_image("overlay"),
             io_script=random_write_script,
             params={"full": {"count": 2000, "request": 4 * KiB, "seed": 4},
                     "quick": {"count": 500, "request": 4 * KiB, "seed": 4}}),
    Workload("write-rand-4k-extl2",
             "the same random writes, overlay with extended_l2=on "
             "(subcluster COW)",
             "backing-data",
             ("-f", "qcow2", IO_COMMANDS, "{out}"),
             Target("ratio", float("inf")), images_equal("out"),
             outputs=("out",), tool="qemu-io",
             prepare=copy_image("overlay_extl2"),
             io_script=random_write_script,
             params={"full": {"count": 2000, "request": 4 * KiB, "seed": 4},
                     "quick": {"count": 500, "request": 4 * KiB, "seed": 4}}),
    # chain operations: each run works on fresh copies of the base and the overlay
    Workload("commit-768m",
             "commit of a 768 MiB overlay into its 1 GiB base",
             "commit-chain",
             ("commit", "-q", "{out}"),
             Target("ratio", 1.0), chain_equal("outbase", "out"),
             outputs=("out", "outbase"), prepare=copy_chain()),
    Workload("rebase-flatten-1g",
             "safe rebase onto nothing (-b \"\") of the same overlay",
             "commit-chain",
             ("rebase", "-b", "", "{out}"),
             Target("ratio", 1.0), chain_equal("out"),
             outputs=("out", "outbase"), prepare=copy_chain()),
    Workload("convert-qcow2-scattered",
             "convert -O qcow2 of the scattered 4 KiB-cluster image",
             "scattered-4k",
             ("convert", "-O", "qcow2", "{img}", "{out}"),
             Target("ratio", 1.0), chain_equal("out"), outputs=("out",)),
    Workload("create-prealloc-512",
             "create -o preallocation=metadata,cluster_size=512 of 256 MiB",
             "small",
             ("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata,cluster_size=512",
              "{out}", "256M"),
             Target("ratio", 1.0), chain_equal("out"), outputs=("out",)),
    Workload("check-prealloc-512",
             "check of that 256 MiB preallocated image (512-byte clusters)",
             "prealloc-512",
             ("check", "--output=json", "{img}"),
             Target("ratio", 1.0), json_equal()),
    Workload("convert-qcow2-compress",
             "convert -O qcow2 -c (zlib) of the compressible 1 GiB image",
             "compressed-zlib",
             ("convert", "-O", "qcow2", "-c", "{img}", "{out}"),
             Target("ratio", 1.0), chain_equal("out"), outputs=("out",)),
]

# Cost follows the data (issue 13): the same 4 MiB on thin disks of 64 GiB .. 64 TiB; the
# engine's time should not grow with the virtual size.  (A raw target of 64 TiB is past
# ext4's 16 TiB file limit: convert stops at 4 TiB.)
for _tag, _size in THIN_SIZES:
    WORKLOADS += [
        Workload("thin-%s-check" % _tag, "check, %s virtual, 4 MiB of data" % _tag.upper(),
                 "thin-" + _tag, ("check", "--output=json", "{img}"),
                 Target("seconds", 0.15), json_equal()),
        Workload("thin-%s-map" % _tag, "map --output=json, the same image",
                 "thin-" + _tag, ("map", "--output=json", "{img}"),
                 Target("seconds", 0.15), json_equal()),
        Workload("thin-%s-compare" % _tag, "compare of the image with itself",
                 "thin-" + _tag, ("compare", "{img}", "{img}"), Target("seconds", 0.15)),
        Workload("thin-%s-info" % _tag, "info --output=json", "thin-" + _tag,
                 ("info", "--output=json", "{img}"), Target("seconds", 0.15), json_equal()),
    ]
    if _size <= 4 * TiB:
        WORKLOADS.append(Workload(
            "thin-%s-convert-raw" % _tag, "convert -O raw of the same image",
            "thin-" + _tag, ("convert", "-O", "raw", "{img}", "{out}"),
            Target("ratio", 1.0), files_equal("out"), outputs=("out",)))

# Machine snapshot-tree verbs through the Python API against the qemu-img commands a script
# would run (benchmarks/tree_bench.py: they run in-process and are timed there).
WORKLOADS += TREE_WORKLOADS
