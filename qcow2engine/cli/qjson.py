"""JSON output formatted exactly as QEMU 7.2 prints it (qemu-img --output=json).

QEMU stores objects in a hash table of 512 buckets keyed by the TDB string hash and walks
the buckets in order, so its key order is a pure function of the key names.  We sort keys
the same way so that our documents match byte for byte.
"""
from __future__ import annotations


def _bucket(key: str) -> int:
    b = key.encode()
    v = (0x238F13AF * len(b)) & 0xFFFFFFFF
    for i, c in enumerate(b):
        v = (v + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * v + 12345) & 0xFFFFFFFF) % 512


def qdict_order(keys) -> list:
    """Keys in the order QEMU prints them (later insertions first within a bucket)."""
    keys = list(keys)
    pos = {k: i for i, k in enumerate(keys)}
    return sorted(keys, key=lambda k: (_bucket(k), -pos[k]))


def qstring(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or o == 0x7F:
            out.append("\\u%04X" % o)
        elif o < 0x80:
            out.append(ch)
        elif o < 0x10000:
            out.append("\\u%04X" % o)
        else:
            o -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 | (o >> 10), 0xDC00 | (o & 0x3FF)))
    out.append('"')
    return "".join(out)


def dumps(obj, level: int = 0) -> str:
    """Pretty JSON as qobject_to_json_pretty writes it."""
    pad = "    " * level
    inner = "    " * (level + 1)
    if isinstance(obj, dict):
        items = [inner + qstring(k) + ": " + dumps(obj[k], level + 1) for k in qdict_order(obj)]
        return "{\n" + ",\n".join(items) + ("\n" if items else "") + pad + "}"
    if isinstance(obj, (list, tuple)):
        items = [inner + dumps(v, level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + ("\n" if items else "") + pad + "]"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if obj is None:
        return "null"
    if isinstance(obj, str):
        return qstring(obj)
    if isinstance(obj, float):
        return repr(obj)
    return str(int(obj))
