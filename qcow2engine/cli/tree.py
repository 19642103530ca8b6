"""The machine verbs: `machine define|undefine|list|info|check|recover|start|stop|attach` and
virsh's
`snapshot-create-as`, `snapshot-list`, `snapshot-info`, `snapshot-current`,
`snapshot-parent`, `snapshot-revert`, `snapshot-delete`.

Errors: one line on stderr, exit 1; `machine check`: 0 consistent, 2 inconsistent.  The state
directory: the global `--state-dir DIR`, else $QCOW2ENGINE_STATE_DIR, else
$XDG_DATA_HOME/qcow2engine.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from .main import TREE_VERBS as VERBS  # noqa: F401 - the verbs this module serves
PROG = "qcow2engine"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=4) + "\n")


def _err(msg: str) -> None:
    sys.stderr.write("%s: %s\n" % (PROG, " ".join(str(msg).split("\n"))))


def build_parser():
    p = _Parser(prog=PROG)
    sub = p.add_subparsers(dest="verb")
    mp = sub.add_parser("machine")
    ms = mp.add_subparsers(dest="mverb")
    s = ms.add_parser("define")
    s.add_argument("name")
    s.add_argument("--disk", action="append", default=[], metavar="DISK=PATH")
    s.add_argument("--memory", metavar="SIZE")
    s.add_argument("--cpus", type=int)
    s.add_argument("--machine-type")
    s.add_argument("--kernel")
    s.add_argument("--initrd")
    s.add_argument("--append")
    s.add_argument("--accel", choices=["auto", "kvm", "tcg"])
    s.add_argument("--qemu-arg", action="append", default=[], metavar="ARG")
    s = ms.add_parser("start")
    s.add_argument("name")
    s.add_argument("--paused", action="store_true")
    s = ms.add_parser("stop")
    s.add_argument("name")
    s.add_argument("--force", action="store_true")
    s.add_argument("--timeout", type=float, default=60.0)
    for v in ("suspend", "resume"):
        ms.add_parser(v).add_argument("name")
    s = ms.add_parser("attach")
    s.add_argument("name")
    s.add_argument("--qmp", required=True, metavar="SOCKET")
    s = ms.add_parser("undefine")
    s.add_argument("name")
    s = ms.add_parser("list")
    s.add_argument("--output", choices=["human", "json"], default="human")
    s = ms.add_parser("info")
    s.add_argument("name")
    s.add_argument("--output", choices=["human", "json"], default="human")
    for v in ("check", "recover"):
        ms.add_parser(v).add_argument("name")

    s = sub.add_parser("snapshot-create-as")
    s.add_argument("machine")
    s.add_argument("name", nargs="?")
    s.add_argument("description_pos", nargs="?")
    s.add_argument("--name", dest="name_opt")
    s.add_argument("--description", default=None)
    s.add_argument("--disk-only", action="store_true")
    s.add_argument("--diskspec", action="append", default=[])
    s.add_argument("--memspec", metavar="[file=]PATH")
    s.add_argument("--live", action="store_true")
    s.add_argument("--halt", action="store_true")

    s = sub.add_parser("snapshot-list")
    s.add_argument("machine")
    for f in ("tree", "parent", "roots", "leaves", "no-leaves", "descendants", "internal",
              "external", "name"):
        s.add_argument("--" + f, action="store_true")
    s.add_argument("--from", dest="from_")
    s.add_argument("--output", choices=["human", "json"], default="human")

    s = sub.add_parser("snapshot-info")
    s.add_argument("machine")
    s.add_argument("snapshot", nargs="?")
    s.add_argument("--current", action="store_true")
    s.add_argument("--output", choices=["human", "json"], default="human")

    s = sub.add_parser("snapshot-current")
    s.add_argument("machine")
    s.add_argument("snapshot", nargs="?")
    s.add_argument("--name", action="store_true")

    s = sub.add_parser("snapshot-parent")
    s.add_argument("machine")
    s.add_argument("snapshot", nargs="?")
    s.add_argument("--current", action="store_true")

    s = sub.add_parser("snapshot-revert")
    s.add_argument("machine")
    s.add_argument("snapshot", nargs="?")
    s.add_argument("--current", action="store_true")
    g = s.add_mutually_exclusive_group()
    for f in ("reset", "follow", "commit"):
        g.add_argument("--" + f, action="store_true")
    s.add_argument("--discard", action="store_true")
    s.add_argument("--force", action="store_true")
    s.add_argument("--no-auto-snapshot", action="store_true")
    s.add_argument("-p", "--progress", action="store_true")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--running", action="store_true")
    g.add_argument("--paused", action="store_true")
    s.add_argument("--bandwidth", metavar="BYTES/S")

    s = sub.add_parser("snapshot-delete")
    s.add_argument("machine")
    s.add_argument("snapshot", nargs="?")
    s.add_argument("--current", action="store_true")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--children", action="store_true")
    g.add_argument("--children-only", action="store_true")
    s.add_argument("--metadata", action="store_true")
    s.add_argument("--flatten", action="store_true")
    s.add_argument("-p", "--progress", action="store_true")
    s.add_argument("--bandwidth", metavar="BYTES/S")
    return p


def main(argv, state_dir=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        _err(e)
        return 1
    if args.verb == "machine" and not args.mverb:
        _err("machine: a verb is needed (define, undefine, list, info, check, recover, start, "
             "stop, attach)")
        return 1
    from ..errors import Qcow2Error
    from ..tree import Tree
    try:
        with Tree(state_dir) as tree:
            fn = globals()["cmd_" + (args.verb if args.verb != "machine"
                                     else "machine_" + args.mverb).replace("-", "_")]
            return fn(tree, args)
    except Qcow2Error as e:
        _err(e)
        return 1
    except OSError as e:
        _err("%s: %s" % (getattr(e, "filename", None) or "I/O error", e.strerror or e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def _machine(tree, name):
    m = tree.machine(name)
    m.notice = lambda msg: sys.stderr.write("%s: %s\n" % (PROG, msg))
    return m


def _snapshot_arg(m, args, verb):
    if args.current:
        cur = m.current()
        if cur is None:
            raise _usage("%s: machine '%s' has no current snapshot" % (verb, m.name))
        return cur
    if not args.snapshot:
        raise _usage("%s: a snapshot name (or --current) is needed" % verb)
    return args.snapshot


def _usage(msg):
    from ..errors import InvalidRequestError
    return InvalidRequestError(msg)


# ---------------------------------------------------------------- machine
def cmd_machine_define(tree, args) -> int:
    disks = []
    for d in args.disk:
        name, eq, path = d.partition("=")
        if not eq or not name or not path:
            raise _usage("--disk %s: use DISK=PATH" % d)
        disks.append((name, path))
    launch = {"memory": args.memory, "cpus": args.cpus, "machine_type": args.machine_type,
              "kernel": args.kernel, "initrd": args.initrd, "append": args.append,
              "accel": args.accel, "qemu_args": args.qemu_arg}
    given = any(v for v in launch.values())
    tree.define(args.name, disks, launch if given else None)
    print("Machine %s defined" % args.name)
    return 0


def cmd_machine_start(tree, args) -> int:
    _machine(tree, args.name).start(paused=args.paused)
    print("Machine %s started%s" % (args.name, " (paused)" if args.paused else ""))
    return 0


def cmd_machine_stop(tree, args) -> int:
    how = _machine(tree, args.name).stop(force=args.force, timeout=args.timeout)
    print("Machine %s %s" % (args.name, "is shut off" if how == "powered down"
                             else "destroyed" if args.force else "is shut off (quit after "
                             "%.0f s without an ACPI power-down)" % args.timeout))
    return 0


def cmd_machine_suspend(tree, args) -> int:
    _machine(tree, args.name).suspend()
    print("Machine %s suspended" % args.name)
    return 0


def cmd_machine_resume(tree, args) -> int:
    _machine(tree, args.name).resume()
    print("Machine %s resumed" % args.name)
    return 0


def cmd_machine_attach(tree, args) -> int:
    _machine(tree, args.name).attach(args.qmp)
    print("Machine %s attached" % args.name)
    return 0


def cmd_machine_undefine(tree, args) -> int:
    tree.undefine(args.name)
    print("Machine %s has been undefined" % args.name)
    return 0


def cmd_machine_list(tree, args) -> int:
    rows = [{"name": n, "state": _machine(tree, n).run_state()} for n in tree.names()]
    if args.output == "json":
        _json(rows)
        return 0
    from .tree_render import machine_table
    sys.stdout.write(machine_table(rows))
    return 0


def cmd_machine_info(tree, args) -> int:
    info = _machine(tree, args.name).info()
    if args.output == "json":
        _json(info)
        return 0
    lines = ["%-15s %s" % ("Name:", info["name"]), "%-15s %s" % ("State:", info["state"]),
             "%-15s %s" % ("Current:", info["current"] or "-")]
    if info["qmp"]:
        lines.append("%-15s %s" % ("QMP:", info["qmp"]))
    op = info["operation"]
    lines.append("%-15s %s" % ("Operation:", "-" if op is None else
                               "%s (step %d of %d, pending: run 'machine recover %s')"
                               % (op["kind"], op["step"], op["steps"], info["name"])))
    for d in info["disks"]:
        lines.append("%-15s %s (%s)" % ("Disk %s:" % d["name"], d["active"], d["format"]))
        for below in d["chain"][1:]:
            lines.append("%-15s   backed by %s" % ("", below))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_machine_check(tree, args) -> int:
    found = _machine(tree, args.name).check()
    for f in found:
        print(f)
    if not found:
        print("Machine %s is consistent" % args.name)
    return 2 if found else 0


def cmd_machine_recover(tree, args) -> int:
    r = _machine(tree, args.name).recover()
    print("Machine %s: %s" % (args.name, "nothing to recover" if r is None
                              else "the pending operation was " + r))
    return 0


# ---------------------------------------------------------------- snapshots
def cmd_snapshot_create_as(tree, args) -> int:
    name = args.name_opt or args.name
    if not name:
        raise _usage("snapshot-create-as: a snapshot name is needed")
    desc = args.description if args.description is not None else (args.description_pos or "")
    specs = {}
    for spec in args.diskspec:
        parts = spec.split(",")
        disk, kind, file = parts[0], None, None
        for kv in parts[1:]:
            k, _, v = kv.partition("=")
            if k == "snapshot":
                kind = v
            elif k == "file":
                file = v
            else:
                raise _usage("--diskspec %s: unknown key '%s' (snapshot=, file=)" % (spec, k))
        if not disk:
            raise _usage("--diskspec %s: the disk name comes first" % spec)
        if kind is None:
            kind = "external" if (args.disk_only or file) else "internal"
        specs[disk] = (kind, file)
    mem = args.memspec
    if mem is not None:
        parts = dict(kv.partition("=")[::2] if "=" in kv else ("file", kv)
                     for kv in mem.split(","))
        if set(parts) - {"file", "snapshot"} or parts.get("snapshot", "external") != "external" \
                or not parts.get("file"):
            raise _usage("--memspec %s: use file=PATH (snapshot=external)" % mem)
        mem = parts["file"]
    r = _machine(tree, args.machine).create_snapshot(name, description=desc, diskspecs=specs,
                                                     disk_only=args.disk_only, memspec=mem,
                                                     live=args.live, halt=args.halt)
    if r.paused_seconds is not None:
        sys.stderr.write("%s: the guest was paused %.3f s\n" % (PROG, r.paused_seconds))
    print("Domain snapshot %s created" % name)
    return 0


def cmd_snapshot_list(tree, args) -> int:
    m = _machine(tree, args.machine)
    docs = m.snapshots(roots=args.roots, leaves=args.leaves, no_leaves=args.no_leaves,
                       from_=args.from_, descendants=args.descendants or args.tree and
                       bool(args.from_), internal=args.internal, external=args.external)
    if args.output == "json":
        _json(docs)
        return 0
    from .tree_render import snapshot_names, snapshot_table, snapshot_tree
    if args.tree:
        names = {d["name"] for d in docs}
        items = [(d["name"], d["parent"] if d["parent"] in names else None) for d in docs]
        if args.from_:
            items.append((args.from_, None))
            items = [(n, p if p is not None or n == args.from_ else args.from_)
                     for n, p in items]
        sys.stdout.write(snapshot_tree(items))
    elif args.name:
        sys.stdout.write(snapshot_names(docs))
    else:
        sys.stdout.write(snapshot_table(docs, parent=args.parent))
    return 0


def _location(doc) -> str:
    """virsh's Location row: external when any disk's snapshot is external."""
    kinds = {d["snapshot"] for d in doc["disks"].values()}
    return "external" if "external" in kinds else "internal"


def cmd_snapshot_info(tree, args) -> int:
    m = _machine(tree, args.machine)
    doc = m.snapshot_info(None if args.current else _snapshot_arg(m, args, "snapshot-info"))
    if args.output == "json":
        _json(doc)
        return 0
    from .tree_render import snapshot_info
    sys.stdout.write(snapshot_info({"name": doc["name"], "domain": m.name,
                                    "current": doc["current"], "state": doc["state"],
                                    "location": _location(doc), "parent": doc["parent"],
                                    "children": doc["children"],
                                    "descendants": doc["descendants"], "metadata": True}))
    return 0


def cmd_snapshot_current(tree, args) -> int:
    m = _machine(tree, args.machine)
    if args.snapshot:
        m.set_current(args.snapshot)
        print("Snapshot %s set as current" % args.snapshot)
        return 0
    cur = m.current()
    if cur is None:
        raise _usage("machine '%s' has no current snapshot" % m.name)
    if args.name:
        print(cur)
        return 0
    _json(m.snapshot_info(cur))
    return 0


def cmd_snapshot_parent(tree, args) -> int:
    m = _machine(tree, args.machine)
    name = _snapshot_arg(m, args, "snapshot-parent")
    parent = m.parent(name)
    if parent is None:
        raise _usage("snapshot '%s' has no parent" % name)
    print(parent)
    return 0


class _Progress:
    def __init__(self, on: bool):
        self.on = on

    def __call__(self, done, total):
        if self.on and total:
            sys.stderr.write("    (%.2f/100%%)\r" % (100.0 * done / total))
            sys.stderr.flush()

    def end(self):
        if self.on:
            sys.stderr.write("    (100.00/100%)\n")


def _cancel_on_signals():
    ev = threading.Event()

    def handler(signum, frame):
        ev.set()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return ev, old


def _bandwidth(args):
    """--bandwidth: bytes per second of a running machine's merge jobs (k/M/G suffixes)."""
    if args.bandwidth is None:
        return None
    from ..units import parse_size
    v = parse_size(args.bandwidth, what="--bandwidth")
    if v <= 0:
        raise _usage("--bandwidth must be positive")
    return v


