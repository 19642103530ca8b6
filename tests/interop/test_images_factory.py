"""Each builder in tests/helpers/images.py produces what it claims, according to
qemu-img 7.2 itself (info / check / map JSON)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.images import (UNKNOWN_AUTOCLEAR_BIT, UNKNOWN_EXT_DATA, UNKNOWN_EXT_TYPE,
                                  VARIANTS, VARIANTS_BY_NAME, Variant, read_extensions,
                                  read_header)
from tests.helpers.qemu import qemu_img_check, qemu_img_info, run

MAX_FILES_BYTES = 20 * 1024 * 1024


def _lookup(info: dict, dotted: str) -> Any:
    cur: Any = info
    for part in dotted.split("."):
        assert isinstance(cur, dict) and part in cur, (
            f"{dotted!r} missing in qemu-img info: {json.dumps(info)[:800]}")
        cur = cur[part]
    return cur


@pytest.fixture(scope="module")
def built(variant_images):
    """The session's variants (tests/helpers/fixtures.py), each built on first use."""
    return variant_images


@pytest.mark.parametrize("v", [pytest.param(v, id=v.name, marks=v.marks) for v in VARIANTS])
def test_variant(v: Variant, built) -> None:
    img = _img(built, v.name)
    assert img.is_file()
    cwd = img.parent

    # Small on disk (logical sizes of everything the builder made).
    vdir = next(p for p in [img, *img.parents] if p.name == v.name)
    total = sum(p.stat().st_size for p in vdir.rglob("*") if p.is_file())
    assert total < MAX_FILES_BYTES

    info = qemu_img_info(img, cwd=cwd)
    assert info["format"] == v.fmt
    for key, want in v.expect_info.items():
        assert _lookup(info, key) == want, key

    # Flags agree with what qemu-img reports.
    assert ("backing-filename" in info) == v.has_backing
    if v.has_backing:
        chain = qemu_img_info(img, cwd=cwd, backing_chain=True)
        assert len(chain) == v.backing_depth + 1
        assert all(Path(layer["filename"]).exists() for layer in chain)
    assert info.get("dirty-flag", False) == v.dirty
    snaps = info.get("snapshots", [])
    assert bool(snaps) == v.has_snapshots
    assert any(s["vm-state-size"] > 0 for s in snaps) == v.has_vmstate
    fs = info.get("format-specific", {}).get("data", {})
    assert bool(fs.get("bitmaps")) == v.has_bitmaps
    assert ("data-file" in fs) == v.has_data_file
    if v.has_data_file:
        assert (cwd / fs["data-file"]).is_file()

    rc, chk, _ = qemu_img_check(img, cwd=cwd)
    assert rc == v.expect_check_rc, chk
    if v.fmt == "qcow2":
        assert chk["check-errors"] == 0
        assert bool(chk.get("compressed-clusters")) == v.compressed
        for key, want in v.expect_check.items():
            if key == "compressed-clusters":
                assert chk.get(key, 0) >= want
            else:
                assert chk.get(key, 0) == want, (key, chk)
        if rc == 0:
            for key in ("corruptions", "leaks"):
                assert key not in chk

    # The image is non-trivial: it holds guest data, and qemu-img can map it
    # (map reads the whole chain, catching broken relative paths).
    m = json.loads(run("qemu-img", "map", "--output=json", img.name,
                       cwd=cwd).stdout)
    assert any(e["data"] for e in m)
    assert sum(e["length"] for e in m) == info["virtual-size"]


# ---------------------------------------------------------------- specifics

def _img(built, name: str) -> Path:
    return built[name][1]


def test_compat_010_is_version_2(built):
    assert read_header(_img(built, "compat_0.10"))["version"] == 2


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_order(built, bits):
    hdr = read_header(_img(built, f"refcount_bits_{bits}"))
    assert 1 << hdr["refcount_order"] == bits


def test_extended_l2_subclusters(built):
    img = _img(built, "extended_l2")
    m = json.loads(run("qemu-img", "map", "--output=json", img.name,
                       cwd=img.parent).stdout)
    # 4k write at 4k inside cluster 0 shows as a 4k data extent, and the
    # zero write of 8k..10k as a present zero extent.
    assert {"start": 4096, "length": 4096} in [
        {"start": e["start"], "length": e["length"]} for e in m if e["data"]]
    assert any(e["start"] == 8192 and e["zero"] and e["present"]
               and not e["data"] for e in m)


