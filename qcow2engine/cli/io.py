"""`io`: a subset of qemu-io's command language (read, write, discard, flush) on our engine.

    qcow2engine io [-f FMT] -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' FILE

Output lines and the exit status follow qemu-io: 1 if any command failed, else 0.
"""
from __future__ import annotations

import shlex
import sys
import time

SUFFIX = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
          "e": 1 << 60}


class IoCommandError(Exception):
    pass


def cvtnum(text: str) -> int:
    t = text.strip()
    m = 1
    if t and t[-1].lower() in SUFFIX:
        m = SUFFIX[t[-1].lower()]
        t = t[:-1]
    try:
        v = int(t, 0)
    except ValueError:
        raise IoCommandError("invalid number '%s'" % text) from None
    if v < 0:
        raise IoCommandError("invalid number '%s'" % text)
    return v * m


def cvtstr(v: float) -> str:
    for unit, name in ((1 << 60, "EiB"), (1 << 50, "PiB"), (1 << 40, "TiB"), (1 << 30, "GiB"),
                       (1 << 20, "MiB"), (1 << 10, "KiB")):
        if v >= unit:
            s = "%.3f" % (v / unit)
            s = s.rstrip("0").rstrip(".") if s.endswith(".000") else s
            return "%s %s" % (s, name)
    s = "%f" % v
    s = s[:-7] if s.endswith(".000000") else s
    return "%s bytes" % s


def _report(out, verb: str, length: int, offset: int, elapsed: float) -> None:
    out.write("%s %d/%d bytes at offset %d\n" % (verb, length, length, offset))
    el = max(elapsed, 1e-6)
    out.write("%s, 1 ops; %02d.%02d sec (%s/sec and %.4f ops/sec)\n"
              % (cvtstr(length), int(el), int(el * 100) % 100, cvtstr(length / el), 1 / el))


def _opts(argv, flags_with_value="P"):
    opts = {}
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and len(a) > 1 and not a[1:].isdigit():
            for j, ch in enumerate(a[1:]):
                if ch in flags_with_value:
                    val = a[j + 2:] or (argv[i + 1] if i + 1 < len(argv) else None)
                    if val is None:
                        raise IoCommandError("option requires an argument -- '%s'" % ch)
                    if not a[j + 2:]:
                        i += 1
                    opts[ch] = val
                    break
                opts[ch] = True
        else:
            rest.append(a)
        i += 1
    return opts, rest


def _pattern(text) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        v = -1
    if not 0 <= v <= 255:
        raise IoCommandError("%s is not a valid pattern byte" % text)
    return v


def run_command(chain, line: str, out, writethrough: bool = True) -> bool:
    """Run one qemu-io command.  writethrough (qemu-io's default cache mode): a request
    that writes is durable when it completes (a flush ends it), as qemu-io's are."""
    argv = shlex.split(line)
    if not argv:
        return True
    cmd, args = argv[0], argv[1:]
    if cmd in ("write", "w"):
        opts, rest = _opts(args)
        if len(rest) != 2:
            raise IoCommandError("write: invalid number of arguments")
        off, length = cvtnum(rest[0]), cvtnum(rest[1])
        if "c" in opts:
            raise IoCommandError("write -c (compressed) is not supported")
        t0 = time.monotonic()
        try:
            if "z" in opts:
                chain.write_zeroes(off, length, unmap="u" in opts)
            else:
                pat = _pattern(opts["P"]) if "P" in opts else 0xCD
                from ..blockdev.sources import PatternSource     # streamed, never built whole
                chain.write(off, PatternSource(pat, length))
            if writethrough:
                chain.flush()
        except ValueError:
            out.write("write failed: Input/output error\n")
            return False
        _report(out, "wrote", length, off, time.monotonic() - t0)
        return True
    if cmd in ("read", "r"):
        opts, rest = _opts(args)
        if len(rest) != 2:
            raise IoCommandError("read: invalid number of arguments")
        off, length = cvtnum(rest[0]), cvtnum(rest[1])
        t0 = time.monotonic()
        if off + length > chain.size:
            out.write("read failed: Input/output error\n")
            return False
        data = chain.read(off, length)
        ok = True
        if "P" in opts:
            pat = _pattern(opts["P"])
            if data != bytes([pat]) * length:
                out.write("Pattern verification failed at offset %d, %d bytes\n" % (off, length))
                ok = False
        if "v" in opts:
            for p in range(0, length, 16):
                chunk = data[p:p + 16]
                hexs = " ".join("%02x" % b for b in chunk)
                txt = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
                out.write("%08x:  %-47s  %s\n" % (off + p, hexs, txt))
        _report(out, "read", length, off, time.monotonic() - t0)
        return ok
    if cmd in ("discard", "d"):
        opts, rest = _opts(args, "")
        if len(rest) != 2:
            raise IoCommandError("discard: invalid number of arguments")
        off, length = cvtnum(rest[0]), cvtnum(rest[1])
        t0 = time.monotonic()
        try:
            chain.discard(off, length)
            if writethrough:
                chain.flush()
        except ValueError:
            out.write("discard failed: Input/output error\n")
            return False
        _report(out, "discard", length, off, time.monotonic() - t0)
        return True
    if cmd == "flush":
        chain.flush()
        return True
    raise IoCommandError('command "%s" not found' % cmd)


def cmd_io(args) -> int:
    from ..chain.session import open_chain
    chain = open_chain(args.filename, args.fmt, writable=not args.read_only,
                       force_share=args.force_share)
    ok = True
    writethrough = getattr(args, "cache", None) in (None, "writethrough", "directsync")
    try:
        for line in args.commands:
            try:
                ok &= run_command(chain, line, sys.stdout, writethrough)
            except IoCommandError as e:
                sys.stderr.write("%s\n" % e)
                ok = False
    finally:
        chain.close()
    return 0 if ok else 1