def cmd_snapshot_revert(tree, args) -> int:
    m = _machine(tree, args.machine)
    name = _snapshot_arg(m, args, "snapshot-revert")
    mode = "follow" if args.follow else "commit" if args.commit else "reset"
    prog = _Progress(args.progress)
    cancel, old = _cancel_on_signals()
    try:
        r = m.revert(name, mode=mode, discard=args.discard, force=args.force,
                     auto_snapshot=not args.no_auto_snapshot, progress=prog, cancel=cancel,
                     running=True if args.running else False if args.paused else None,
                     speed=_bandwidth(args))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for msg in r.messages:
        sys.stderr.write("%s: %s\n" % (PROG, msg))
    if not r.completed:
        _err("snapshot-revert cancelled: snapshot '%s' is marked merging; the same command "
             "resumes it" % name)
        return 1
    prog.end()
    if r.auto_snapshot:
        print("Domain snapshot %s keeps the tip" % r.auto_snapshot)
    return 0


def cmd_snapshot_delete(tree, args) -> int:
    m = _machine(tree, args.machine)
    name = _snapshot_arg(m, args, "snapshot-delete")
    prog = _Progress(args.progress)
    m.delete(name, children=args.children, children_only=args.children_only,
             metadata=args.metadata, flatten=args.flatten, progress=prog,
             speed=_bandwidth(args))
    prog.end()
    if args.children_only:
        print("Domain snapshot %s children deleted" % name)
    else:
        print("Domain snapshot %s deleted" % name)
    return 0