def test_extended_l2_backing_falls_through(built):
    img = _img(built, "extended_l2_backing")
    m = json.loads(run("qemu-img", "map", "--output=json", img.name,
                       cwd=img.parent).stdout)
    # Unallocated subclusters of allocated cluster 0 come from the base.
    depth_at_0 = [e for e in m if e["start"] == 0][0]
    assert depth_at_0["depth"] == 1 and depth_at_0["data"]
    assert any(e["depth"] == 0 and e["data"] for e in m)


def test_backing_chain_relative_names(built):
    img = _img(built, "backing_chain_relative")
    chain = qemu_img_info(img, cwd="/", backing_chain=True)
    assert [c["format"] for c in chain] == ["qcow2", "qcow2", "qcow2", "raw"]
    assert [c.get("backing-filename") for c in chain] == [
        "../l2/l2.qcow2", "../l1/l1.qcow2", "../base/base.raw", None]


def test_backing_shorter(built):
    chain = qemu_img_info(_img(built, "backing_shorter"), backing_chain=True)
    assert [c["virtual-size"] for c in chain] == [8 << 20, 4 << 20]


def test_bitmaps(built):
    fs = qemu_img_info(_img(built, "bitmaps"))["format-specific"]["data"]
    bms = {b["name"]: b for b in fs["bitmaps"]}
    assert set(bms) == {"bm0", "bm1", "bm2"}
    assert bms["bm0"]["granularity"] == 65536
    assert bms["bm0"]["flags"] == ["auto"]
    assert bms["bm1"]["granularity"] == 128 * 1024
    assert bms["bm1"]["flags"] == []          # disabled


def test_internal_snapshots(built):
    snaps = qemu_img_info(_img(built, "internal_snapshots"))["snapshots"]
    assert [s["name"] for s in snaps] == ["snap1", "snap3"]
    assert all(s["vm-state-size"] == 0 for s in snaps)


@pytest.mark.live
def test_savevm(built):
    snaps = qemu_img_info(_img(built, "savevm"))["snapshots"]
    assert len(snaps) == 1 and snaps[0]["name"] == "snap1"
    assert snaps[0]["vm-state-size"] > 0
    # No stray QEMU left behind by the builder (matched by its cwd).
    vdir = str(_img(built, "savevm").parent)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue
        assert not (cwd == vdir and comm.startswith("qemu")), proc.name


def test_preallocation(built):
    for name in ("prealloc_metadata", "prealloc_falloc"):
        img = _img(built, name)
        rc, chk, _ = qemu_img_check(img)
        assert rc == 0
        # Nearly every cluster has a host cluster (only discards freed some).
        assert chk["allocated-clusters"] >= chk["total-clusters"] - 2, name
        m = json.loads(run("qemu-img", "map", "--output=json", img.name,
                           cwd=img.parent).stdout)
        # Never-written guest ranges are mapped (have a host offset).
        tail = [e for e in m if e["start"] <= 5 << 20 < e["start"] + e["length"]]
        assert tail and "offset" in tail[0], name
    # falloc really reserved the space; metadata left holes in the file.
    falloc = _img(built, "prealloc_falloc").stat()
    assert falloc.st_blocks * 512 >= 8 << 20
    meta = _img(built, "prealloc_metadata").stat()
    assert meta.st_blocks * 512 < meta.st_size


def test_data_file_raw_is_raw_image(built):
    img = _img(built, "data_file_raw")
    # The data file alone equals the guest view.
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img.name,
        "data.bin", cwd=img.parent)


def test_unknown_ext_and_autoclear(built):
    img = _img(built, "unknown_ext_autoclear")
    hdr = read_header(img)
    assert hdr["autoclear_features"] & UNKNOWN_AUTOCLEAR_BIT
    exts = read_extensions(img)
    assert (UNKNOWN_EXT_TYPE, UNKNOWN_EXT_DATA) in exts
    with open(img, "rb") as f:
        f.seek(hdr["backing_file_offset"])
        assert f.read(hdr["backing_file_size"]) == b"base.qcow2"
    # qemu-img compare reads through the moved backing name.
    run("qemu-img", "compare", img.name, img.name, cwd=img.parent)


def test_wild_l2_entry_points_past_eof(built):
    img = _img(built, "wild_l2_entry")
    rc, chk, _ = qemu_img_check(img)
    assert rc == 2 and chk["corruptions"] >= 1
    assert img.stat().st_size < 64 << 20


def test_raw_sparse_has_holes(built):
    img = _img(built, "raw_sparse")
    st = img.stat()
    assert st.st_blocks * 512 < st.st_size


def test_names_unique():
    assert len(VARIANTS_BY_NAME) == len(VARIANTS)
