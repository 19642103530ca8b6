"""The legacy qcow2 AES encryption (crypt method 1, `encrypt.format=aes`, `encryption=on`).

docs/interop/qcow2.rst: each 512-byte sector is encrypted with AES-128 in CBC mode; the key
is the passphrase (its UTF-8 bytes, zero-padded or truncated to 16 bytes);
the IV of a sector is its sector number as a 64-bit little-endian integer padded with zeros to
16 bytes ("plain64").  Unlike LUKS in qcow2, the sector number is the GUEST offset / 512 (QEMU
checked by experiment: a cluster written at guest offset 64 KiB decrypts with IV 128, not with
its host offset's).  There is no key check: a wrong passphrase reads as noise.

The cipher has the interface of luks.SectorCipher (encrypt/decrypt of whole sectors, numpy
arrays out) plus `guest_iv = True`, which tells the readers and the writer to number sectors by
guest offset.
"""
from __future__ import annotations

from ..errors import InvalidRequestError
from .luks import CbcCipher


def qcow_key(passphrase: bytes, sid: str = "") -> bytes:
    """The AES-128 key QEMU derives from a passphrase: its bytes zero-padded or truncated to
    16; QEMU takes it as a UTF-8 string and refuses invalid UTF-8 and NUL bytes."""
    try:
        passphrase.decode("utf-8")
        ok = b"\0" not in passphrase
    except UnicodeDecodeError:
        ok = False
    if not ok:
        raise InvalidRequestError("Data from secret %s is not valid UTF-8" % sid)
    return passphrase[:16].ljust(16, b"\0")


class QcowAesCipher(CbcCipher):
    """AES-128-CBC per 512-byte sector with plain64 IVs (luks.CbcCipher, vectorised over
    many sectors), its sectors numbered by guest offset."""

    guest_iv = True

    def __init__(self, key: bytes):
        if len(key) != 16:
            raise ValueError("the qcow AES key is 16 bytes")
        super().__init__(key, "plain64")


def unlock(passphrase: bytes, sid: str = "") -> QcowAesCipher:
    return QcowAesCipher(qcow_key(passphrase, sid))
