"""Legacy qcow2 AES encryption (crypt method 1, encrypt.format=aes or encryption=on): images
qemu-img makes read and written by us, images we make read and written by qemu-io, every verb
through the same cipher hook as LUKS, qemu-img's errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.helpers.engine import engine
from tests.helpers.crypto import (PASS, SECRET, encrypted_backing_chain, opts, ours_raw,
                                  qemu_check, qemu_raw,
                                  qemu_io_secret as qemu_io_aes)
from tests.helpers.qemu import qemu_img, run


def qemu_make(path, size="4M", extra=""):
    rc, _, err = qemu_img("create", "-f", "qcow2", "--object", SECRET, "-o",
                          "encrypt.format=aes,encrypt.key-secret=sec0" + extra, str(path), size)
    assert rc == 0, err


def io_ok(r):
    rc, out, err = r
    assert rc == 0 and "Pattern verification failed" not in out, out + err


def _pattern(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def qemu_image(tmp_path_factory):
    img = tmp_path_factory.mktemp("aes") / "q.qcow2"
    qemu_make(img)
    r = qemu_io_aes(img, "write -P 0x5a 0 1M", "write -P 0x11 1536 512",
                    "write -P 0x77 3M 100k")
    assert r.rc == 0, r.err
    return img


def test_cipher_matches_cbc_per_sector_with_guest_iv():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from qcow2engine.image.qcowaes import QcowAesCipher, qcow_key
    assert qcow_key(b"abc") == b"abc" + bytes(13)
    assert qcow_key(b"0123456789abcdefXYZ") == b"0123456789abcdef"
    key = os.urandom(16)
    data = os.urandom(512 * 9)
    first = (1 << 35) + 3
    ref = b"".join(Cipher(algorithms.AES(key), modes.CBC((first + i).to_bytes(16, "little")))
                   .encryptor().update(data[i * 512:(i + 1) * 512]) for i in range(9))
    c = QcowAesCipher(key)
    assert c.guest_iv
    assert c.encrypt(data, first).tobytes() == ref
    assert c.decrypt(ref, first).tobytes() == data
    assert c.decrypt(ref, first + 1).tobytes() != data


def test_qemu_uses_guest_offsets(qemu_image):
    """The raw file: a cluster QEMU wrote at guest offset 3M decrypts with IV 3M/512."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from qcow2engine.image.qcow2 import Qcow2Image
    img = Qcow2Image(str(qemu_image))
    try:
        l2 = img.read_l2(int(img.l1_table[0]) & 0x00FFFFFFFFFFFE00)
        host = int(l2[(3 << 20) >> 16]) & 0x00FFFFFFFFFFFE00
        assert host and host != 3 << 20
        raw = img.pread(512, host)
    finally:
        img.close()
    key = PASS.encode().ljust(16, b"\0")
    for sector, want in (((3 << 20) // 512, True), (host // 512, False)):
        d = Cipher(algorithms.AES(key), modes.CBC(sector.to_bytes(16, "little"))) \
            .decryptor().update(raw)
        assert (d == b"\x77" * 512) is want


def test_read_qemu_image(qemu_image, tmp_path):
    ref = qemu_raw(qemu_image, tmp_path / "ref.raw")
    assert ref[1536:2048] == b"\x11" * 512 and ref[3 << 20] == 0x77
    assert ours_raw(qemu_image, str(tmp_path / "ours.raw")) == ref
    rc, out, err = engine("compare", "--object", SECRET, "--image-opts", opts(qemu_image),
                          "driver=raw,file.filename=%s" % (tmp_path / "ref.raw"))
    assert rc == 0, out + err
    io_ok(engine("io", "--object", SECRET, "--image-opts", opts(qemu_image), "-r",
                 "-c", "read -P 0x77 3M 100k", "-c", "read -P 0x11 1536 512"))
    for fmt in ("json", "human"):
        ours = engine("map", "--output=" + fmt, "--object", SECRET, "--image-opts",
                      opts(qemu_image))
        q = qemu_img("map", "--output=" + fmt, "--object", SECRET, "--image-opts",
                     opts(qemu_image))
        assert (ours[0], ours[1]) == (q.rc, q.out), ours[2] + q.err
        assert ours[2] == q.err.replace("qemu-img:", "qcow2engine:")
    for tool, out in ((engine, tmp_path / "dd.raw"), (qemu_img, tmp_path / "qdd.raw")):
        r = tool("dd", "--object", SECRET, "--image-opts", "if=%s" % opts(qemu_image),
                 "of=%s" % out, "bs=64k", "count=8", "skip=1")
        assert r[0] == 0, r[2]
    assert open(tmp_path / "dd.raw", "rb").read() == open(tmp_path / "qdd.raw", "rb").read() \
        == ref[64 << 10:512 << 10]
    # the API: the passphrase of the top image
    from qcow2engine import api
    with api.open_chain(str(qemu_image), passphrase=PASS) as chain:
        assert chain.read(0, len(ref)) == ref
    # no key check in this format: a wrong passphrase reads as noise, as in QEMU
    rc, out, err = engine("io", "--object", "secret,id=sec0,data=wrong", "--image-opts",
                          opts(qemu_image), "-r", "-c", "read -P 0x77 3M 512")
    r = qemu_io_aes(qemu_image, "read -P 0x77 3M 512", secret="secret,id=sec0,data=wrong")
    assert "Pattern verification failed" in r.out and "Pattern verification failed" in out
    assert rc == r.rc, err


def test_errors(qemu_image, tmp_path):
    out = tmp_path / "x.raw"
    rc, _, err = engine("convert", "-O", "raw", qemu_image, out)
    q = qemu_img("convert", "-O", "raw", str(qemu_image), str(out))
    assert rc == q.rc == 1
    assert err == ("qcow2engine: Could not open '%s': Parameter 'encrypt.key-secret' is "
                   "required for cipher\n" % qemu_image)
    assert q.err.replace("qemu-img", "qcow2engine") == err
    rc, _, err = engine("io", "--image-opts", opts(qemu_image, "nope"), "-c", "read 0 512")
    assert rc == 1
    assert err == "qcow2engine: Could not open '%s': No secret with id 'nope'\n" % qemu_image
    # QEMU takes the passphrase as UTF-8 text (no NUL)
    for bad in (b"ab\xffc", b"ab\0cd"):
        sf = tmp_path / "bad"
        sf.write_bytes(bad)
        obj = "secret,id=s9,file=%s" % sf
        rc, _, err = engine("io", "--object", obj, "--image-opts", opts(qemu_image, "s9"),
                            "-c", "read 0 512")
        assert rc == 1 and err == ("qcow2engine: Could not open '%s': Data from secret s9 is "
                                   "not valid UTF-8\n" % qemu_image)
        q = qemu_img("create", "-f", "qcow2", "--object", obj, "-o",
                     "encrypt.format=aes,encrypt.key-secret=s9", str(tmp_path / "b.qcow2"), "1M")
        rc, out, err = engine("create", "-f", "qcow2", "--object", obj, "-o",
                              "encrypt.format=aes,encrypt.key-secret=s9", tmp_path / "b.qcow2",
                              "1M")
        assert q.rc == rc == 1 and err == q.err.replace("qemu-img:", "qcow2engine:")
    # info and check need no key
    rc, out, err = engine("info", "--output=json", qemu_image)
    q = qemu_img("info", "--output=json", str(qemu_image))
    assert rc == 0 and json.loads(out)["format-specific"] == \
        json.loads(q.out)["format-specific"], err
    assert json.loads(out)["encrypted"] is True
    rc, out, err = engine("check", qemu_image)
    assert rc == 0 and "No errors were found" in out, err


def test_write_qemu_image(tmp_path):
    img = tmp_path / "w.qcow2"
    qemu_make(img, "8M")
    assert qemu_io_aes(img, "write -P 0x5a 0 1M").rc == 0
    # unaligned writes (read-modify-write of sectors), copy-on-write fills into new
    # clusters, in-place rewrites, zeroes and discards
    cmds = ["write -P 0x42 1000 3000", "write -P 0x43 2M 70000", "write -P 0x44 65537 10",
            "write -z 4M 128k", "discard 1M 64k", "write -P 0x45 7M 1M"]
    rc, out, err = engine("io", "--object", SECRET, "--image-opts", opts(img),
                          *sum((["-c", c] for c in cmds), []))
    assert rc == 0, out + err
    ref = tmp_path / "ref.raw"
    assert qemu_img("create", "-f", "raw", str(ref), "8M").rc == 0
    r = run("qemu-io", "-f", "raw", str(ref), *sum((["-c", c] for c in
            ["write -P 0x5a 0 1M"] + cmds), []), check=False)
    assert r.rc == 0, r.err
    assert qemu_raw(img, tmp_path / "got.raw") == open(ref, "rb").read()
    qemu_check(img)


@pytest.mark.parametrize("spelling", ["encrypt.format=aes,encrypt.key-secret=sec0",
                                      "encryption=on,encrypt.key-secret=sec0,compat=0.10"])
def test_create_ours_used_by_qemu(tmp_path, spelling):
    img = tmp_path / "o.qcow2"
    rc, out, err = engine("create", "-f", "qcow2", "--object", SECRET, "-o", spelling, img, "6M")
    assert rc == 0, err
    q = qemu_img("create", "-f", "qcow2", "--object", SECRET, "-o", spelling,
                 str(tmp_path / "q.qcow2"), "6M")
    assert q.rc == 0, q.err
    assert out == q.out.replace(str(tmp_path / "q.qcow2"), str(img))
    info = json.loads(qemu_img("info", "--output=json", str(img)).out)
    assert info["encrypted"] and info["format-specific"]["data"]["encrypt"] == {"format": "aes"}
    qemu_check(img)
    assert qemu_io_aes(img, "write -P 0x61 0 100k", "write -P 0x62 5M 4k").rc == 0
    io_ok(engine("io", "--object", SECRET, "--image-opts", opts(img),
                 "-c", "read -P 0x61 0 100k", "-c", "read -P 0x62 5M 4k",
                 "-c", "write -P 0x63 1M 512", "-c", "write -P 0x64 99k 2k",
                 "-c", "write -z 5M 512"))
    r = qemu_io_aes(img, "read -P 0x63 1M 512", "read -P 0x61 0 99k", "read -P 0x64 99k 2k",
                    "read -P 0 101k 64k", "read -P 0 5M 512", "read -P 0x62 5243392 3584")
    assert r.rc == 0 and "Pattern verification failed" not in r.out, r.out + r.err
    qemu_check(img)
    assert ours_raw(img, str(tmp_path / "a.raw")) == qemu_raw(img, tmp_path / "b.raw")


def test_create_refusals_like_qemu(tmp_path):
    cases = ["encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-256",
             "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.iter-time=10",
             "encryption=on,encrypt.format=aes,encrypt.key-secret=sec0",
             "encrypt.format=aes", "encryption=on", "encrypt.key-secret=sec0",
             "encrypt.format=aes,encrypt.key-secret=nope"]
    for o in cases:
        img = tmp_path / "r.qcow2"
        rc, out, err = engine("create", "-f", "qcow2", "--object", SECRET, "-o", o, img, "1M")
        q = qemu_img("create", "-f", "qcow2", "--object", SECRET, "-o", o, str(img), "1M")
        assert rc == q.rc == 1, (o, err, q.err)
        assert out == q.out, o
        assert err == q.err.replace("qemu-img:", "qcow2engine:"), o
    # encryption=off leaves the choice to encrypt.format
    img = tmp_path / "off.qcow2"
    rc, _, err = engine("create", "-f", "qcow2", "--object", SECRET, "-o",
                        "encryption=off,encrypt.format=aes,encrypt.key-secret=sec0", img, "1M")
    assert rc == 0, err
    assert json.loads(qemu_img("info", "--output=json", str(img)).out)["encrypted"]


def test_convert_to_aes_snapshot_resize_commit(tmp_path):
    src = tmp_path / "src.raw"
    data = bytearray(_pattern(3 << 20, 7))
    data[1 << 20:2 << 20] = bytes(1 << 20)
    src.write_bytes(bytes(data))
    dst = tmp_path / "c.qcow2"
    rc, _, err = engine("convert", "-O", "qcow2", "--object", SECRET, "-o",
                        "encrypt.format=aes,encrypt.key-secret=sec0", src, dst)
    assert rc == 0, err
    assert qemu_raw(dst, tmp_path / "back.raw") == bytes(data)
    qemu_check(dst)
    # internal snapshot: the snapshot keeps the clusters at their guest offsets
    rc, _, err = engine("snapshot", "--object", SECRET, "--image-opts", opts(dst), "-c", "s1")
    assert rc == 0, err
    assert qemu_io_aes(dst, "write -P 0x99 64k 64k", "write -P 0x98 1048581 7").rc == 0
    assert ours_raw(dst, str(tmp_path / "s.raw"), "s1") == bytes(data)
    assert qemu_raw(dst, tmp_path / "qs.raw", "s1") == bytes(data)
    rc, _, err = engine("snapshot", "--object", SECRET, "--image-opts", opts(dst), "-a", "s1")
    assert rc == 0, err
    assert qemu_raw(dst, tmp_path / "a.raw") == bytes(data)
    qemu_check(dst)
    rc, _, err = engine("resize", "--object", SECRET, "--image-opts", opts(dst), "+1M")
    assert rc == 0, err
    r = qemu_io_aes(dst, "read -P 0 3M 1M", "write -P 0x21 3M 1M", "read -P 0x21 3M 1M")
    assert r.rc == 0 and "failed" not in r.out, r.out + r.err
    qemu_check(dst)
    # an AES backing file: a plain overlay written by qemu, committed by us
    top, chain, want = encrypted_backing_chain(dst, tmp_path)
    rc, out, err = engine("compare", "--object", SECRET, "--image-opts", chain,
                          "driver=raw,file.filename=%s" % (tmp_path / "q.raw"))
    assert rc == 0, out + err
    rc, out, err = engine("commit", "--object", SECRET, "--image-opts", chain)
    assert rc == 0, err
    assert qemu_raw(dst, tmp_path / "b.raw") == want
    qemu_check(dst)
    rc, _, err = engine("convert", "-c", "-O", "qcow2", "--object", SECRET, "-o",
                        "encrypt.format=aes,encrypt.key-secret=sec0", src, tmp_path / "z.qcow2")
    assert rc == 1 and err == "qcow2engine: Compression is not supported with encryption\n"


def test_measure_like_qemu(qemu_image):
    o = "encrypt.format=aes,encrypt.key-secret=sec0"
    for args in (["--size", "100M"], ["--image-opts", opts(qemu_image)]):
        q = qemu_img("measure", "--output=json", "-O", "qcow2", "--object", SECRET, "-o", o,
                     *args)
        assert q.rc == 0, q.err
        ours = engine("measure", "--output=json", "-O", "qcow2", "--object", SECRET, "-o", o,
                      *args)
        assert ours[0] == 0 and ours[1] == q.out, ours[2]


@pytest.mark.parametrize("enc", ["encrypt.format=aes,encrypt.key-secret=sec0",
                                 "encrypt.format=luks,encrypt.key-secret=sec0,"
                                 "encrypt.iter-time=50"])
def test_external_data_file(tmp_path, enc):
    """Encrypted data in an external data file (LUKS numbers sectors by the data file
    offset, legacy AES by guest offset: both as QEMU)."""
    for maker in ("qemu", "ours"):
        img = tmp_path / ("%s.qcow2" % maker)
        o = enc + ",data_file=%s" % (tmp_path / ("%s.raw" % maker))
        if maker == "qemu":
            for _ in range(6):
                q = qemu_img("create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o,
                             str(img), "2M")
                if "accurate CPU usage" not in q.err:
                    break
            assert q.rc == 0, q.err
        else:
            rc, _, err = engine("create", "-q", "-f", "qcow2", "--object", SECRET, "-o",
                                o.replace("iter-time=50", "iter-time=10"), img, "2M")
            assert rc == 0, err
        assert qemu_io_aes(img, "write -P 0x31 64k 64k", "write -P 0x32 1000 100").rc == 0
        io_ok(engine("io", "--object", SECRET, "--image-opts", opts(img),
                     "-c", "read -P 0x31 64k 64k", "-c", "read -P 0x32 1000 100",
                     "-c", "write -P 0x33 1M 5000", "-c", "write -P 0x34 70000 10"))
        r = qemu_io_aes(img, "read -P 0x33 1M 5000", "read -P 0x34 70000 10",
                        "read -P 0x31 64k 4464", "read -P 0 0 1000")
        assert r.rc == 0 and "Pattern verification failed" not in r.out, r.out + r.err
        raw = open(tmp_path / ("%s.raw" % maker), "rb").read()
        assert b"\x33" * 64 not in raw            # the data file holds ciphertext
        qemu_check(img)
        assert ours_raw(img, str(tmp_path / "a.raw")) == qemu_raw(img, tmp_path / "b.raw")
