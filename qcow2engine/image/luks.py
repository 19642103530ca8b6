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
