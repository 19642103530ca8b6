"""The LUKS1 header of a LUKS-encrypted qcow2 image, for `info` (no decryption).

Layout from the LUKS1 on-disk format specification; the header lives at the offset given by
the qcow2 full-disk-encryption header extension.
"""
from __future__ import annotations

from construct import Array, Bytes, Const, Int16ub, Int32ub, Struct, StreamError, ConstructError

from ..errors import InvalidImageError

LuksKeySlot = Struct(
    "active" / Int32ub,
    "iterations" / Int32ub,
    "salt" / Bytes(32),
    "key_material_offset" / Int32ub,
    "stripes" / Int32ub,
)

LuksHeader = Struct(
    "magic" / Const(b"LUKS\xba\xbe"),
    "version" / Int16ub,
    "cipher_name" / Bytes(32),
    "cipher_mode" / Bytes(32),
    "hash_spec" / Bytes(32),
    "payload_offset" / Int32ub,
    "key_bytes" / Int32ub,
    "mk_digest" / Bytes(20),
    "mk_digest_salt" / Bytes(32),
    "mk_digest_iter" / Int32ub,
    "uuid" / Bytes(40),
    "key_slots" / Array(8, LuksKeySlot),
)
LUKS_HEADER_SIZE = 592
LUKS_KEY_ENABLED = 0x00AC71F3


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("ascii", "replace")


def luks_info(img) -> dict:
    """The QCryptoBlockInfoLUKS document qemu-img info shows under format-specific.encrypt."""
    ext = img.crypto_ext
    if ext is None:
        raise InvalidImageError("Missing CRYPTO header for crypt method 2")
    try:
        h = LuksHeader.parse(img.pread(LUKS_HEADER_SIZE, ext.offset))
    except (StreamError, ConstructError):
        raise InvalidImageError("Invalid LUKS header in the encryption header extension") from None
    name = _cstr(h.cipher_name)
    mode_full = _cstr(h.cipher_mode)
    mode, _, ivgen = mode_full.partition("-")
    ivgen_alg, _, ivgen_hash = ivgen.partition(":")
    key_bits = h.key_bytes * 8 // (2 if mode == "xts" else 1)
    if name in ("aes", "serpent", "twofish"):
        alg = "%s-%d" % (name, key_bits)
    elif name == "cast5":
        alg = "cast5-128"
    else:
        alg = name
    d = {"format": "luks", "cipher-alg": alg, "cipher-mode": mode, "ivgen-alg": ivgen_alg}
    if ivgen_hash:
        d["ivgen-hash-alg"] = ivgen_hash
    d["hash-alg"] = _cstr(h.hash_spec)
    d["payload-offset"] = h.payload_offset * 512
    d["master-key-iters"] = h.mk_digest_iter
    d["uuid"] = _cstr(h.uuid)
    slots = []
    for ks in h.key_slots:
        s = {"active": ks.active == LUKS_KEY_ENABLED}
        if s["active"]:
            s["iters"] = ks.iterations
            s["stripes"] = ks.stripes
        s["key-offset"] = ks.key_material_offset * 512
        slots.append(s)
    d["slots"] = slots
    return d


# ---------------------------------------------------------------- decryption and encryption
# LUKS1 (the on-disk format specification, version 1.2.x): the passphrase is stretched with
# PBKDF2 and the key slot's salt; that key decrypts the slot's key material (sectors numbered
# from 0); the material is the master key split into `stripes` stripes by the anti-forensic
# splitter (merged back with the hash's diffusion); PBKDF2 of the master key with the digest
# salt must equal the header's digest.  qcow2 data is encrypted per 512-byte sector with the
# master key, the sector number being the HOST offset / 512 (docs/interop/qcow2.rst).

import hashlib
import os as _os

import numpy as _np

from ..errors import UnsupportedFeatureError

SECTOR = 512
HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


class UnlockError(InvalidImageError):
    """No key slot opens with the given passphrase."""


def _aes_ecb(key: bytes, decrypt: bool):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    c = Cipher(algorithms.AES(key), modes.ECB())
    return c.decryptor() if decrypt else c.encryptor()


