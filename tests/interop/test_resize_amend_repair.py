"""resize, amend and check -r against qemu-img on copies of the same images."""
from __future__ import annotations

import json
from pathlib import Path
import shutil

import pytest

from tests.helpers.engine import engine
from tests.helpers.images import VARIANTS_BY_NAME
from tests.helpers.qemu import qemu_img, qemu_io


def _img(tmp_path, opts="cluster_size=4k", size="10M", snapshot=True):
    p = tmp_path / "a.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p, size)[0] == 0
    qemu_io(p, "write -P 1 0 3M", "write -z 1M 512k", "write -P 7 5M 1M", "write -z 8M 64k")
    if snapshot:
        assert qemu_img("snapshot", "-c", "s1", p)[0] == 0
        qemu_io(p, "write -P 2 1M 1M", "write -z 0 8k")
    b = tmp_path / "b.qcow2"
    shutil.copy(p, b)
    return p, b


def _same(a, b, snapshot=True):
    rc, out, err = qemu_img("check", "--output=json", a)
    assert rc == 0, out + err
    assert qemu_img("compare", a, b)[0] == 0
    if snapshot:
        # the snapshot's view copied by qemu-img into sparse qcow2 images, compared by
        # qemu-img (a raw copy of a 5 GiB view read into memory took 20 s)
        views = []
        for img in (a, b):
            v = Path(str(img) + ".s1.qcow2")
            assert qemu_img("convert", "-O", "qcow2", "-l", "snapshot.name=s1", img, v)[0] == 0
            views.append(v)
        r = qemu_img("compare", *views)
        assert r[0] == 0, r
        for v in views:
            v.unlink()


@pytest.mark.parametrize("opts", ["cluster_size=4k", "cluster_size=512", "extended_l2=on",
                                  "compat=0.10", "refcount_bits=1,cluster_size=4k"])
@pytest.mark.parametrize("steps", [["5G"], ["--shrink", "3M"], ["+7M"], ["--shrink", "6M", "+1M"],
                                   ["--shrink", "5632k"]])
def test_resize_like_qemu_img(tmp_path, opts, steps):
    snap = "refcount_bits=1" not in opts and "compat=0.10" not in opts
    a, b = _img(tmp_path, opts, snapshot=snap)
    args = []
    for s in steps:
        if s == "--shrink":
            args.append(s)
            continue
        q = qemu_img("resize", *args, b, s)
        e = engine("resize", *args, a, s)
        assert q[0] == e[0] == 0, (q, e)
        assert e[1] == "Image resized.\n"
        args = []
    qa = json.loads(qemu_img("info", "--output=json", a)[1])
    qb = json.loads(qemu_img("info", "--output=json", b)[1])
    assert qa["virtual-size"] == qb["virtual-size"]
    _same(a, b, snap)


def test_shrink_needs_flag(tmp_path):
    a, b = _img(tmp_path)
    before = a.read_bytes()
    rc, out, err = engine("resize", a, "3M")
    assert rc == 1 and "--shrink" in err and err.count("\n") == 1
    assert a.read_bytes() == before


@pytest.mark.parametrize("opt", ["lazy_refcounts=on", "refcount_bits=4", "refcount_bits=64",
                                 "refcount_bits=1", "compat=0.10", "compat=0.10,lazy_refcounts=off"])
def test_amend_like_qemu_img(tmp_path, opt):
    a, b = _img(tmp_path, "cluster_size=4k")
    if "refcount_bits=1" in opt:
        # snapshots make refcounts of 2: too wide for 1 bit -- refused by both, nothing changed
        before = a.read_bytes()
        assert qemu_img("amend", "-o", opt, b)[0] == 1
        rc, _, err = engine("amend", "-o", opt, a)
        assert rc == 1 and err.count("\n") == 1
        assert a.read_bytes() == before
        return
    assert qemu_img("amend", "-o", opt, b)[0] == 0
    rc, out, err = engine("amend", "-o", opt, a)
    assert rc == 0, err
    qa = json.loads(qemu_img("info", "--output=json", a)[1])["format-specific"]["data"]
    qb = json.loads(qemu_img("info", "--output=json", b)[1])["format-specific"]["data"]
    assert qa == qb
    _same(a, b)


@pytest.mark.parametrize("name", ["leaked_clusters", "lazy_refcounts_dirty", "wild_l2_entry"])
@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_repair(tmp_path, name, mode):
    v = VARIANTS_BY_NAME[name]
    d = tmp_path / "img"
    d.mkdir()
    p = v.build(d)
    orig = tmp_path / "orig.qcow2"
    shutil.copy(p, orig)
    q_copy = tmp_path / "q.qcow2"
    shutil.copy(p, q_copy)
    q = qemu_img("check", "-r", mode, "--output=json", q_copy)
    e = engine("check", "-r", mode, "--output=json", p)
    ej = json.loads(e[1])
    if name == "lazy_refcounts_dirty" and mode == "leaks":
        # qemu-img fails here ("need to rebuild refcount structures") and clears the dirty
        # bit anyway; we report the corruption and keep the image marked dirty
        assert q[0] == 1 and e[0] == 2 and ej["corruptions"] > 0
        assert json.loads(qemu_img("info", "--output=json", p)[1])["dirty-flag"] is True
        assert qemu_img("compare", orig, p)[0] == 0
        return
    qj = json.loads(q[1])
    # guest data never changes through a repair
    assert qemu_img("compare", orig, p)[0] == 0
    if mode == "leaks":
        assert ej.get("leaks-fixed", 0) == qj.get("leaks-fixed", 0)
        assert e[0] == q[0]
    else:
        # -r all: we must end clean even where qemu-img gives up (wild L2 entry)
        assert e[0] == 0, e
        rc, out, err = qemu_img("check", "--output=json", p)
        assert rc == 0, out + err
        assert ej.get("leaks-fixed", 0) == qj.get("leaks-fixed", 0)
        assert ej.get("corruptions-fixed", 0) >= 1 or name == "leaked_clusters"
        info = json.loads(qemu_img("info", "--output=json", p)[1])
        assert info["dirty-flag"] is False


def test_dirty_image_repaired_on_write_open(tmp_path):
    v = VARIANTS_BY_NAME["lazy_refcounts_dirty"]
    d = tmp_path / "img"
    d.mkdir()
    p = v.build(d)
    orig = tmp_path / "orig.qcow2"
    shutil.copy(p, orig)
    rc, out, err = engine("io", "-c", "read 0 4k", p)   # read-write open
    assert rc == 0, err
    assert qemu_img("check", p)[0] == 0
    assert qemu_img("compare", orig, p)[0] == 0
    assert json.loads(qemu_img("info", "--output=json", p)[1])["dirty-flag"] is False
