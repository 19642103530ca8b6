"""Issue 15's verbs and options, each run by qemu-img and by the engine on the same files:
`dd`, `bench`, filenames with a protocol prefix, json: and --image-opts, cache modes, -p's
progress lines, --help."""
from __future__ import annotations

import re
import shutil

import pytest

from tests.helpers.engine import engine
from tests.helpers.files import file_sha256
from tests.helpers.qemu import assert_clean, assert_same_guest, qemu_img, qemu_io


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("verbs")
    qemu_img("create", "-q", "-f", "qcow2", d / "d.qcow2", "1M", check=True)
    qemu_io(d / "d.qcow2", "write -P 0x11 0 256k", "write -P 0x22 256k 256k",
            "write -P 0x33 900k 3k")
    qemu_img("snapshot", "-c", "s1", d / "d.qcow2", check=True)
    return d


def _err_tail(err):
    return err.strip().splitlines()[-1].split(": ", 1)[1] if err.strip() else ""


@pytest.mark.parametrize("ops", [
    "bs=64k", "bs=64k count=2", "bs=64k skip=3", "bs=64k skip=3 count=4", "bs=64k count=100",
    "bs=1000 count=3", "bs=4k skip=7", "",
])
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_dd_like_qemu_img(src, tmp_path, ops, out_fmt):
    args = ["dd", "-f", "qcow2", "-O", out_fmt] + ops.split() + ["if=%s" % (src / "d.qcow2")]
    rc, _, err = engine(*args, "of=%s" % (tmp_path / "e.img"), catch_exit=True)
    r = qemu_img(*args, "of=%s" % (tmp_path / "q.img"))
    assert rc == r.rc == 0, (err, r.err)
    if out_fmt == "raw":
        assert file_sha256(tmp_path / "e.img") == file_sha256(tmp_path / "q.img")
    else:
        assert_same_guest(tmp_path / "e.img", tmp_path / "q.img")
        assert_clean(tmp_path / "e.img")


@pytest.mark.parametrize("ops", [["bs=0"], ["foo=1"], [], ["bs=64k", "skip=100"]])
def test_dd_errors_like_qemu_img(src, tmp_path, ops):
    io = ["if=%s" % (src / "d.qcow2"), "of=%s" % (tmp_path / "o.img")] if ops else \
        ["if=%s" % (src / "d.qcow2")]
    rc, _, err = engine("dd", *ops, *io, catch_exit=True)
    r = qemu_img("dd", *ops, *io)
    assert rc == 1
    assert _err_tail(err) == _err_tail(r.err)


def test_bench_writes_and_reads(src, tmp_path):
    img = tmp_path / "b.qcow2"
    shutil.copy(src / "d.qcow2", img)
    rc, out, err = engine("bench", "-w", "-c", "300", "-s", "8k", "--pattern=0x55",
                          "--flush-interval=50", img, catch_exit=True)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == ("Sending 300 write requests, 8192 bytes each, 64 in parallel (starting "
                        "at offset 0, step size 8192)")
    assert lines[1] == "Sending flush every 50 requests"
    assert re.fullmatch(r"Run completed in \d+\.\d{3} seconds\.", lines[2])
    # 300 x 8 KiB from 0, wrapping at 1 MiB: all of the disk is 0x55 now
    qemu_io(img, "read -P 0x55 0 1M", read_only=True)
    assert_clean(img)
    rc, out, err = engine("bench", "-c", "200", "-o", "4096", img, catch_exit=True)
    q = qemu_img("bench", "-c", "200", "-o", "4096", img)
    assert rc == q.rc == 0
    assert out.splitlines()[0] == q.out.splitlines()[0]
    rc, out, err = engine("bench", "-c", "10", "-o", "2M", img, catch_exit=True)
    q = qemu_img("bench", "-c", "10", "-o", "2M", img)
    assert rc == q.rc == 1 and _err_tail(err) == _err_tail(q.err)


@pytest.mark.parametrize("form", [
    "file:{p}", 'json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{p}"}}}}',
    "--image-opts driver=qcow2,file.filename={p}",
    "--image-opts file.filename={p},file.locking=off",
])
def test_filenames_with_protocols(src, form):
    p = src / "d.qcow2"
    spec = form.format(p=p).split(" ")
    for argv in (["info"], ["check"], ["map", "--output=json"], ["snapshot", "-l"]):
        rc, out, err = engine(*argv, *spec, catch_exit=True)
        r = qemu_img(*argv, *spec)
        assert rc == r.rc == 0, (argv, err, r.err)
        assert out == r.out
    rc, out, _ = engine("compare", *spec, spec[-1], catch_exit=True)
    assert rc == 0 and out == "Images are identical.\n"


