"""create: indistinguishable from qemu-img create to qemu-img info, clean for qemu-img check,
and refused where qemu-img refuses."""
from __future__ import annotations

import json

import pytest

from tests.helpers.engine import engine
from tests.helpers.qemu import qemu_img

OPTION_SETS = [
    "", "compat=0.10", "cluster_size=512", "cluster_size=512,refcount_bits=1",
    "cluster_size=2M", "cluster_size=4k,refcount_bits=2", "refcount_bits=4", "refcount_bits=8",
    "refcount_bits=32", "refcount_bits=64", "lazy_refcounts=on",
    "extended_l2=on", "extended_l2=on,cluster_size=16k", "compression_type=zstd",
    "data_file=data.bin", "data_file=data.bin,data_file_raw=on",
    "preallocation=metadata", "preallocation=metadata,cluster_size=4k", "preallocation=falloc",
    "preallocation=full,cluster_size=1M",
]
SIZES = ["100M", "1G", "3000M"]


def _info(path, cwd):
    rc, out, err = qemu_img("info", "--output=json", path, cwd=cwd)
    assert rc == 0, err
    d = json.loads(out)
    d.pop("filename")
    d.pop("actual-size")
    return d


def _cases():
    """Every option set at every size, except that options which write or allocate every
    byte of the disk (falloc, full, a raw data file that qemu-img compare then reads whole)
    stop at 1G: the layout past 2 GiB is the metadata options' concern."""
    for opts in OPTION_SETS:
        for size in SIZES:
            if "full" in opts and size != "100M":
                continue
            if ("falloc" in opts or "data_file_raw=on" in opts) and size == "3000M":
                continue
            yield opts, size


@pytest.mark.parametrize("opts,size", list(_cases()))
def test_create_like_qemu_img(tmp_path, opts, size):
    args = ["-f", "qcow2"] + (["-o", opts.replace("data.bin", "q.bin")] if opts else [])
    q = qemu_img("create", *args, "q.qcow2", size, cwd=tmp_path)
    assert q[0] == 0, q[2]
    args = ["-f", "qcow2"] + (["-o", opts.replace("data.bin", "e.bin")] if opts else [])
    e = engine("create", *args, "e.qcow2", size, cwd=tmp_path)
    assert e[0] == 0, e[2]
    assert e[1].replace("e.qcow2", "X").replace("e.bin", "D") == \
        q[1].replace("q.qcow2", "X").replace("q.bin", "D")          # the Formatting line
    qi, ei = _info("q.qcow2", tmp_path), _info("e.qcow2", tmp_path)
    fs = ei["format-specific"]["data"]
    if "data-file" in fs:
        fs["data-file"] = qi["format-specific"]["data"]["data-file"]
    assert ei == qi
    rc, out, err = qemu_img("check", "--output=json", "e.qcow2", cwd=tmp_path)
    assert rc == 0, out + err
    assert (tmp_path / "e.qcow2").stat().st_size == (tmp_path / "q.qcow2").stat().st_size
    from qcow2engine.image.qcow2 import Qcow2Image
    with Qcow2Image(tmp_path / "q.qcow2") as qimg:
        one_refblock = int((qimg.refcount_table != 0).sum()) == 1
    if "preallocation" not in opts and one_refblock and "data_file=" not in opts:
        # the same layout, byte for byte (header, refcount table, refcount block, L1)
        assert (tmp_path / "e.qcow2").read_bytes() == (tmp_path / "q.qcow2").read_bytes()
    rc, out, err = qemu_img("compare", "q.qcow2", "e.qcow2", cwd=tmp_path)
    assert rc == 0, out + err


@pytest.mark.parametrize("backing_fmt", ["qcow2", "raw"])
def test_create_overlay(tmp_path, backing_fmt):
    sub = tmp_path / "base"
    sub.mkdir()
    assert qemu_img("create", "-f", backing_fmt, "base/b.img", "12M", cwd=tmp_path)[0] == 0
    q = qemu_img("create", "-f", "qcow2", "-b", "base/b.img", "-F", backing_fmt, "q.qcow2", cwd=tmp_path)
    e = engine("create", "-f", "qcow2", "-b", "base/b.img", "-F", backing_fmt, "e.qcow2", cwd=tmp_path)
    assert q[0] == e[0] == 0, (q, e)
    qi, ei = _info("q.qcow2", tmp_path), _info("e.qcow2", tmp_path)
    assert ei == qi
    assert ei["virtual-size"] == 12 << 20 and ei["backing-filename"] == "base/b.img"
    assert (tmp_path / "e.qcow2").read_bytes() == (tmp_path / "q.qcow2").read_bytes()


BAD = [
    (["-o", "cluster_size=1000"], "1M"),
    (["-o", "cluster_size=4M"], "1M"),
    (["-o", "compat=0.10,refcount_bits=8"], "1M"),
    (["-o", "compat=0.10,lazy_refcounts=on"], "1M"),
    (["-o", "extended_l2=on,cluster_size=4k"], "1M"),
    (["-o", "cluster_size=512"], "200G"),
    (["-o", "refcount_bits=3"], "1M"),
    (["-o", "data_file_raw=on"], "1M"),
    (["-o", "nonsense=1"], "1M"),
    ([], None),
    (["-b", "missing.qcow2", "-F", "qcow2"], "1M"),
    (["-b", "exists.qcow2"], "1M"),
    (["-o", "preallocation=metadata", "-b", "exists.qcow2", "-F", "qcow2"], "1M"),
]


@pytest.mark.parametrize("args,size", BAD)
def test_create_refused_like_qemu_img(tmp_path, args, size):
    qemu_img("create", "-q", "-f", "qcow2", "exists.qcow2", "1M", cwd=tmp_path)
    tail = [size] if size else []
    q = qemu_img("create", "-q", "-f", "qcow2", *args, "q.qcow2", *tail, cwd=tmp_path)
    e = engine("create", "-q", "-f", "qcow2", *args, "e.qcow2", *tail, cwd=tmp_path)
    assert q[0] == 1
    assert e[0] == 1 and e[2].count("\n") == 1, e
