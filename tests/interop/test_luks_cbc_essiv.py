"""LUKS with AES-CBC and ESSIV (sha256) or plain64 IVs: images qemu-img makes with
encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256 read and
written by us, ours read and written by qemu-io, key slots amended."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.helpers.engine import engine
from tests.helpers.qemu import qemu_img, run

SECRET = "secret,id=sec0,data=abc"
NEW = "secret,id=sec1,data=xyz"
ESSIV = "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256"


def opts(path, key="sec0"):
    return "driver=qcow2,file.filename=%s,encrypt.key-secret=%s" % (path, key)


def qemu_io(path, *cmds, key="sec0"):
    return run("qemu-io", "--object", SECRET, "--object", NEW, "--image-opts", opts(path, key),
               *sum((["-c", c] for c in cmds), []), check=False)


def io_ok(r):
    rc, out, err = r if isinstance(r, tuple) else (r.rc, r.out, r.err)
    assert rc == 0 and "Pattern verification failed" not in out, out + err


def qemu_make(path, extra, size="4M"):
    for _ in range(6):       # QEMU's PBKDF2 benchmark of a short iter-time may give up
        r = qemu_img("create", "-f", "qcow2", "--object", SECRET, "-o",
                     "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50," + extra,
                     str(path), size)
        if "accurate CPU usage" not in r.err:
            break
    assert r.rc == 0, r.err


def raw_of(tool, path, out):
    r = tool("convert", "-O", "raw", "--object", SECRET, "--image-opts", opts(path), str(out))
    assert r[0] == 0, r[2]
    return open(out, "rb").read()


def test_cbc_cipher_matches_cryptography():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from qcow2engine.image.luks import CbcCipher
    data = os.urandom(512 * 5)
    first = (1 << 34) + 9
    for klen in (16, 24, 32):
        key = os.urandom(klen)
        essiv = Cipher(algorithms.AES(hashlib.sha256(key).digest()), modes.ECB()).encryptor()
        for ivgen in ("plain64", "essiv"):
            ivs = [(first + i).to_bytes(16, "little") for i in range(5)]
            if ivgen == "essiv":
                ivs = [essiv.update(iv) for iv in ivs]
            ref = b"".join(Cipher(algorithms.AES(key), modes.CBC(ivs[i])).encryptor()
                           .update(data[i * 512:(i + 1) * 512]) for i in range(5))
            c = CbcCipher(key, ivgen, "sha256" if ivgen == "essiv" else None)
            assert c.encrypt(data, first).tobytes() == ref
            assert c.decrypt(ref, first).tobytes() == data


@pytest.mark.parametrize("extra", [ESSIV, ESSIV + ",encrypt.cipher-alg=aes-128",
                                   "encrypt.cipher-mode=cbc"])
def test_qemu_image_read_and_written(tmp_path, extra):
    img = tmp_path / "q.qcow2"
    qemu_make(img, extra)
    io_ok(qemu_io(img, "write -P 0x5a 0 1M", "write -P 0x11 1536 512", "write -P 0x77 3M 100k"))
    ref = raw_of(qemu_img, img, tmp_path / "ref.raw")
    assert ref[1536:2048] == b"\x11" * 512 and ref[3 << 20] == 0x77
    assert raw_of(engine, img, tmp_path / "ours.raw") == ref
    io_ok(engine("io", "--object", SECRET, "--image-opts", opts(img),
                 "-c", "write -P 0x42 1000 3000", "-c", "write -P 0x43 2M 70000",
                 "-c", "read -P 0x77 3M 100k"))
    io_ok(qemu_io(img, "read -P 0x42 1000 3000", "read -P 0x43 2M 70000", "read -P 0x5a 0 1000",
                  "read -P 0x77 3M 100k", "read -P 0 2167152 10000"))
    rc, out, err = qemu_img("check", "--object", SECRET, "--image-opts", opts(img))
    assert rc == 0 and "No errors were found" in out, out + err


def test_ours_used_by_qemu_and_amended(tmp_path):
    img = tmp_path / "o.qcow2"
    rc, out, err = engine("create", "-f", "qcow2", "--object", SECRET, "-o",
                          "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,"
                          + ESSIV, img, "4M")
    assert rc == 0, err
    enc = json.loads(qemu_img("info", "--output=json", str(img)).out)["format-specific"]["data"]["encrypt"]
    assert (enc["cipher-alg"], enc["cipher-mode"], enc["ivgen-alg"], enc["ivgen-hash-alg"]) == \
        ("aes-256", "cbc", "essiv", "sha256")
    io_ok(qemu_io(img, "write -P 0x61 0 100k", "write -P 0x62 3M 4k"))
    io_ok(engine("io", "--object", SECRET, "--image-opts", opts(img), "-c", "read -P 0x61 0 100k",
                 "-c", "read -P 0x62 3M 4k", "-c", "write -P 0x63 1M 512"))
    io_ok(qemu_io(img, "read -P 0x63 1M 512", "read -P 0x61 0 100k"))
    # a key slot added by us opens in qemu (slot material under cbc-essiv too)
    rc, _, err = engine("amend", "--object", SECRET, "--object", NEW, "--image-opts", "-o",
                        "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10",
                        opts(img))
    assert rc == 0, err
    io_ok(qemu_io(img, "read -P 0x63 1M 512", key="sec1"))
    rc, out, err = qemu_img("check", "--object", SECRET, "--image-opts", opts(img))
    assert rc == 0 and "No errors were found" in out, out + err
    assert raw_of(engine, img, tmp_path / "a.raw") == raw_of(qemu_img, img, tmp_path / "b.raw")


def test_unsupported_refused_in_one_line(tmp_path):
    rc, _, err = engine("create", "-f", "qcow2", "--object", SECRET, "-o",
                        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-mode=xts,"
                        "encrypt.ivgen-alg=essiv", tmp_path / "x.qcow2", "1M")
    assert rc == 1 and err.count("\n") == 1 and "essiv" in err
    rc, _, err = engine("create", "-f", "qcow2", "--object", SECRET, "-o",
                        "encrypt.format=luks,encrypt.key-secret=sec0," + ESSIV.replace(
                            "sha256", "sha1"), tmp_path / "x.qcow2", "1M")
    assert rc == 1 and err.count("\n") == 1 and "sha1" in err