@pytest.mark.parametrize("name", ["foo:bar", "nbd://localhost:1/x",
                                  'json:{"driver":"qcow2","file":{"driver":"file",'
                                  '"filename":"d.qcow2"},"bogus":1}'])
def test_other_protocols_are_refused_like_qemu(src, name):
    rc, _, err = engine("info", name, cwd=src, catch_exit=True)
    r = qemu_img("info", name, cwd=src)
    assert rc == r.rc == 1
    if name.startswith("nbd"):      # qemu-img has an NBD client (and fails to connect)
        assert _err_tail(err) == "Could not open '%s': Unknown protocol 'nbd'" % name
    else:
        assert _err_tail(err) == _err_tail(r.err)


def test_convert_into_null_co(src):
    for extra in ([], ["--target-is-zero"]):
        rc, _, err = engine("convert", "-n", *extra, "-O", "raw", src / "d.qcow2", "null-co://",
                            catch_exit=True)
        assert rc == qemu_img("convert", "-n", *extra, "-O", "raw", src / "d.qcow2",
                              "null-co://").rc == 0, err
    rc, _, err = engine("convert", "-O", "raw", src / "d.qcow2", "null-co://", catch_exit=True)
    r = qemu_img("convert", "-O", "raw", src / "d.qcow2", "null-co://")
    assert rc == r.rc == 1 and _err_tail(err) == _err_tail(r.err)


@pytest.mark.parametrize("argv", [
    ["check", "-T", "{c}", "@"], ["convert", "-t", "{c}", "-O", "raw", "@", "@out"],
    ["convert", "-T", "{c}", "-O", "raw", "@", "@out"], ["compare", "-T", "{c}", "@", "@"],
    ["rebase", "-u", "-t", "{c}", "-b", "", "@copy"],
    ["amend", "-t", "{c}", "-o", "lazy_refcounts=off", "@copy"],
])
def test_cache_modes(src, tmp_path, argv):
    shutil.copy(src / "d.qcow2", tmp_path / "copy.qcow2")

    def fill(c, out):
        return [a.format(c=c).replace("@out", str(tmp_path / out))
                .replace("@copy", str(tmp_path / "copy.qcow2")).replace("@", str(src / "d.qcow2"))
                for a in argv]
    for c in ("none", "writeback", "writethrough", "directsync", "unsafe"):
        rc, _, err = engine(*fill(c, "e.raw"), catch_exit=True)
        assert rc == qemu_img(*fill(c, "q.raw")).rc == 0, (c, err)
    rc, _, err = engine(*fill("bogus", "e.raw"), catch_exit=True)
    r = qemu_img(*fill("bogus", "q.raw"))
    assert rc == r.rc != 0 and _err_tail(err) == _err_tail(r.err)


def test_progress_lines_like_qemu_img(src, tmp_path):
    rc, out, _ = engine("convert", "-p", "-O", "raw", src / "d.qcow2", tmp_path / "e.raw",
                        catch_exit=True)
    r = qemu_img("convert", "-p", "-O", "raw", src / "d.qcow2", tmp_path / "q.raw")
    assert rc == r.rc == 0
    line = r"    \(\d{1,3}\.\d\d/100%\)\n"
    # (the qemu-img helper reads text with universal newlines: its \r arrive as \n)
    for text in (out.replace("\r\n", "\n").replace("\r", "\n"), r.out):
        assert re.fullmatch("(%s)+" % line, text), repr(text)
        assert text.startswith("    (0.00/100%)\n")
        assert text.endswith("    (100.00/100%)\n    (100.00/100%)\n")
    assert "\r" in out


@pytest.mark.parametrize("verb", ["info", "check", "convert", "dd", "bench", "create", "map"])
def test_help_per_verb(verb):
    rc, out, _ = engine(verb, "--help", catch_exit=True)
    assert rc == 0
    syntax = [l for l in out.splitlines() if l.startswith("  %s " % verb)]
    assert syntax, out


@pytest.mark.parametrize("argv", [
    ["rebase", "-c", "-u", "-b", "x", "{src}"], ["info", "--frob", "{src}"],
    ["convert", "-O"], ["create", "-f"], ["check", "-r"], ["map", "--output"],
])
def test_option_errors_in_qemu_img_words(src, argv):
    """An unknown option or one missing its argument: qemu-img's getopt wording (its first
    line; qemu-img adds "Try 'qemu-img --help'"), exit 1, nothing changed."""
    img = src / "d.qcow2"
    argv = [a.replace("{src}", str(img)) for a in argv]
    before = file_sha256(img)
    rc, out, err = engine(*argv, catch_exit=True)
    r = qemu_img(*argv)
    assert rc == r.rc == 1, (err, r.err)
    assert err.count("\n") == 1
    assert err.split(": ", 1)[1].strip() == r.err.splitlines()[0].split(": ", 1)[1], (err, r.err)
    assert file_sha256(img) == before
