"""argparse front end: parse, call the engine, print human or JSON output.

Exit codes follow qemu-img 7.2: 0 success, 1 error; check: 0 clean, 1 check failed,
2 corruptions, 3 leaks only, 63 no checks for this format; compare: 0 identical,
1 different, 2 open error, 3/4 status/read errors.  Errors are one line on stderr.
Heavy modules (numpy) are imported lazily so that `info` starts fast.
"""
from __future__ import annotations

import argparse
import os
import sys

PROG = "qcow2engine"


# the machine verbs (cli/tree.py, imported only when one is used)
TREE_VERBS = ("machine", "snapshot-create-as", "snapshot-list", "snapshot-info",
              "snapshot-current", "snapshot-parent", "snapshot-revert", "snapshot-delete")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # qemu-img's getopt wording for an unknown or incomplete option
        import re
        m = re.match(r"unrecognized arguments: (-\S*)", message)
        if m:
            message = "unrecognized option '%s'" % m.group(1)
        m = re.match(r"argument (-\S+?)(/\S+)?: expected one argument", message)
        if m:
            message = "missing argument for option '%s'" % m.group(1)
        raise UsageError(message)


def _size(text: str) -> int:
    """qemu-img size syntax (units.parse_size) as an argparse type."""
    from ..errors import InvalidRequestError
    from ..units import parse_size
    try:
        return parse_size(text)
    except InvalidRequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _err(msg: str) -> None:
    msg = " ".join(str(msg).split("\n"))
    sys.stderr.write("%s: %s\n" % (PROG, msg))


def _output_arg(p):
    p.add_argument("--output", choices=["human", "json"], default="human")