class SectorCipher:
    """AES in XTS mode with plain64 (or plain) sector numbers, for whole 512-byte sectors,
    done with two AES-ECB passes over a whole buffer and the tweaks computed with numpy."""

    def __init__(self, key: bytes, ivgen: str = "plain64"):
        if len(key) not in (32, 64):
            raise UnsupportedFeatureError("Unsupported AES-XTS key size %d" % len(key))
        half = len(key) // 2
        self.master_key = key
        self.k1, self.k2 = key[:half], key[half:]
        self.plain32 = ivgen == "plain"
        self._tweak = _aes_ecb(self.k2, decrypt=False)

    def _tweaks(self, first: int, n: int):
        sec = _np.arange(first, first + n, dtype=_np.uint64)
        if self.plain32:
            sec &= _np.uint64(0xFFFFFFFF)
        iv = _np.zeros((n, 2), "<u8")
        iv[:, 0] = sec
        t = _np.frombuffer(self._tweak.update(iv.tobytes()), "<u8").reshape(n, 2)
        out = _np.empty((n, SECTOR // 16, 2), _np.uint64)
        lo = t[:, 0].astype(_np.uint64)
        hi = t[:, 1].astype(_np.uint64)
        one, s63, poly = _np.uint64(1), _np.uint64(63), _np.uint64(0x87)
        for j in range(SECTOR // 16):
            out[:, j, 0] = lo
            out[:, j, 1] = hi
            carry = hi >> s63
            hi = (hi << one) | (lo >> s63)
            lo = (lo << one) ^ (carry * poly)
        return out

    def _run(self, data, first_sector: int, decrypt: bool):
        buf = _np.frombuffer(memoryview(data).cast("B"), _np.uint8)
        if len(buf) % SECTOR:
            raise ValueError("encrypted I/O must be in whole 512-byte sectors")
        n = len(buf) // SECTOR
        out = _np.empty(len(buf), _np.uint8)
        step = 8192                        # sectors per pass (4 MiB)
        ecb = _aes_ecb(self.k1, decrypt)
        for s in range(0, n, step):
            m = min(step, n - s)
            t = self._tweaks(first_sector + s, m)
            blk = buf[s * SECTOR:(s + m) * SECTOR].view("<u8").reshape(m, SECTOR // 16, 2)
            x = (blk ^ t).tobytes()
            y = _np.frombuffer(ecb.update(x), "<u8").reshape(m, SECTOR // 16, 2)
            out[s * SECTOR:(s + m) * SECTOR] = (y ^ t).view(_np.uint8).reshape(-1)
        return out

    def decrypt(self, data, first_sector: int):
        return self._run(data, first_sector, True)

    def encrypt(self, data, first_sector: int):
        return self._run(data, first_sector, False)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _diffuse(buf: bytes, hname: str) -> bytes:
    ds = hashlib.new(hname).digest_size
    out = []
    for i in range(0, len(buf), ds):
        block = buf[i:i + ds]
        out.append(hashlib.new(hname, (i // ds).to_bytes(4, "big") + block).digest()[:len(block)])
    return b"".join(out)


def af_merge(material: bytes, key_len: int, stripes: int, hname: str) -> bytes:
    d = bytes(key_len)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, material[i * key_len:(i + 1) * key_len]), hname)
    return _xor(d, material[(stripes - 1) * key_len:stripes * key_len])


def af_split(key: bytes, stripes: int, hname: str) -> bytes:
    n = len(key)
    parts = []
    d = bytes(n)
    for _ in range(stripes - 1):
        s = _os.urandom(n)
        parts.append(s)
        d = _diffuse(_xor(d, s), hname)
    parts.append(_xor(d, key))
    return b"".join(parts)


class CbcCipher:
    """AES in CBC mode per 512-byte sector, the IV from the sector number: plain64, plain
    (32 bits) or essiv:HASH (the sector number encrypted with AES-ECB under HASH(key), the
    ESSIV key length being the digest's).  Vectorised over many sectors: decryption is one
    ECB pass and an XOR with the shifted ciphertext; encryption runs the chain one block
    position at a time over every sector at once."""

    guest_iv = False

    def __init__(self, key: bytes, ivgen: str = "plain64", ivhash: str | None = None):
        if len(key) not in (16, 24, 32):
            raise UnsupportedFeatureError("Unsupported AES-CBC key size %d" % len(key))
        self.master_key = key
        self.plain32 = ivgen == "plain"
        self._enc = _aes_ecb(key, decrypt=False)
        self._dec = _aes_ecb(key, decrypt=True)
        self._essiv = None
        if ivgen == "essiv":
            salt = hashlib.new(ivhash, key).digest()
            if len(salt) not in (16, 24, 32):
                raise UnsupportedFeatureError("Unsupported ESSIV hash algorithm '%s'" % ivhash)
            self._essiv = _aes_ecb(salt, decrypt=False)

    def _ivs(self, first: int, n: int):
        sec = _np.arange(first, first + n, dtype=_np.uint64)
        if self.plain32:
            sec &= _np.uint64(0xFFFFFFFF)
        iv = _np.zeros((n, 2), "<u8")
        iv[:, 0] = sec
        if self._essiv is not None:
            iv = _np.frombuffer(self._essiv.update(iv.tobytes()), "<u8").reshape(n, 2)
        return iv

    @staticmethod
    def _bytes(data):
        buf = _np.frombuffer(memoryview(data).cast("B"), _np.uint8)
        if len(buf) % SECTOR:
            raise ValueError("encrypted I/O must be in whole 512-byte sectors")
        return buf

    def decrypt(self, data, first_sector: int):
        buf = self._bytes(data)
        n = len(buf) // SECTOR
        out = _np.empty(len(buf), _np.uint8)
        for s in range(0, n, 8192):
            m = min(8192, n - s)
            c = buf[s * SECTOR:(s + m) * SECTOR]
            d = _np.frombuffer(self._dec.update(c.tobytes()), "<u8").reshape(m, SECTOR // 16, 2)
            d = d.copy()
            cb = c.view("<u8").reshape(m, SECTOR // 16, 2)
            d[:, 1:] ^= cb[:, :-1]
            d[:, 0] ^= self._ivs(first_sector + s, m)
            out[s * SECTOR:(s + m) * SECTOR] = d.view(_np.uint8).reshape(-1)
        return out

    def encrypt(self, data, first_sector: int):
        buf = self._bytes(data)
        n = len(buf) // SECTOR
        out = _np.empty(len(buf), _np.uint8)
        for s in range(0, n, 8192):
            m = min(8192, n - s)
            p = buf[s * SECTOR:(s + m) * SECTOR].view("<u8").reshape(m, SECTOR // 16, 2)
            c = _np.empty((m, SECTOR // 16, 2), "<u8")
            prev = self._ivs(first_sector + s, m)
            for j in range(SECTOR // 16):
                x = _np.ascontiguousarray(p[:, j] ^ prev)
                prev = _np.frombuffer(self._enc.update(x.tobytes()), "<u8").reshape(m, 2)
                c[:, j] = prev
            out[s * SECTOR:(s + m) * SECTOR] = c.view(_np.uint8).reshape(-1)
        return out


def make_cipher(key: bytes, mode: str = "xts", ivgen: str = "plain64", ivhash=None):
    """The sector cipher of a LUKS cipher mode ("xts" or "cbc") and IV generator."""
    if mode == "cbc":
        return CbcCipher(key, ivgen, ivhash)
    return SectorCipher(key, ivgen)


def _check_cipher(h) -> tuple:
    """(key bytes, cipher factory: key -> sector cipher) of a header whose cipher this
    engine handles: aes-xts-plain64/plain, aes-cbc-plain64/plain/essiv:HASH."""
    name, mode = _cstr(h.cipher_name), _cstr(h.cipher_mode)
    hname = _cstr(h.hash_spec)
    cmode, _, ivspec = mode.partition("-")
    ivgen, _, ivhash = ivspec.partition(":")
    ok = name == "aes" and (
        (cmode == "xts" and ivgen in ("plain64", "plain") and not ivhash
         and h.key_bytes in (32, 64)) or
        (cmode == "cbc" and h.key_bytes in (16, 24, 32) and
         ((ivgen in ("plain64", "plain") and not ivhash) or
          (ivgen == "essiv" and ivhash in HASHES and
           hashlib.new(ivhash).digest_size in (16, 24, 32)))))
    if not ok:
        raise UnsupportedFeatureError("Unsupported LUKS cipher %s-%s (key of %d bytes); only "
                                      "aes-xts-plain64/plain and aes-cbc-plain64/plain/essiv "
                                      "are supported" % (name, mode, h.key_bytes))
    if hname not in HASHES:
        raise UnsupportedFeatureError("Unsupported LUKS hash algorithm '%s'" % hname)
    return h.key_bytes, lambda key: make_cipher(key, cmode, ivgen, ivhash or None)


def read_header(img):
    ext = img.crypto_ext
    if ext is None:
        raise InvalidImageError("Missing CRYPTO header for crypt method 2")
    try:
        return LuksHeader.parse(img.pread(LUKS_HEADER_SIZE, ext.offset))
    except (StreamError, ConstructError):
        raise InvalidImageError("Invalid LUKS header in the encryption header extension") from None


def unlock(img, passphrase: bytes) -> SectorCipher:
    """The data cipher of a LUKS-encrypted qcow2 image, from its passphrase."""
    h = read_header(img)
    if h.version != 1:
        raise UnsupportedFeatureError("Unsupported LUKS version %d" % h.version)
    key_len, cipher = _check_cipher(h)
    for ks in h.key_slots:
        mk = open_slot(img, h, ks, passphrase)
        if mk is not None:
            return cipher(mk)
    raise UnlockError("Invalid password, cannot unlock any keyslot")


def _material_extent(img, h, ks) -> tuple:
    """(file offset, size) of a key slot's material, checked to lie in the header area."""
    if not (1 <= ks.stripes <= 1 << 20):
        raise InvalidImageError("LUKS key slot has an invalid stripe count")
    size = -(-h.key_bytes * ks.stripes // SECTOR) * SECTOR
    koff = ks.key_material_offset * SECTOR
    if koff + size > img.crypto_ext.length:
        raise InvalidImageError("LUKS key material lies outside the encryption header")
    return img.crypto_ext.offset + koff, size


def open_slot(img, h, ks, passphrase: bytes):
    """The master key, when the active key slot ks opens with passphrase; else None."""
    if ks.active != LUKS_KEY_ENABLED:
        return None
    key_len, cipher = _check_cipher(h)
    hname = _cstr(h.hash_spec)
    if ks.iterations < 1:
        raise InvalidImageError("LUKS key slot has an invalid stripe or iteration count")
    off, size = _material_extent(img, h, ks)
    slot_key = hashlib.pbkdf2_hmac(hname, passphrase, ks.salt, ks.iterations, key_len)
    material = cipher(slot_key).decrypt(img.pread(size, off), 0)
    mk = af_merge(material.tobytes(), key_len, ks.stripes, hname)
    digest = hashlib.pbkdf2_hmac(hname, mk, h.mk_digest_salt, h.mk_digest_iter, 20)
    return mk if digest == h.mk_digest else None


# ---------------------------------------------------------------- key slot management
# `amend -o encrypt.state=active|inactive,...` as qemu-img 7.2 (its refusals and words).
# Crash safety: a new slot's material is written and flushed before its header entry marks
# it active (one 48-byte write inside one sector); an erased slot's entry is cleared and
# flushed before its material is overwritten with random bytes.

SLOTS_OFFSET = 208          # the key slot table inside the LUKS1 header
SLOT_SIZE = 48
AMEND_KEYS = ("state", "new-secret", "old-secret", "keyslot", "iter-time")


def _parse_amend(opts: dict) -> dict:
    from ..errors import AmendError
    state = opts.get("state")
    if state is None:
        raise AmendError("Parameter 'state' is missing")
    if state not in ("active", "inactive"):
        raise AmendError("Parameter 'state' does not accept value '%s'" % state)
    out = {"state": state, "new": opts.get("new-secret"), "old": opts.get("old-secret"),
           "keyslot": None, "iter_time": 2000}
    for k, dest in (("keyslot", "keyslot"), ("iter-time", "iter_time")):
        if k in opts:
            try:
                v = int(opts[k], 0)
            except ValueError:
                raise AmendError("Parameter 'encrypt.%s' expects a number" % k) from None
            out[dest] = v
    if out["keyslot"] is not None and not 0 <= out["keyslot"] <= 7:
        raise AmendError("Invalid keyslot %d specified, must be between 0 and 7"
                         % (out["keyslot"] & 0xFFFFFFFF))
    return out


def _write_slot(img, i: int, ks) -> None:
    from construct import Container
    from ..host import fileio
    raw = LuksKeySlot.build(Container(active=ks.active, iterations=ks.iterations, salt=ks.salt,
                                      key_material_offset=ks.key_material_offset,
                                      stripes=ks.stripes))
    fileio.pwrite(img.fd, raw, img.crypto_ext.offset + SLOTS_OFFSET + i * SLOT_SIZE)
    fileio.fsync(img.fd)


def amend_keyslots(img, opts: dict, secrets, *, force: bool = False) -> None:
    """Add or erase LUKS key slots of img (opened writable and unlocked: img.cipher)."""
    from ..errors import AmendError
    from ..format import constants as C
    from ..host import fileio
    if img.header.crypt_method == C.CRYPT_NONE:
        raise AmendError("Can't amend encryption options - encryption not present")
    if img.header.crypt_method != C.CRYPT_LUKS:
        raise AmendError("Only LUKS encryption options can be amended")
    a = _parse_amend(opts)
    h = read_header(img)
    slots = list(h.key_slots)
    active = [ks.active == LUKS_KEY_ENABLED for ks in slots]
    if a["state"] == "active":
        if a["old"] is not None:
            raise AmendError("'old-secret' must not be given when activating keyslots")
        if a["new"] is None:
            raise AmendError("'new-secret' is required to activate a keyslot")
        i = a["keyslot"]
        if i is not None and active[i]:
            raise AmendError("Refusing to overwrite active keyslot %d - please erase it first"
                             % i)
        if i is None:
            if all(active):
                raise AmendError("Can't add a keyslot - all keyslots are in use")
            i = active.index(False)
        passphrase = secrets.get(a["new"])
        if a["iter_time"] <= 0:
            raise AmendError("Parameter 'encrypt.iter-time' must be positive")
        mk = img.cipher.master_key
        key_len, cipher = _check_cipher(h)
        hname = _cstr(h.hash_spec)
        ks = slots[i]
        off, size = _material_extent(img, h, ks)
        iters = _iterations_for(hname, key_len, a["iter_time"])
        salt = _os.urandom(32)
        slot_key = hashlib.pbkdf2_hmac(hname, passphrase, salt, iters, key_len)
        material = af_split(mk, ks.stripes, hname)
        material += bytes(size - len(material))
        enc = cipher(slot_key).encrypt(material, 0)
        fileio.pwrite(img.fd, enc, off)
        fileio.fsync(img.fd)                 # the material first, then the slot marked active
        ks.active, ks.iterations, ks.salt = LUKS_KEY_ENABLED, iters, salt
        _write_slot(img, i, ks)
        return
    # erase
    if a["new"] is not None:
        raise AmendError("'new-secret' must not be given when erasing keyslots")
    if a["keyslot"] is None and a["old"] is None:
        raise AmendError("To erase keyslot(s), either explicit keyslot index or the password "
                         "currently contained in them must be given")
    old = secrets.get(a["old"]) if a["old"] is not None else None
    if a["keyslot"] is not None:
        i = a["keyslot"]
        if old is not None and open_slot(img, h, slots[i], old) is None:
            raise AmendError("Given keyslot %d doesn't contain the given old password for "
                             "erase operation" % i)
        if not active[i]:
            raise AmendError("Given keyslot %d is already erased (inactive) " % i)
        if sum(active) == 1 and not force:
            raise AmendError("Attempt to erase the only active keyslot %d which will erase all "
                             "the data in the image irreversibly - refusing operation" % i)
        victims = [i]
    else:
        victims = [i for i, ks in enumerate(slots) if open_slot(img, h, ks, old) is not None]
        if not victims:
            raise AmendError("No keyslots match given (old) password for erase operation")
        if len(victims) == sum(active) and not force:
            raise AmendError("All the active keyslots match the (old) password that was given "
                             "and erasing them will erase all the data in the image "
                             "irreversibly - refusing operation")
    for i in victims:
        ks = slots[i]
        off, size = _material_extent(img, h, ks)
        ks.active, ks.iterations, ks.salt = 0x0000DEAD, 0, bytes(32)
        _write_slot(img, i, ks)              # the header first: the slot is gone
        fileio.pwrite(img.fd, _os.urandom(size), off)
        fileio.fsync(img.fd)


def _iterations_for(hname: str, key_len: int, millis: int) -> int:
    """PBKDF2 iterations that take about millis milliseconds here (as QEMU measures)."""
    import time
    n = 1 << 14
    while True:
        t = time.perf_counter()
        hashlib.pbkdf2_hmac(hname, b"qcow2engine", b"\0" * 32, n, key_len)
        dt = time.perf_counter() - t
        if dt >= 0.05 or n >= 1 << 26:
            break
        n *= 4
    return max(1000, int(n * millis / 1000.0 / dt))


STRIPES = 4000
KEY_MATERIAL_ALIGN = 4096


def area_size(key_len: int) -> int:
    """Bytes of a LUKS1 header area made here: the header, then 8 key slots of material."""
    mat_size = -(-key_len * STRIPES // KEY_MATERIAL_ALIGN) * KEY_MATERIAL_ALIGN
    return -(-LUKS_HEADER_SIZE // KEY_MATERIAL_ALIGN) * KEY_MATERIAL_ALIGN + 8 * mat_size


def build_header(passphrase: bytes, *, key_len: int = 64, hname: str = "sha256",
                 ivgen: str = "plain64", iter_time: int = 2000, mode: str = "xts",
                 ivhash: str | None = None):
    """A new LUKS1 header (the whole encryption area as bytes, its length a multiple of
    512) and the data cipher.  Slot 0 holds the passphrase; the other seven are empty."""
    import uuid
    from construct import Container
    mk = _os.urandom(key_len)
    iters = _iterations_for(hname, key_len, iter_time)
    mk_iters = max(1000, iters // 8)
    mk_salt = _os.urandom(32)
    digest = hashlib.pbkdf2_hmac(hname, mk, mk_salt, mk_iters, 20)
    mat_size = -(-key_len * STRIPES // KEY_MATERIAL_ALIGN) * KEY_MATERIAL_ALIGN
    first = -(-LUKS_HEADER_SIZE // KEY_MATERIAL_ALIGN) * KEY_MATERIAL_ALIGN
    total = area_size(key_len)
    slots = []
    slot_salt = _os.urandom(32)
    for i in range(8):
        slots.append(Container(active=LUKS_KEY_ENABLED if i == 0 else 0x0000DEAD,
                               iterations=iters if i == 0 else 0,
                               salt=slot_salt if i == 0 else bytes(32),
                               key_material_offset=(first + i * mat_size) // SECTOR,
                               stripes=STRIPES))

    def pad(s: str) -> bytes:
        return s.encode().ljust(32, b"\0")
    hdr = LuksHeader.build(Container(
        version=1, cipher_name=pad("aes"), cipher_mode=pad("%s-%s%s" % (mode, ivgen, ":" + ivhash if ivhash else "")), hash_spec=pad(hname),
        payload_offset=total // SECTOR, key_bytes=key_len, mk_digest=digest,
        mk_digest_salt=mk_salt, mk_digest_iter=mk_iters,
        uuid=str(uuid.uuid4()).encode().ljust(40, b"\0"), key_slots=slots))
    area = bytearray(total)
    area[:len(hdr)] = hdr
    slot_key = hashlib.pbkdf2_hmac(hname, passphrase, slot_salt, iters, key_len)
    material = af_split(mk, STRIPES, hname)
    material += bytes(-(-len(material) // SECTOR) * SECTOR - len(material))
    enc = make_cipher(slot_key, mode, ivgen, ivhash).encrypt(material, 0).tobytes()
    area[first:first + len(enc)] = enc
    return bytes(area), make_cipher(mk, mode, ivgen, ivhash)
