"""qemu-img's `dd` and `bench` verbs (imported only when used)."""
from __future__ import annotations

import sys
import time

from ..errors import InvalidRequestError



def add_parsers(sub, size_type) -> None:
    add_bitmap_parser(sub, size_type)
    s = sub.add_parser("dd", help="copy a range of an image's guest data to a new image")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-O", dest="out_fmt", default="raw")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("--image-opts", dest="image_opts", action="store_true")
    s.add_argument("operands", nargs="*")

    s = sub.add_parser("bench", help="time a run of read or write requests")
    s.add_argument("-c", dest="count", type=int, default=75000)
    s.add_argument("-d", dest="depth", type=int, default=64)
    s.add_argument("-f", dest="fmt")
    s.add_argument("--flush-interval", dest="flush_interval", type=int, default=0)
    s.add_argument("-i", dest="aio")
    s.add_argument("-n", dest="nocache", action="store_true")
    s.add_argument("--no-drain", dest="no_drain", action="store_true")
    s.add_argument("-o", dest="offset", type=size_type, default=0)
    s.add_argument("--pattern", default="0")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-s", dest="bufsize", type=size_type, default=4096)
    s.add_argument("-S", dest="step", type=size_type, default=0)
    s.add_argument("-t", dest="cache")
    s.add_argument("-w", dest="write", action="store_true")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("filename")


def _bitmap_action(kind):
    """An argparse action class: --add/--remove/... append (kind, value) to args.actions,
    in the order given."""
    import argparse

    class A(argparse.Action):
        def __call__(self, parser, ns, values, option_string=None):
            ns.actions = (ns.actions or []) + [(kind, values)]
    return A


def add_bitmap_parser(sub, size_type) -> None:
    s = sub.add_parser("bitmap", help="add, remove, clear, enable, disable or merge "
                                      "persistent dirty bitmaps")
    s.set_defaults(actions=[])
    for kind in ("add", "remove", "clear", "enable", "disable"):
        s.add_argument("--" + kind, nargs=0, action=_bitmap_action(kind))
    s.add_argument("--merge", action=_bitmap_action("merge"))
    s.add_argument("-b", dest="source_file")
    s.add_argument("-F", dest="source_fmt")
    s.add_argument("-g", dest="granularity", type=size_type)
    s.add_argument("-f", dest="fmt")
    s.add_argument("--object", dest="objects", action="append", default=[])
    s.add_argument("--image-opts", dest="image_opts", action="store_true")
    s.add_argument("filename")
    s.add_argument("bitmap")


def cmd_bitmap(args) -> int:
    from ..chain.session import Session
    from ..errors import Qcow2Error
    from ..image import bitmaps as B
    if not args.actions:
        raise InvalidRequestError("Need at least one of --add, --remove, --clear, --enable, "
                                  "--disable, or --merge")
    if args.granularity is not None and not any(k == "add" for k, _ in args.actions):
        raise InvalidRequestError("granularity only supported with --add")
    if args.source_file and not any(k == "merge" for k, _ in args.actions):
        raise InvalidRequestError("-b only supported with --merge")
    with Session() as s:
        img = s.open_file(args.filename, args.fmt or "qcow2", writable=True)
        src = img
        if args.source_file:
            src = s.open_file(args.source_file, args.source_fmt)
        for kind, value in args.actions:
            try:
                if kind == "add":
                    B.add_bitmap(img, args.bitmap, args.granularity)
                elif kind == "remove":
                    B.remove_bitmap(img, args.bitmap)
                elif kind == "clear":
                    B.clear_bitmap(img, args.bitmap)
                elif kind in ("enable", "disable"):
                    B.set_enabled(img, args.bitmap, kind == "enable")
                else:
                    B.merge_bitmap(img, args.bitmap, src, value)
            except Qcow2Error as e:
                raise B.BitmapError("Operation %s on bitmap %s failed: %s"
                                    % (kind, args.bitmap, e)) from None
    return 0


