"""The legacy qcow2 AES encryption (crypt method 1, `encrypt.format=aes`, `encryption=on`).

docs/interop/qcow2.rst: each 512-byte sector is encrypted with AES-128 in CBC mode; the key
is the passphrase (its UTF-8 bytes up to the first NUL, zero-padded or truncated to 16 bytes);
the IV of a sector is its sector number as a 64-bit little-endian integer padded with zeros to
16 bytes ("plain64").  Unlike LUKS in qcow2, the sector number is the GUEST offset / 512 (QEMU
checked by experiment: a cluster written at guest offset 64 KiB decrypts with IV 128, not with
its host offset's).  There is no key check: a wrong passphrase reads as noise.

The cipher has the interface of luks.SectorCipher (encrypt/decrypt of whole sectors, numpy
arrays out) plus `guest_iv = True`, which tells the readers and the writer to number sectors by
guest offset.
"""
from __future__ import annotations

import numpy as np

from ..errors import InvalidRequestError

SECTOR = 512
BLOCKS = SECTOR // 16


def qcow_key(passphrase: bytes) -> bytes:
    """The AES-128 key QEMU derives from a passphrase (qcrypto_block_qcow_init)."""
    try:
        passphrase.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("Data from secret is not valid UTF-8") from None
    return passphrase.split(b"\0", 1)[0][:16].ljust(16, b"\0")


def _ecb(key: bytes, decrypt: bool):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    c = Cipher(algorithms.AES(key), modes.ECB())
    return c.decryptor() if decrypt else c.encryptor()


class QcowAesCipher:
    """AES-128-CBC per 512-byte sector with plain64 IVs, vectorised over many sectors:
    decryption is one ECB pass and an XOR with the shifted ciphertext; encryption runs the
    CBC chain one block position at a time over every sector at once (32 ECB calls)."""

    guest_iv = True

    def __init__(self, key: bytes):
        if len(key) != 16:
            raise ValueError("the qcow AES key is 16 bytes")
        self.key = key
        self._enc = _ecb(key, decrypt=False)
        self._dec = _ecb(key, decrypt=True)

    @staticmethod
    def _ivs(first: int, n: int) -> np.ndarray:
        iv = np.zeros((n, 2), "<u8")
        iv[:, 0] = np.arange(first, first + n, dtype=np.uint64)
        return iv

    @staticmethod
    def _blocks(data) -> np.ndarray:
        buf = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        if len(buf) % SECTOR:
            raise ValueError("encrypted I/O must be in whole 512-byte sectors")
        return buf

    def decrypt(self, data, first_sector: int) -> np.ndarray:
        buf = self._blocks(data)
        n = len(buf) // SECTOR
        out = np.empty(len(buf), np.uint8)
        step = 8192
        for s in range(0, n, step):
            m = min(step, n - s)
            c = buf[s * SECTOR:(s + m) * SECTOR]
            d = np.frombuffer(self._dec.update(c.tobytes()), "<u8").reshape(m, BLOCKS, 2).copy()
            cb = c.view("<u8").reshape(m, BLOCKS, 2)
            d[:, 1:] ^= cb[:, :-1]
            d[:, 0] ^= self._ivs(first_sector + s, m)
            out[s * SECTOR:(s + m) * SECTOR] = d.view(np.uint8).reshape(-1)
        return out

    def encrypt(self, data, first_sector: int) -> np.ndarray:
        buf = self._blocks(data)
        n = len(buf) // SECTOR
        out = np.empty(len(buf), np.uint8)
        step = 8192
        for s in range(0, n, step):
            m = min(step, n - s)
            p = buf[s * SECTOR:(s + m) * SECTOR].view("<u8").reshape(m, BLOCKS, 2)
            c = np.empty((m, BLOCKS, 2), "<u8")
            prev = self._ivs(first_sector + s, m)
            for j in range(BLOCKS):
                x = np.ascontiguousarray(p[:, j] ^ prev)
                prev = np.frombuffer(self._enc.update(x.tobytes()), "<u8").reshape(m, 2)
                c[:, j] = prev
            out[s * SECTOR:(s + m) * SECTOR] = c.view(np.uint8).reshape(-1)
        return out


def unlock(passphrase: bytes) -> QcowAesCipher:
    return QcowAesCipher(qcow_key(passphrase))
