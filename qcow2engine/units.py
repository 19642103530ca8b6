"""One size grammar for sizes, `-o` values and speeds (qemu-img's): a number (decimal, 0x
hex, or with a fraction) and an optional suffix k, M, G, T, P, E (powers of 1024, any case)
or b/B (bytes)."""
from __future__ import annotations

from .errors import InvalidRequestError

_MULT = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text, *, what: str = "size") -> int:
    """Bytes from "64k", "1.5G", "512", "0x1000", "100b"; InvalidRequestError("Invalid
    <what> '<text>'") otherwise (negative or malformed)."""
    t = str(text).strip()
    m = 1
    if t and t[-1].lower() in _MULT:
        m, t = _MULT[t[-1].lower()], t[:-1]
    elif len(t) > 1 and t[-1] in "bB" and t[-2].isdigit():
        t = t[:-1]
    try:
        v = float(t) if "." in t else int(t, 0)
    except ValueError:
        raise InvalidRequestError("Invalid %s '%s'" % (what, text)) from None
    if v < 0:
        raise InvalidRequestError("Invalid %s '%s'" % (what, text))
    return int(v * m)