def _dd_operands(operands):
    from ..units import parse_size
    dd = {"bs": 512}
    for op in operands:
        key, eq, val = op.partition("=")
        if not eq or key not in ("bs", "count", "skip", "if", "of"):
            raise InvalidRequestError("unrecognized operand %s" % key)
        if key in ("if", "of"):
            dd[key] = val
            continue
        try:
            n = parse_size(val)
        except InvalidRequestError:
            n = -1
        if key == "bs" and not 1 <= n <= 2147483647:
            raise InvalidRequestError("Invalid bs specified. Must be between 1 and 2147483647.")
        if n < 0:
            raise InvalidRequestError("invalid number: '%s'" % val)
        dd[key] = n
    if "if" not in dd or "of" not in dd:
        raise InvalidRequestError("Must specify both input and output files")
    return dd


def cmd_dd(args) -> int:
    """As qemu-img 7.2: the output (created in -O's format) is the input's size, or
    count*bs when smaller, less skip*bs; it gets the input's bytes from skip*bs on."""
    from ..chain.session import Session
    from ..image.create import CreateOptions, check_format, create_from_options
    from .main import _image_spec
    dd = _dd_operands(args.operands)
    src, drv, snap = _image_spec(dd["if"], args.image_opts)
    fmt = args.fmt or drv
    check_format(dd["of"], args.out_fmt)
    with Session(force_share=args.force_share) as s:
        chain = s.open_chain(src, fmt, snapshot=snap)
        size = chain.size
        if "count" in dd and size > dd["count"] * dd["bs"]:
            size = dd["count"] * dd["bs"]
        start = dd.get("skip", 0) * dd["bs"]
        if start > size:
            raise InvalidRequestError("%s: cannot skip to specified offset" % dd["if"])
        n = size - start
        create_from_options(dd["of"], CreateOptions(size=n), args.out_fmt)
        out = s.open_chain(dd["of"], args.out_fmt, backing=False, writable=True)
        _copy_range(chain, start, out, min(n, out.size))
        out.flush()
    return 0


def _copy_range(chain, start: int, out, n: int) -> None:
    """Guest bytes [start, start+n) of chain to [0, n) of the new image out: only the
    ranges that hold data are read and written (out reads zeros elsewhere)."""
    from ..chain.convert import copy_extent_data
    for ex in chain.iter_extents(start, start + n):
        copy_extent_data(chain, ex, out, shift=start, skip_zeros=True)


def cmd_bench(args) -> int:
    """Requests of -s bytes from -o on, -S apart (wrapping to 0 at the end of the disk);
    reads through the whole chain, writes of the --pattern byte through the guest writer,
    a flush every --flush-interval writes and at the end.  Requests run one after another
    (-d is reported, not used)."""
    from ..chain.session import open_chain
    from .main import _err
    step = args.step or args.bufsize
    try:
        pattern = int(args.pattern, 0)
    except ValueError:
        raise InvalidRequestError("Invalid pattern byte specified") from None
    if args.flush_interval and not args.write:
        raise InvalidRequestError("--flush-interval is only available in write tests")
    if args.count < 1 or args.bufsize < 1 or args.depth < 1:
        raise InvalidRequestError("Invalid request count, buffer size or queue depth")
    chain = open_chain(args.filename, args.fmt, writable=args.write,
                       force_share=args.force_share)
    try:
        if not args.quiet:
            print("Sending %d %s requests, %d bytes each, %d in parallel (starting at offset "
                  "%d, step size %d)" % (args.count, "write" if args.write else "read",
                                         args.bufsize, args.depth, args.offset, step))
            if args.flush_interval:
                print("Sending flush every %d requests" % args.flush_interval)
            sys.stdout.flush()
        import numpy as np
        buf = np.full(args.bufsize, pattern & 0xFF, np.uint8)
        size = chain.size
        off = args.offset
        t0 = time.perf_counter()
        for i in range(args.count):
            if off + args.bufsize > size:
                _err("Failed request: Input/output error")
                return 1
            if args.write:
                chain.write(off, buf)
                if args.flush_interval and (i + 1) % args.flush_interval == 0:
                    chain.flush()
            else:
                chain.read_into(buf, off)
            off += step
            if off + args.bufsize > size:
                off = 0
        if args.write:
            chain.flush()
        elapsed = time.perf_counter() - t0
    finally:
        chain.close()
    if not args.quiet:
        print("Run completed in %3.3f seconds." % elapsed)
    return 0
