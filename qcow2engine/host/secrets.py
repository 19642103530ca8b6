"""Secrets as qemu-img takes them: `--object secret,id=ID,data=PASS` or
`--object secret,id=ID,file=PATH` (optionally `format=raw|base64`).

A registry maps secret ids to their bytes; an encrypted image names the secret that unlocks
it with the open option `encrypt.key-secret=ID`.  The CLI fills the process-wide default
registry (`DEFAULT`), which every Session uses unless it is given its own.
"""
from __future__ import annotations

import base64
import binascii

from ..errors import InvalidRequestError


class SecretError(InvalidRequestError):
    """A secret object is malformed, or a named secret does not exist."""


def _split(spec: str) -> list:
    # qemu option syntax: ",," is a literal comma
    return [p.replace("\0", ",") for p in spec.replace(",,", "\0").split(",")]


class Secrets:
    """Secret id -> bytes, plus which secret unlocks which image (by path)."""

    def __init__(self, secrets: dict | None = None):
        self.secrets: dict = {k: (v.encode() if isinstance(v, str) else bytes(v))
                              for k, v in (secrets or {}).items()}
        self.key_secrets: dict = {}          # os.path.realpath(image) -> secret id
        self.chain_keys: dict = {}           # (realpath(top image), depth) -> secret id

    def add_object(self, spec: str) -> None:
        """One --object string; objects other than secrets are refused."""
        parts = _split(spec)
        qom_type = parts[0]
        opts = {}
        for p in parts[1:]:
            k, eq, v = p.partition("=")
            if not eq:
                raise SecretError("Invalid object option '%s'" % p)
            opts[k] = v
        if "=" in qom_type:
            k, _, v = qom_type.partition("=")
            if k != "qom-type":
                raise SecretError("Parameter 'qom-type' is missing")
            qom_type = v
        if qom_type != "secret":
            raise SecretError("Object type '%s' is not supported (only 'secret')" % qom_type)
        sid = opts.pop("id", None)
        if not sid:
            raise SecretError("Parameter 'id' is missing")
        fmt = opts.pop("format", "raw")
        if fmt not in ("raw", "base64"):
            raise SecretError("Invalid parameter 'format': '%s' (raw or base64)" % fmt)
        data, path = opts.pop("data", None), opts.pop("file", None)
        if opts:
            raise SecretError("Property '%s' not found for secret '%s'" % (next(iter(opts)), sid))
        if (data is None) == (path is None):
            raise SecretError("Secret '%s': exactly one of 'data' and 'file' must be given" % sid)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    value = f.read()
            except OSError as e:
                raise SecretError("Unable to read %s: %s" % (path, e.strerror)) from None
        else:
            value = data.encode("utf-8")
        if fmt == "base64":
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise SecretError("Secret '%s' is not valid base64" % sid) from None
        if sid in self.secrets:
            raise SecretError("attempt to add duplicate property '%s' to object (type "
                              "'container')" % sid)
        self.secrets[sid] = value

    def set_key_secret(self, path: str, sid: str, depth: int = 0) -> None:
        """Name the secret of the image at path, or (depth > 0) of the image depth levels
        down path's backing chain (qemu's backing.encrypt.key-secret)."""
        import os
        if depth:
            self.chain_keys[(os.path.realpath(path), depth)] = sid
        else:
            self.key_secrets[os.path.realpath(path)] = sid

    def key_secret_for(self, path: str, top: str | None = None, depth: int = 0):
        import os
        sid = self.key_secrets.get(os.path.realpath(path))
        if sid is None and top is not None and depth:
            sid = self.chain_keys.get((os.path.realpath(top), depth))
            if sid is not None:        # the file is now known by its own name too (commit
                self.key_secrets[os.path.realpath(path)] = sid    # opens it again alone)
        return sid

    def get(self, sid: str) -> bytes:
        v = self.secrets.get(sid)
        if v is None:
            raise SecretError("No secret with id '%s'" % sid)
        return v

    def passphrase_for(self, path: str, top: str | None = None, depth: int = 0) -> bytes:
        """The passphrase of the image at path (depth levels below top in its chain);
        SecretError when none is named or known."""
        sid = self.key_secret_for(path, top, depth)
        if sid is None:
            raise SecretError(open_failed(path, top, depth, "Parameter 'encrypt.key-secret' "
                                          "is required for cipher"))
        try:
            return self.get(sid)
        except SecretError as e:
            raise SecretError(open_failed(path, top, depth, str(e))) from None


def open_failed(path: str, top: str | None, depth: int, why: str) -> str:
    """qemu-img's words for an image of a chain that cannot be opened."""
    if top is not None and depth:
        return "Could not open '%s': Could not open backing file: %s" % (top, why)
    return "Could not open '%s': %s" % (path, why)


def from_objects(objects) -> Secrets:
    s = Secrets()
    for spec in objects or ():
        s.add_object(spec)
    return s


DEFAULT = Secrets()
