"""What the encrypted-image tests share (LUKS, legacy AES): the test secret, the
--image-opts string that names it, and QEMU's and our raw conversions and check of an
encrypted image."""
from __future__ import annotations

from tests.helpers.engine import engine
from tests.helpers.qemu import qemu_img, run

PASS = "abc"
SECRET = "secret,id=sec0,data=%s" % PASS


def opts(path, key="sec0"):
    return "driver=qcow2,file.filename=%s,encrypt.key-secret=%s" % (path, key)


def qemu_io_secret(path, *cmds, secret=SECRET):
    """qemu-io on the encrypted image, unlocked with secret."""
    argv = ["qemu-io", "--object", secret, "--image-opts", opts(path)]
    for c in cmds:
        argv += ["-c", c]
    return run(*argv, check=False)


def qemu_raw(path, out, snapshot=None):
    args = ["-l", snapshot] if snapshot else []
    rc, _, err = qemu_img("convert", *args, "-O", "raw", "--object", SECRET, "--image-opts",
                          opts(path), str(out))
    assert rc == 0, err
    return open(out, "rb").read()


def ours_raw(path, out, snapshot=None):
    args = ["-l", snapshot] if snapshot else []
    rc, _, err = engine("convert", *args, "-O", "raw", "--object", SECRET, "--image-opts",
                        opts(path), out)
    assert rc == 0, err
    return open(out, "rb").read()


def qemu_check(path):
    rc, out, err = qemu_img("check", "--object", SECRET, "--image-opts", opts(path))
    assert rc == 0, out + err
    assert "No errors were found" in out


def encrypted_backing_chain(base, tmp_path):
    """A plain overlay top.qcow2 on the encrypted image base, written by qemu-io through the
    chain: (top, the chain's --image-opts string, the chain's guest view as qemu-img
    converts it)."""
    top = tmp_path / "top.qcow2"
    assert qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", "-u", str(top),
                    "4M").rc == 0
    chain = "driver=qcow2,file.filename=%s,backing.encrypt.key-secret=sec0" % top
    r = run("qemu-io", "--object", SECRET, "--image-opts", chain, "-c", "write -P 0x44 2M 64k",
            "-c", "write -P 0x45 100k 3k", check=False)
    assert r.rc == 0, r.err
    q = qemu_img("convert", "-O", "raw", "--object", SECRET, "--image-opts", chain,
                 str(tmp_path / "q.raw"))
    assert q.rc == 0, q.err
    return top, chain, open(tmp_path / "q.raw", "rb").read()