def build_parser():
    p = _Parser(prog=PROG, description="qcow2 backing-chain engine (qemu-img compatible)")
    sub = p.add_subparsers(dest="cmd")

    s = sub.add_parser("info", help="show image information")
    s.add_argument("-f", dest="fmt")
    _output_arg(s)
    s.add_argument("--backing-chain", action="store_true")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("filename")

    s = sub.add_parser("check", help="check image consistency")
    s.add_argument("-f", dest="fmt")
    _output_arg(s)
    s.add_argument("-r", dest="repair", choices=["leaks", "all"])
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("filename")

    s = sub.add_parser("map", help="show the allocation map")
    s.add_argument("-f", dest="fmt")
    _output_arg(s)
    s.add_argument("--start-offset", type=_size, default=0)
    s.add_argument("--max-length", type=_size, default=None)
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("filename")

    s = sub.add_parser("compare", help="compare the guest contents of two images")
    s.add_argument("-f", dest="fmt1")
    s.add_argument("-F", dest="fmt2")
    s.add_argument("-s", dest="strict", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("-T", dest="src_cache")
    s.add_argument("filename1")
    s.add_argument("filename2")

    s = sub.add_parser("convert", help="convert an image (guest view) to another format")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-O", dest="out_fmt", default="raw")
    s.add_argument("-S", dest="sparse", type=_size, default=4096)
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-n", dest="no_create", action="store_true")
    s.add_argument("-m", dest="coroutines", type=int, default=8)
    s.add_argument("-W", dest="out_of_order", action="store_true")
    s.add_argument("-t", dest="cache")
    s.add_argument("-T", dest="src_cache")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("-l", dest="snapshot")
    s.add_argument("-o", dest="options", action="append", default=[])
    s.add_argument("-c", dest="compress", action="store_true")
    s.add_argument("-B", dest="backing")
    s.add_argument("-F", dest="backing_fmt")
    s.add_argument("--bitmaps", action="store_true")
    s.add_argument("--skip-broken-bitmaps", dest="skip_broken", action="store_true")
    s.add_argument("--salvage", action="store_true")
    s.add_argument("files", nargs="*")      # SOURCE... OUTPUT (several sources concatenate)

    s = sub.add_parser("create", help="create a new image")
    s.add_argument("-f", dest="fmt", default="raw")
    s.add_argument("-o", dest="options", action="append", default=[])
    s.add_argument("-b", dest="backing")
    s.add_argument("-F", dest="backing_fmt")
    s.add_argument("-u", dest="unsafe", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("filename")
    s.add_argument("size", nargs="?")

    s = sub.add_parser("resize", help="change the virtual size of an image")
    s.add_argument("-f", dest="fmt")
    s.add_argument("--shrink", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("--preallocation", default="off")
    s.add_argument("filename")   # the size, the last argument, is taken apart before parsing

    s = sub.add_parser("amend", help="change image options (compat, lazy_refcounts, refcount_bits)")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-o", dest="options", action="append", default=[])
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("filename")

    s = sub.add_parser("rebase", help="change the backing file (safe: copying what differs)")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-b", dest="backing", required=True)
    s.add_argument("-F", "-B", dest="backing_fmt")
    s.add_argument("-u", dest="unsafe", action="store_true")
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-t", dest="cache")
    s.add_argument("-T", dest="src_cache")
    s.add_argument("filename")

    s = sub.add_parser("commit", help="write an image's data into its backing file")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-b", dest="base")
    s.add_argument("-d", dest="drop", action="store_true")
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-t", dest="cache")
    s.add_argument("-r", dest="rate")
    s.add_argument("filename")

    s = sub.add_parser("stream", help="pull the backing chain's data into an image (offline "
                                      "block-stream), then point it at BASE or at nothing")
    s.add_argument("-b", dest="base")
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("filename")

    s = sub.add_parser("measure", help="the size a new image needs")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-O", dest="out_fmt", default="raw")
    s.add_argument("-o", dest="options", action="append", default=[])
    s.add_argument("--size", type=_size)
    s.add_argument("-l", dest="snapshot")
    s.add_argument("-U", "--force-share", action="store_true")
    _output_arg(s)
    s.add_argument("filename", nargs="?")

    s = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots")
    g = s.add_mutually_exclusive_group()
    g.add_argument("-l", dest="list", action="store_true")
    g.add_argument("-c", dest="create")
    g.add_argument("-a", dest="apply")
    g.add_argument("-d", dest="delete")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("filename")

    sub.add_parser("live", add_help=False, help="drive a running QEMU over QMP "
                   "(live --qmp SOCKET {info,snapshot,commit,stream,jobs,cancel,...})")

    s = sub.add_parser("io", help="run qemu-io style commands (read/write/discard)")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-c", dest="commands", action="append", default=[])
    s.add_argument("-r", dest="read_only", action="store_true")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("filename")
    from .verbs import add_parsers
    add_parsers(sub, _size)
    _add_common(sub.choices)
    return p


def _subparsers(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return {}


CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")

# options qemu-img 7.2 takes on these verbs that change nothing here (every write of the
# engine is crash-safe whatever the cache mode); --object defines secrets (secret,id=ID,
# data=PASS|file=PATH) for LUKS-encrypted images, named by encrypt.key-secret=ID
COMMON = {
    "amend": ("--object", "--image-opts", "-t", "--force"),
    "check": ("--object", "--image-opts", "-T"),
    "commit": ("--object", "--image-opts"),
    "compare": ("--object", "--image-opts"),
    "convert": ("--object", "--image-opts", "--target-image-opts", "--target-is-zero", "-C",
                "-r"),
    "create": ("--object",),
    "info": ("--object", "--image-opts"),
    "map": ("--object", "--image-opts"),
    "measure": ("--object", "--image-opts"),
    "snapshot": ("--object", "--image-opts"),
    "rebase": ("--object", "--image-opts", "-U"),
    "resize": ("--object", "--image-opts"),
    "io": ("--object", "--image-opts", "-t"),
    "dd": ("--object",),
    "bench": ("--object", "--image-opts"),
}
_COMMON_SPEC = {
    "--object": dict(dest="objects", action="append", default=[]),
    "--image-opts": dict(dest="image_opts", action="store_true"),
    "--target-image-opts": dict(dest="target_image_opts", action="store_true"),
    "--target-is-zero": dict(dest="target_is_zero", action="store_true"),
    "--force": dict(dest="force", action="store_true"),
    "-t": dict(dest="cache"),
    "-T": dict(dest="src_cache"),
    "-C": dict(dest="copy_offload", action="store_true"),
    "-r": dict(dest="rate"),
    "-U": dict(dest="force_share", action="store_true"),
}


def _add_common(subs) -> None:
    for verb, opts in COMMON.items():
        sp = subs[verb]
        have = {o for a in sp._actions for o in a.option_strings}
        for o in opts:
            if o not in have:
                sp.add_argument(o, **_COMMON_SPEC[o])


def _check_common(args) -> None:
    """Cache modes as qemu-img validates them; filenames with a protocol prefix, a json:
    description or --image-opts option strings resolved to a plain file."""
    for attr, what in (("cache", "cache"), ("src_cache", "source cache")):
        v = getattr(args, attr, None)
        if v is not None and v not in CACHE_MODES:
            raise UsageError("Invalid %s option: %s" % (what, v))
    if getattr(args, "target_is_zero", False) and not args.no_create:
        raise UsageError("--target-is-zero requires use of -n flag")
    from ..host import secrets as S
    S.DEFAULT.secrets.clear()           # one command's secrets (main() may run many times)
    S.DEFAULT.key_secrets.clear()
    S.DEFAULT.chain_keys.clear()
    for spec in getattr(args, "objects", None) or ():
        S.DEFAULT.add_object(spec)
    opts = getattr(args, "image_opts", False)
    if opts and getattr(args, "fmt", None):
        raise UsageError("--image-opts and --format are mutually exclusive")
    for attr in ("filename", "filename1", "filename2"):
        name = getattr(args, attr, None)
        if name is None:
            continue
        path, drv, snap = _image_spec(name, opts)
        setattr(args, attr, path)
        fattr = {"filename2": "fmt2", "filename1": "fmt1"}.get(attr, "fmt")
        if drv and hasattr(args, fattr) and getattr(args, fattr) is None:
            setattr(args, fattr, drv)
        if snap and hasattr(args, "snapshot"):
            args.snapshot = snap
    if getattr(args, "sources", None):      # the first source is args.filename, resolved
        args.sources = [args.filename] + [_image_spec(n, opts)[0] for n in args.sources[1:]]
    out = getattr(args, "output", None)
    if args.cmd == "convert" and out is not None:
        if out == "null-co://":
            if not args.no_create:
                raise UsageError("Protocol driver 'null-co' does not support image creation")
            args.output = os.devnull
        else:
            path, drv, _ = _image_spec(out, getattr(args, "target_image_opts", False))
            args.output = path
            if drv:
                args.out_fmt = drv


_IGNORED_KEYS = ("cache.", "file.cache.", "file.locking", "file.aio", "aio", "locking",
                 "discard", "detect-zeroes", "read-only", "auto-read-only", "force-share")


def _image_spec(name: str, image_opts: bool = False):
    """(path, driver or None, snapshot or None) of a filename as qemu-img reads it: a plain
    path; `file:PATH`; `json:{...}` or (with --image-opts) `driver=qcow2,file.filename=...`
    describing a qcow2 or raw image on a file.  Any other protocol is refused with
    qemu-img's message."""
    import json
    from ..errors import InvalidImageError
    from ..host.paths import has_protocol
    if image_opts:
        opts = {}
        # qemu's option syntax: key=value pairs, a doubled comma is a literal comma
        for part in name.replace(",,", "\0").split(","):
            k, _, v = part.partition("=")
            opts[k] = v.replace("\0", ",")
    elif name.startswith("json:"):
        try:
            tree = json.loads(name[5:])
        except ValueError as e:
            raise InvalidImageError("Could not open '%s': JSON parse error: %s" % (name, e)) \
                from None
        opts = {}

        def flat(d, prefix=""):
            for k, v in (d.items() if isinstance(d, dict) else ()):
                if isinstance(v, dict):
                    flat(v, prefix + k + ".")
                else:
                    opts[prefix + k] = v if isinstance(v, str) else json.dumps(v)
        flat(tree)
    elif name.startswith("file:"):
        return name[5:], None, None
    elif has_protocol(name):
        raise InvalidImageError("Could not open '%s': Unknown protocol '%s'"
                                % (name, name.split(":", 1)[0]))
    else:
        return name, None, None
    drv = opts.pop("driver", None)
    if drv == "file":               # the protocol alone: the file's bytes are the disk
        path, drv = opts.pop("filename", None), "raw"
    elif drv in ("qcow2", "raw", None):         # no driver: the format is probed
        fdrv = opts.pop("file.driver", "file")
        if fdrv != "file":
            raise InvalidImageError("Could not open '%s': Unknown protocol '%s'" % (name, fdrv))
        path = opts.pop("file.filename", None)
    else:
        raise InvalidImageError("Could not open '%s': Unknown driver '%s'" % (name, drv))
    if not path:
        raise InvalidImageError("Could not open '%s': A block device must be specified for "
                                "\"file\"" % name)
    for k in [k for k in opts if k.endswith("encrypt.key-secret")]:
        depth, rest = 0, k
        while rest.startswith("backing."):       # backing.encrypt.key-secret: a backing file's
            depth, rest = depth + 1, rest[8:]
        if rest != "encrypt.key-secret":
            continue
        from ..host.secrets import DEFAULT
        DEFAULT.set_key_secret(path, opts.pop(k), depth)
    snap = None
    for k in ("snapshot.name", "snapshot.id"):
        if k in opts:
            snap = "%s=%s" % (k, opts.pop(k))
    extra = [k for k in opts if not k.startswith(_IGNORED_KEYS)]
    if extra:
        raise InvalidImageError("Could not open '%s': Block format '%s' does not support the "
                                "option '%s'" % (name, drv or "file", extra[0]))
    return path, drv, snap


def _take_io_commands(rest):
    """io's `-c CMD` pairs taken out before argparse, in order (its intermixed parsing is
    quadratic in the number of arguments: 2,000 commands cost 0.3 s).  Only plain `-c CMD`
    before `--`, and only when no bundled short option could hold a `c`."""
    end = rest.index("--") if "--" in rest else len(rest)
    head = rest[:end]
    if any(a.startswith("-") and not a.startswith("--") and a != "-c" and "c" in a[1:]
           for a in head):
        return rest, None
    out, cmds, i = [], [], 0
    while i < len(head):
        if head[i] == "-c" and i + 1 < len(head):
            cmds.append(head[i + 1])
            i += 2
            continue
        out.append(head[i])
        i += 1
    return out + rest[end:], cmds


def parse_verb_args(parser, argv):
    """Parse `VERB ARGS...` the way qemu-img's getopt does: options and operands in any
    order, `--` ends the options.  resize takes its last argument as the size before the
    options are parsed (so `-1G` is a size, not an option), as qemu-img does."""
    if not argv:
        return None
    verb, rest = argv[0], argv[1:]
    opts = rest[:rest.index("--")] if "--" in rest else rest
    if verb in ("-h", "--help") or "-h" in opts or "--help" in opts:
        from .help import print_help
        print_help()
        raise SystemExit(0)
    subs = _subparsers(parser)
    if verb not in subs:
        raise UsageError("Command not found: %s" % verb)
    sp = subs[verb]
    size = None
    if verb == "resize" and rest and rest[-1] not in ("-h", "--help"):
        size, rest = rest[-1], rest[:-1]
    commands = None
    if verb == "io":
        rest, commands = _take_io_commands(rest)
    args = sp.parse_intermixed_args(rest)
    if commands:
        args.commands = commands
    if verb == "resize":
        if size is None:
            sp.error("the following arguments are required: size")
        args.size = size
    if verb == "convert":
        if len(args.files) < 2:
            raise UsageError("Must specify image file name")
        args.sources, args.output = args.files[:-1], args.files[-1]
        args.filename = args.sources[0]
    args.cmd = verb
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    state_dir = None
    while argv and (argv[0] == "--state-dir" or argv[0].startswith("--state-dir=")):
        if argv[0] == "--state-dir":
            if len(argv) < 2:
                _err("--state-dir needs a directory")
                return 1
            state_dir, argv = argv[1], argv[2:]
        else:
            state_dir, argv = argv[0].split("=", 1)[1], argv[1:]
    if argv[:1] and argv[0] in TREE_VERBS:     # machines and their snapshot trees
        from .tree import main as tree_main
        return tree_main(argv, state_dir)
    if argv[:1] == ["live"]:  # a running QEMU: its own parser, imported only when used
        from qmp_bridge.cli import main as live_main
        return live_main(argv[1:])
    parser = build_parser()
    try:
        args = parse_verb_args(parser, argv)
    except UsageError as e:
        _err(str(e))
        return 1
    if args is None or not args.cmd:
        _err("Not enough arguments")
        return 1
    from ..errors import Qcow2Error
    handler = globals()["cmd_" + args.cmd]
    try:
        _check_common(args)
        return handler(args)
    except UsageError as e:
        _err(str(e))
        return 2 if args.cmd == "compare" else 1
    except Qcow2Error as e:
        _err(str(e))
        return getattr(e, "exit_code", None) or getattr(args, "_error_code", 1)
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except OSError as e:
        _err("%s: %s" % (getattr(e, "filename", None) or "I/O error", e.strerror or e))
        return getattr(args, "_error_code", 1)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except MemoryError:
        _err("out of memory")
        return 1
    except Exception as e:  # a bug: still one line for the user, never a traceback
        _err("internal error: %s: %s" % (type(e).__name__, e))
        return 1


def run() -> None:
    """Console entry point: main(), then leave without the interpreter's teardown (about
    20 ms of module and numpy clean-up; every image is closed and flushed by then).
    `live` commands exit normally: their atexit handlers stop what they launched."""
    live = sys.argv[1:2] == ["live"]
    rc = main()
    if live:
        sys.exit(rc)
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            rc = rc or 141
    os._exit(rc if isinstance(rc, int) else 1)


def _open_chain(path, fmt, force_share, backing=True, for_io=True):
    from ..chain.session import open_chain
    return open_chain(path, fmt, backing=backing, force_share=force_share, for_io=for_io)


def cmd_info(args) -> int:
    from ..api import info
    from .render import human_info
    from .qjson import dumps
    docs = info(args.filename, args.fmt, backing_chain=True if args.backing_chain else False,
                force_share=args.force_share)
    if not args.backing_chain:
        docs = [docs]
    if args.output == "json":
        sys.stdout.write(dumps(docs if args.backing_chain else docs[0]) + "\n")
    else:
        sys.stdout.write("\n".join(human_info(d) for d in docs))
    return 0


def cmd_check(args) -> int:
    from ..chain.session import open_file
    if args.repair and args.force_share:
        _err("force-share=on can only be used with read-only images")
        return 1
    if args.repair:
        from ..refcounts.repair import repair_image
        probe = open_file(args.filename, args.fmt, force_share=True)
        fmt = probe.format
        probe.close()
        if fmt != "qcow2":
            _err("This image format does not support checks")
            return 63
        res = repair_image(args.filename, args.repair, args.filename)
        return _print_check(args, res)
    layer = open_file(args.filename, args.fmt, force_share=args.force_share)
    try:
        if layer.format != "qcow2":
            _err("This image format does not support checks")
            return 63
        if layer.backing_file:
            # qemu-img check opens the whole chain: a broken chain fails the check
            _open_chain(args.filename, args.fmt, args.force_share, for_io=False).close()
        from ..refcounts.check import check_image
        res = check_image(layer, args.filename)
    finally:
        layer.close()
    return _print_check(args, res)


def _print_check(args, res) -> int:
    from .qjson import dumps
    for m in res.messages:
        sys.stderr.write(m + "\n")
    if res.messages_dropped:
        sys.stderr.write("(%d more messages not shown)\n" % res.messages_dropped)
    if args.output == "json":
        sys.stdout.write(dumps(res.to_json()) + "\n")
    elif not args.quiet:
        sys.stdout.write(res.human())
    if res.check_errors:
        _err("Check failed")
    return res.exit_code


def cmd_map(args) -> int:
    from ..chain.map import map_entries, entry_human
    chain = _open_chain(args.filename, args.fmt, args.force_share)
    out = sys.stdout
    try:
        if args.output == "json":
            from ..chain.map import map_batches, json_lines
            first = True
            out.write("[")
            for batch in map_batches(chain, args.start_offset, args.max_length):
                lines = json_lines(batch)
                if lines:
                    out.write(("" if first else ",\n") + ",\n".join(lines))
                    first = False
            out.write("]\n")
        else:
            out.write("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
            for e in map_entries(chain, args.start_offset, args.max_length):
                line = entry_human(e)
                if line:
                    out.write(line + "\n")
    finally:
        chain.close()
    return 0


def cmd_compare(args) -> int:
    from ..chain.compare import compare_chains
    args._error_code = 2
    c1 = _open_chain(args.filename1, args.fmt1, args.force_share)
    try:
        c2 = _open_chain(args.filename2, args.fmt2, args.force_share)
    except BaseException:
        c1.close()
        raise
    try:
        args._error_code = 4
        res = compare_chains(c1, c2, strict=args.strict)
    finally:
        c1.close()
        c2.close()
    if not args.quiet:
        for m in res.messages:
            sys.stdout.write(m + "\n")
    return res.exit_code


def cmd_convert(args) -> int:
    from ..chain.convert import convert_to_raw, convert_to_qcow2
    if args.out_fmt not in ("raw", "qcow2"):
        _err("Unknown file format '%s'" % args.out_fmt)
        return 1
    if args.out_fmt == "raw" and (args.compress or args.backing):
        _err("Compression and backing files need -O qcow2")
        return 1
    if args.bitmaps and args.out_fmt != "qcow2":
        _err("Format driver '%s' does not support bitmaps" % args.out_fmt)
        return 1
    if args.backing and not args.backing_fmt:
        _err("Use of backing file requires explicit backing format")
        return 1
    sources = getattr(args, "sources", [args.filename])
    if len(sources) > 1:
        if args.snapshot:
            _err("No support for concatenating multiple snapshot")
            return 1
        if args.bitmaps:
            _err("Copying bitmaps only possible with single source")
            return 1
        if args.backing:
            _err("Having a backing file for the target makes no sense when concatenating "
                 "multiple input images")
            return 1
    from ..chain.session import open_chain
    chains = []
    try:
        for name in sources:
            chains.append(open_chain(name, args.fmt, force_share=args.force_share,
                                     snapshot=args.snapshot))
    except BaseException:
        for c in chains:
            c.close()
        raise
    if len(chains) == 1:
        chain = chains[0]
    else:
        from ..chain.concat import ConcatChain
        chain = ConcatChain(chains)
    if args.salvage:
        def salvaged(offset, length, msg):
            sys.stderr.write("%s: warning: error while reading offset %d: %s (%d bytes read "
                             "as zeros)\n" % (PROG, offset, msg, length))
        chain.salvage = salvaged
    try:
        progress = _progress(args, "convert")
        if args.out_fmt == "raw":
            convert_to_raw(chain, args.output, min_sparse=args.sparse, progress=progress,
                           create=not args.no_create, target_is_zero=args.target_is_zero)
        elif args.no_create:
            from ..chain.convert import convert_into_qcow2
            convert_into_qcow2(chain, args.output, progress=progress,
                               target_is_zero=args.target_is_zero, compress=args.compress)
        else:
            convert_to_qcow2(chain, args.output, ",".join(args.options) or None,
                             compress=args.compress, backing=args.backing,
                             backing_fmt=args.backing_fmt, min_sparse=args.sparse,
                             progress=progress)
        if progress:
            progress.close()
        if args.bitmaps:
            from ..chain.session import open_file
            from ..image.bitmaps import copy_bitmaps
            dst = open_file(args.output, "qcow2", writable=True)
            try:
                copy_bitmaps(chain.top.image, dst, args.skip_broken)
            finally:
                dst.close()
    finally:
        chain.close()
    return 0


def _progress(args, what: str):
    """qemu-img's -p output on stdout: `    (NN.NN/100%)` and a carriage return at each
    whole percent, 100% and a newline at the end (progress.close())."""
    if not getattr(args, "progress", False) or getattr(args, "quiet", False):
        return None
    state = {"last": -1}

    def show(pct):
        sys.stdout.write("    (%3.2f/100%%)\r" % pct)
        sys.stdout.flush()

    def cb(done, total):
        pct = 100.0 * done / total if total else 100.0
        if int(pct) != state["last"]:
            state["last"] = int(pct)
            show(pct)

    def close():
        show(100.0)
        sys.stdout.write("\n")
        sys.stdout.flush()
    show(0.0)
    cb.close = close
    return cb


def cmd_rebase(args) -> int:
    from ..api import rebase
    progress = _progress(args, "rebase")
    rebase(args.filename, args.backing, args.backing_fmt, unsafe=args.unsafe, progress=progress)
    if progress:
        progress.close()
    return 0


def cmd_commit(args) -> int:
    from ..api import commit
    progress = _progress(args, "commit")
    commit(args.filename, args.base, drop=args.drop, progress=progress)
    if progress:
        progress.close()
    if not args.quiet:
        sys.stdout.write("Image committed.\n")
    return 0


def cmd_stream(args) -> int:
    from ..api import stream
    progress = _progress(args, "stream")
    stream(args.filename, args.base, progress=progress)
    if progress:
        progress.close()
    return 0


def cmd_measure(args) -> int:
    from ..chain.measure import measure
    from .qjson import dumps
    if (args.size is None) == (args.filename is None):
        _err("Either --size N or one filename must be specified.")
        return 1
    opts = ",".join(args.options) or None
    if args.filename:
        from ..chain.session import open_chain
        chain = open_chain(args.filename, args.fmt, force_share=args.force_share, snapshot=args.snapshot)
        try:
            res = measure(chain, options=opts, out_fmt=args.out_fmt)
        finally:
            chain.close()
    else:
        res = measure(None, args.size, options=opts, out_fmt=args.out_fmt)
    if args.output == "json":
        sys.stdout.write(dumps(res) + "\n")
    else:
        sys.stdout.write("required size: %d\nfully allocated size: %d\n"
                         % (res["required"], res["fully-allocated"]))
        if "bitmaps" in res:
            sys.stdout.write("bitmaps size: %d\n" % res["bitmaps"])
    return 0


def cmd_create(args) -> int:
    from ..image.create import parse_options, parse_size, formatting_line, check_format, CreateError
    check_format(args.filename, args.fmt)
    spec = ",".join(args.options) if args.options else None
    o = parse_options(spec)
    if args.size is not None:
        o.size = parse_size(args.size)
    if args.backing:
        o.backing_file = args.backing
    if args.backing_fmt:
        o.backing_fmt = args.backing_fmt
    if o.backing_file and not o.backing_fmt:
        raise CreateError("Backing file specified without backing format")
    if o.size is None and not o.backing_file:
        raise CreateError("Image creation needs a size parameter")
    if o.backing_file and (o.size is None or not args.unsafe):
        # like qemu-img: the backing file must open (and gives the size when none is given)
        from ..api import backing_size_for_create
        backing_size_for_create(args.filename, o)
    if not args.quiet:
        sys.stdout.write(formatting_line(args.filename, o, args.fmt) + "\n")
        sys.stdout.flush()
    from ..image.create import create_from_options
    create_from_options(args.filename, o, args.fmt)
    return 0


def cmd_resize(args) -> int:
    from ..api import resize
    from ..image.create import parse_size
    from ..chain.session import open_file
    text = args.size
    if text[:1] in "+-":
        f = open_file(args.filename, args.fmt, force_share=True)
        cur = f.size
        f.close()
        delta = parse_size(text[1:])
        new = cur + delta if text[0] == "+" else cur - delta
    else:
        new = parse_size(text)
    if new < 0:
        _err("New image size must be positive")
        return 1
    resize(args.filename, new, shrink=args.shrink, fmt=args.fmt)
    if not args.quiet:
        sys.stdout.write("Image resized.\n")
    return 0


def cmd_amend(args) -> int:
    from ..api import amend
    if not args.options:
        _err("Must specify options (-o)")
        return 1
    amend(args.filename, ",".join(args.options), force=args.force)
    return 0


def cmd_snapshot(args) -> int:
    from ..chain.session import open_file
    from ..errors import SnapshotError
    writing = args.create is not None or args.apply is not None or args.delete is not None
    if writing and args.force_share:
        _err("force-share=on can only be used with read-only images")
        return 1
    f = open_file(args.filename, args.fmt, force_share=args.force_share, writable=writing)
    try:
        if f.format == "qcow2" and f.encrypted:      # qemu-img opens it with its key
            from ..chain.session import unlock_image
            unlock_image(f, args.filename)
        if f.format == "raw":
            raise SnapshotError("Format driver 'raw' does not support internal snapshots")
        from ..image import snapshots as S
        if args.create is not None:
            try:
                S.create_snapshot(f, args.create)
            except SnapshotError as e:
                raise SnapshotError("Could not create snapshot '%s': %s" % (args.create, e)) from None
            except Exception as e:
                from ..errors import RefcountOverflow
                if isinstance(e, RefcountOverflow):
                    raise SnapshotError("Could not create snapshot '%s': %s" % (args.create, e)) from None
                raise
        elif args.apply is not None:
            S.apply_snapshot(f, args.apply)
        elif args.delete is not None:
            S.delete_snapshot(f, args.delete)
        else:
            from ..image.info import snapshot_info
            from .render import snapshot_table_lines
            snaps = [snapshot_info(sn) for sn in f.snapshots]
            if snaps:
                sys.stdout.write("Snapshot list:\n" + "\n".join(snapshot_table_lines(snaps)) + "\n")
    finally:
        f.close()
    return 0


def cmd_io(args) -> int:
    from .io import cmd_io as run
    return run(args)


def cmd_dd(args) -> int:
    from .verbs import cmd_dd as run
    return run(args)


def cmd_bench(args) -> int:
    from .verbs import cmd_bench as run
    return run(args)


def cmd_bitmap(args) -> int:
    from .verbs import cmd_bitmap as run
    return run(args)
