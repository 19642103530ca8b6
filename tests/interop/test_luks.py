"""LUKS-encrypted qcow2 (encrypt.format=luks): images made by qemu-img read and written by
us, images we make read and written by qemu-io, secrets from --object, one-line errors."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.helpers.engine import engine
from tests.helpers.crypto import (PASS, SECRET, encrypted_backing_chain, opts, ours_raw,
                                  qemu_check, qemu_raw,
                                  qemu_io_secret as qemu_io_luks)
from tests.helpers.qemu import qemu_img, run


def qemu_make(path, size="4M"):
    # encrypt.iter-time keeps the key slot cheap to open in a test; QEMU's measurement of
    # so short a time now and then gives up ("Unable to get accurate CPU usage"): again
    for _ in range(5):
        rc, _, err = qemu_img("create", "-f", "qcow2", "--object", SECRET, "-o",
                              "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50",
                              str(path), size)
        if "accurate CPU usage" not in err:
            break
    assert rc == 0, err


@pytest.fixture(scope="module")
def qemu_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("luks")
    img = d / "q.qcow2"
    qemu_make(img)
    r = qemu_io_luks(img, "write -P 0x5a 0 1M", "write -P 0x11 1536 512",
                     "write -P 0x77 3M 100k")
    assert r.rc == 0, r.err
    return img


def test_sector_cipher_matches_cryptography_xts():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from qcow2engine.image.luks import SectorCipher
    for klen in (32, 64):
        key = os.urandom(klen)
        data = os.urandom(512 * 7)
        first = (1 << 33) + 5
        ref = b"".join(Cipher(algorithms.AES(key), modes.XTS((first + i).to_bytes(16, "little")))
                       .encryptor().update(data[i * 512:(i + 1) * 512]) for i in range(7))
        c = SectorCipher(key)
        assert c.encrypt(data, first).tobytes() == ref
        assert c.decrypt(ref, first).tobytes() == data


def test_af_split_merge_roundtrip():
    from qcow2engine.image.luks import af_merge, af_split
    key = os.urandom(64)
    m = af_split(key, 4000, "sha256")
    assert len(m) == 64 * 4000
    assert af_merge(m, 64, 4000, "sha256") == key
    assert af_merge(m[:-1] + bytes([m[-1] ^ 1]), 64, 4000, "sha256") != key


def test_read_qemu_image(qemu_image, tmp_path):
    ref = qemu_raw(qemu_image, tmp_path / "ref.raw")
    assert ref[1536:2048] == b"\x11" * 512 and ref[3 << 20] == 0x77
    assert ours_raw(qemu_image, str(tmp_path / "ours.raw")) == ref
    rc, out, err = engine("compare", "--object", SECRET, "--image-opts", opts(qemu_image),
                          "driver=raw,file.filename=%s" % (tmp_path / "ref.raw"))
    assert rc == 0, out + err
    rc, out, err = engine("io", "--object", SECRET, "--image-opts", opts(qemu_image), "-r",
                          "-c", "read -P 0x77 3M 100k", "-c", "read -P 0x11 1536 512")
    assert rc == 0 and "Pattern verification failed" not in out, out + err
    rc, out, err = engine("map", "--output=json", "--object", SECRET, "--image-opts",
                          opts(qemu_image))
    rc2, qout, qerr = qemu_img("map", "--output=json", "--object", SECRET, "--image-opts",
                               opts(qemu_image))
    assert rc == rc2 == 0 and out == qout, err + qerr
    # the secret from a file, and a json: filename
    sf = tmp_path / "pw"
    sf.write_text(PASS)
    rc, _, err = engine("convert", "-O", "raw", "--object", "secret,id=s1,file=%s" % sf,
                        'json:{"driver":"qcow2","file":{"filename":"%s"},'
                        '"encrypt":{"key-secret":"s1"}}' % qemu_image, tmp_path / "j.raw")
    assert rc == 0, err
    assert open(tmp_path / "j.raw", "rb").read() == ref


def test_errors(qemu_image, tmp_path):
    out = tmp_path / "x.raw"
    rc, _, err = engine("convert", "-O", "raw", qemu_image, out)
    assert rc == 1
    assert err == ("qcow2engine: Could not open '%s': Parameter 'encrypt.key-secret' is "
                   "required for cipher\n" % qemu_image)
    rc, _, err = engine("convert", "-O", "raw", "--object", "secret,id=sec0,data=wrong",
                        "--image-opts", opts(qemu_image), out)
    assert rc == 1
    assert err == ("qcow2engine: Could not open '%s': Invalid password, cannot unlock any "
                   "keyslot\n" % qemu_image)
    rc, _, err = engine("io", "--image-opts", opts(qemu_image, "nope"), "-c", "read 0 512")
    assert rc == 1
    assert err == "qcow2engine: Could not open '%s': No secret with id 'nope'\n" % qemu_image
    rc, _, err = engine("info", "--object", "secret,id=a", qemu_image)
    assert rc == 1 and err.count("\n") == 1 and "data" in err


def _pattern(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_write_qemu_image(tmp_path):
    img = tmp_path / "w.qcow2"
    qemu_make(img, "8M")
    assert qemu_io_luks(img, "write -P 0x5a 0 1M").rc == 0
    blob = tmp_path / "blob"
    blob.write_bytes(_pattern(200000, 1))
    # unaligned writes (read-modify-write of sectors), copy-on-write fills into new
    # clusters, in-place rewrites, zeroes and discards
    cmds = ["write -P 0x42 1000 3000", "write -P 0x43 2M 70000", "write -P 0x44 65537 10",
            "write -z 4M 128k", "discard 1M 64k", "write -P 0x45 7M 1M"]
    args = []
    for c in cmds:
        args += ["-c", c]
    rc, out, err = engine("io", "--object", SECRET, "--image-opts", opts(img), *args)
    assert rc == 0, out + err
    ref = tmp_path / "ref.qcow2"
    rc, _, err = qemu_img("create", "-f", "raw", str(ref), "8M")
    assert rc == 0, err
    r = run("qemu-io", "-f", "raw", str(ref), *sum((["-c", c] for c in
            ["write -P 0x5a 0 1M"] + cmds), []), check=False)
    assert r.rc == 0, r.err
    got = qemu_raw(img, tmp_path / "got.raw")
    assert got == open(ref, "rb").read()
    qemu_check(img)


def test_create_ours_used_by_qemu(tmp_path):
    img = tmp_path / "o.qcow2"
    rc, out, err = engine("create", "-f", "qcow2", "--object", SECRET, "-o",
                          "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                          img, "6M")
    assert rc == 0, err
    assert out.startswith("Formatting '%s', fmt=qcow2 encrypt.format=luks" % img)
    rc, qout, qerr = qemu_img("info", "--output=json", str(img))
    assert rc == 0, qerr
    import json
    enc = json.loads(qout)["format-specific"]["data"]["encrypt"]
    assert (enc["format"], enc["cipher-alg"], enc["cipher-mode"], enc["ivgen-alg"],
            enc["hash-alg"]) == ("luks", "aes-256", "xts", "plain64", "sha256")
    assert enc["slots"][0]["active"] and enc["slots"][0]["stripes"] == 4000
    assert enc["master-key-iters"] >= 1000
    qemu_check(img)
    # qemu writes into our image, we read it; we write, qemu reads
    assert qemu_io_luks(img, "write -P 0x61 0 100k", "write -P 0x62 5M 4k").rc == 0
    rc, out, err = engine("io", "--object", SECRET, "--image-opts", opts(img),
                          "-c", "read -P 0x61 0 100k", "-c", "read -P 0x62 5M 4k",
                          "-c", "write -P 0x63 1M 512", "-c", "write -P 0x64 99k 2k")
    assert rc == 0 and "Pattern verification failed" not in out, out + err
    r = qemu_io_luks(img, "read -P 0x63 1M 512", "read -P 0x61 0 99k", "read -P 0x64 99k 2k",
                     "read -P 0 101k 64k")
    assert r.rc == 0 and "Pattern verification failed" not in r.out, r.out + r.err
    qemu_check(img)
    assert ours_raw(img, str(tmp_path / "a.raw")) == qemu_raw(img, tmp_path / "b.raw")
    r = qemu_io_luks(img, "read 0 512", secret="secret,id=sec0,data=wrong")
    assert r.rc != 0 and "Invalid password" in r.err


def test_session_api_and_base64_secret(qemu_image, tmp_path):
    import base64
    from qcow2engine.chain.session import Session
    from qcow2engine.host.secrets import Secrets, from_objects
    ref = qemu_raw(qemu_image, tmp_path / "ref.raw")
    sec = Secrets({"k": PASS})
    sec.set_key_secret(str(qemu_image), "k")
    with Session(secrets=sec) as s:
        chain = s.open_chain(str(qemu_image))
        assert chain.read(0, len(ref)) == ref
        chain.close()
    b64 = base64.b64encode(PASS.encode()).decode()
    sec = from_objects(["secret,id=b,data=%s,format=base64" % b64])
    assert sec.get("b") == PASS.encode()
    sec.set_key_secret(str(qemu_image), "b")
    with Session(secrets=sec) as s:
        chain = s.open_chain(str(qemu_image))
        assert chain.read(3 << 20, 4096) == b"\x77" * 4096
        chain.close()
    from qcow2engine import api
    with api.open_chain(str(qemu_image), passphrase=PASS) as chain:
        assert chain.read(0, 4096) == ref[:4096]
    from qcow2engine.image.luks import UnlockError
    with pytest.raises(UnlockError, match="Invalid password, cannot unlock any keyslot"):
        api.open_chain(str(qemu_image), passphrase="wrong")


def test_convert_to_encrypted_and_resize(tmp_path):
    src = tmp_path / "src.raw"
    data = bytearray(_pattern(3 << 20, 7))
    data[1 << 20:2 << 20] = bytes(1 << 20)
    src.write_bytes(bytes(data))
    dst = tmp_path / "c.qcow2"
    rc, _, err = engine("convert", "-O", "qcow2", "--object", SECRET, "-o",
                        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                        src, dst)
    assert rc == 0, err
    assert qemu_raw(dst, tmp_path / "back.raw") == bytes(data)
    qemu_check(dst)
    rc, out, err = engine("resize", "--object", SECRET, "--image-opts", opts(dst), "+1M")
    assert rc == 0, err
    r = qemu_io_luks(dst, "write -P 0x21 3M 1M", "read -P 0x21 3M 1M")
    assert r.rc == 0 and "failed" not in r.out, r.out + r.err
    qemu_check(dst)
    rc, _, err = engine("convert", "-c", "-O", "qcow2", "--object", SECRET, "-o",
                        "encrypt.format=luks,encrypt.key-secret=sec0", src, tmp_path / "z.qcow2")
    assert rc == 1 and err == "qcow2engine: Compression is not supported with encryption\n"


def test_measure_like_qemu(qemu_image):
    o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
    for args in (["--size", "100M"], ["--size", "10G"],
                 ["--image-opts", opts(qemu_image)]):
        for _ in range(5):       # QEMU's iteration benchmark now and then gives up
            q = qemu_img("measure", "--output=json", "-O", "qcow2", "--object", SECRET, "-o", o,
                         *args)
            if "accurate CPU usage" not in q.err:
                break
        assert q.rc == 0, q.err
        ours = engine("measure", "--output=json", "-O", "qcow2", "--object", SECRET, "-o", o,
                      *args)
        assert ours[0] == 0 and ours[1] == q.out, ours[2]
    rc, _, err = engine("measure", "-O", "qcow2", "--size", "1M", "-o", "encrypt.format=luks")
    assert rc == 1
    assert err == "qcow2engine: Parameter 'encrypt.key-secret' is required for cipher\n"


def test_internal_snapshots(tmp_path):
    img = tmp_path / "s.qcow2"
    qemu_make(img)
    assert qemu_io_luks(img, "write -P 0x5a 0 192k").rc == 0
    rc, _, err = engine("snapshot", "-c", "s1", img)
    assert rc == 1 and "encrypt.key-secret" in err
    rc, _, err = engine("snapshot", "--object", SECRET, "--image-opts", opts(img), "-c", "s1")
    assert rc == 0, err
    assert qemu_io_luks(img, "write -P 0x99 64k 64k").rc == 0
    q = qemu_img("convert", "-l", "s1", "-O", "raw", "--object", SECRET, "--image-opts",
                 opts(img), str(tmp_path / "q.raw"))
    assert q.rc == 0, q.err
    rc, _, err = engine("convert", "-l", "s1", "-O", "raw", "--object", SECRET,
                        "--image-opts", opts(img), tmp_path / "o.raw")
    assert rc == 0, err
    snap = open(tmp_path / "o.raw", "rb").read()
    assert snap == open(tmp_path / "q.raw", "rb").read() and snap[:192 << 10] == b"\x5a" * (192 << 10)
    qemu_check(img)
    rc, _, err = engine("snapshot", "--object", SECRET, "--image-opts", opts(img), "-a", "s1")
    assert rc == 0, err
    assert qemu_raw(img, tmp_path / "a.raw") == snap
    qemu_check(img)


def test_encrypted_backing_file_and_commit(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_make(base)
    assert qemu_io_luks(base, "write -P 0x5a 0 1M").rc == 0
    top, chain, want = encrypted_backing_chain(base, tmp_path)
    rc, _, err = engine("convert", "-O", "raw", "--object", SECRET, "--image-opts", chain,
                        tmp_path / "o.raw")
    assert rc == 0, err
    assert open(tmp_path / "o.raw", "rb").read() == want
    rc, _, err = engine("convert", "-O", "raw", "--object", SECRET, top, tmp_path / "x.raw")
    assert rc == 1 and err == ("qcow2engine: Could not open '%s': Could not open backing file: "
                               "Parameter 'encrypt.key-secret' is required for cipher\n" % top)
    rc, out, err = engine("commit", "--object", SECRET, "--image-opts", chain)
    assert rc == 0, err
    assert qemu_raw(base, tmp_path / "b.raw") == want
    qemu_check(base)
