"""Differential tests of the write path: random sequences of writes, zero-writes, discards
(and pattern reads) run through qemu-io on copy A and through ``qcow2engine io`` on an
identical copy B of the same starting image; then A and B must have the same guest contents,
B must be clean for ``qemu-img check`` and our ``check`` must agree with it, and the two
tools must print the same lines and exit status.  See tests/helpers/iodiff.py for the harness
and the variants; a failure prints a shell script that replays the case by hand.

Run:   python -m pytest tests/interop/test_write_differential.py
Self-test of the harness (qemu-io on both copies):
       IODIFF_B=qemu-io python -m pytest tests/interop/test_write_differential.py
"""
from __future__ import annotations

import itertools
import os
import random
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import iodiff
from tests.helpers.iodiff import KiB, MiB, Cmd, Variant, VARIANTS, build_template, format_cmd, \
    gen_sequence, run_case


def _seed(name: str, i: int) -> int:
    return zlib.crc32(f"{name}:{i}".encode())


CASES = [pytest.param(v.name, _seed(v.name, i), id=f"{v.name}-{i}")
         for v in VARIANTS for i in range(v.seeds)]


@pytest.fixture(scope="session")
def templates(tmp_path_factory):
    """name -> iodiff.Template, each built on first use."""
    root = tmp_path_factory.mktemp("iodiff-templates")
    cache: dict[str, iodiff.Template] = {}

    def get(v: Variant) -> iodiff.Template:
        if v.name not in cache:
            cache[v.name] = build_template(v, root / v.name)
        return cache[v.name]
    return get


@pytest.mark.parametrize("name,seed", CASES)
def test_random_sequence(templates, tmp_path, name, seed):
    v = iodiff.VARIANTS_BY_NAME[name]
    t = templates(v)
    rng = random.Random(seed)
    cmds = gen_sequence(rng, v)
    if rng.random() < 0.3:          # sometimes two invocations: state must survive a reopen
        cut = rng.randint(1, len(cmds) - 1)
        cmds = [cmds[:cut], cmds[cut:]]
    run_case(t, cmds, tmp_path / "case")


def test_sequence_count():
    """The brief: at least 300 random sequences across the variants."""
    assert len(CASES) >= 300


# --------------------------------------------------------------------------
# Images made by `qcow2engine create` (B) vs `qemu-img create` (A)
# --------------------------------------------------------------------------

_BASE_RAW = (("qemu-img", "create", "-q", "-f", "raw", "base.raw", "8M"),
             ("qemu-io", "-f", "raw", "-c", "write -P 0xe1 0 3M", "-c", "write -P 0xe2 5M 2M",
              "base.raw"))

# name, virtual size (None: from the backing file), cluster size, extended L2, create args
CREATE_CASES = [
    ("default", 8 * MiB, 64 * KiB, False, []),
    ("compat010", 8 * MiB, 64 * KiB, False, ["-o", "compat=0.10"]),
    ("4k-refcount8", 4 * MiB, 4 * KiB, False, ["-o", "cluster_size=4k,refcount_bits=8"]),
    ("512", 2 * MiB, 512, False, ["-o", "cluster_size=512"]),
    ("xl2-32k", 8 * MiB, 32 * KiB, True, ["-o", "extended_l2=on,cluster_size=32k"]),
    ("lazy", 8 * MiB, 64 * KiB, False, ["-o", "lazy_refcounts=on"]),
    ("zstd", 8 * MiB, 64 * KiB, False, ["-o", "compression_type=zstd"]),
    ("raw-backing", None, 64 * KiB, False, ["-b", "base.raw", "-F", "raw"]),
    ("data-file", 8 * MiB, 64 * KiB, False, ["-o", "data_file=img.data"]),
]
CREATE_SEEDS = 3


def _create_variants(name, size, cs, xl2, args):
    tail = [iodiff.IMG] + ([str(size)] if size else [])
    pre = _BASE_RAW if "-b" in args else ()
    common = dict(size=size or 8 * MiB, cluster_size=cs, extended_l2=xl2,
                  data_file="img.data" if "data_file=img.data" in args else None,
                  backing_files=("base.raw",) if pre else (),
                  backing_size=8 * MiB if pre else 0)
    qa = Variant(f"create-{name}-qemu-img", setup=tuple(
        [*pre, ("qemu-img", "create", "-q", "-f", "qcow2", *args, *tail)]), **common)
    qb = Variant(f"create-{name}-qcow2engine", setup=tuple(
        [*pre, ("python", "-m", "qcow2engine", "create", "-f", "qcow2", *args, *tail)]),
        **common)
    if os.environ.get("IODIFF_B") == "qemu-io":      # harness self-test: qemu on both sides
        qb = qa
    return qa, qb


@pytest.mark.parametrize("case,i", [pytest.param(c, i, id=f"{c[0]}-{i}") for c, i in
                                    itertools.product(CREATE_CASES, range(CREATE_SEEDS))])
def test_created_by_engine(tmp_path, case, i):
    va, vb = _create_variants(*case)
    ta = build_template(va, tmp_path / "TA")
    tb = build_template(vb, tmp_path / "TB")       # fails until `create` lands
    cmds = gen_sequence(random.Random(_seed(va.name, i)), va)
    run_case(ta, cmds, tmp_path / "case", b_template=tb)


# --------------------------------------------------------------------------
# Hypothesis: command lists on 4 KiB clusters (an L2 table covers 2 MiB)
# --------------------------------------------------------------------------

HYP_VARIANT = iodiff.VARIANTS_BY_NAME["cluster-4k"]


@st.composite
def _commands(draw, v: Variant = HYP_VARIANT):
    size, cs = v.size, v.cluster_size
    op = draw(st.sampled_from(["write", "write", "zero", "discard", "read"]))
    g = draw(st.sampled_from([1, 512, cs]))
    hot = draw(st.sampled_from([0, cs, v.l2_cover, 2 * v.l2_cover, size // 2, size]))
    off = min(max(0, hot + draw(st.integers(-3 * cs, 3 * cs))), size - 1) // g * g
    length = draw(st.integers(1, 4 * cs))
    length = (length + g - 1) // g * g
    length = max(1, min(length, size - off))
    if op == "zero":
        return Cmd("zero", off, length, unmap=draw(st.booleans()))
    pattern = draw(st.integers(0, 255)) if op in ("write", "read") else None
    return Cmd(op, off, length, pattern)


@pytest.fixture(scope="module")
def hyp_env(templates, tmp_path_factory):
    return templates(HYP_VARIANT), tmp_path_factory.mktemp("iodiff-hyp")


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cmds=st.lists(_commands(), min_size=1, max_size=25))
def test_hypothesis_sequences(hyp_env, cmds):
    t, root = hyp_env
    run_case(t, [format_cmd(c) for c in cmds], root / "case")
