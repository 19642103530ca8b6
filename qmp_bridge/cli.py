"""`qcow2engine live --qmp SOCKET COMMAND ...`: the command line for a running QEMU.

    info [--output=json]                      disks, their chains, jobs
    snapshot --overlay DISK=PATH ...          external snapshot, atomic over the disks named
    commit DISK [--top NODE] [--base NODE] [--speed BPS] [--keep-top] [-p] [--wait]
    stream DISK [--base NODE] [--speed BPS] [-p] [--wait]
    jobs [--output=json]                      every job QEMU lists
    cancel JOB                                cancel and wait for the end
    complete JOB [--keep-top] [-p]            finish a job started without --wait (pivot,
                                              finalize, remove the nodes left behind)
    speed JOB BPS | pause JOB | resume JOB
    savevm TAG | loadvm TAG | delvm TAG       internal snapshots (all disks, VM state on one)

Without --wait, commit and stream print the job id and return; the job runs on in QEMU (and
survives us): `jobs` shows it, `complete` or `cancel` ends it.  Errors are one line on stderr
and exit code 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

PROG = "qcow2engine live"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _rate(text: str) -> int:
    """Bytes per second in qemu-img's size grammar (qcow2engine.units)."""
    from qcow2engine.errors import InvalidRequestError
    from qcow2engine.units import parse_size
    try:
        return parse_size(text, what="speed")
    except InvalidRequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `live`."""
    p = _Parser(prog=PROG, description="drive a running QEMU over QMP")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="QEMU's QMP unix socket")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds allowed for each QMP command (default 30)")
    sub = p.add_subparsers(dest="cmd")

    s = sub.add_parser("info", help="disks, chains and jobs")
    s.add_argument("--output", choices=["human", "json"], default="human")

    s = sub.add_parser("snapshot", help="external snapshot of one or more disks (atomic)")
    s.add_argument("--overlay", action="append", required=True, metavar="DISK=PATH")
    s.add_argument("--relative-backing", action="store_true",
                   help="write the backing name relative to the overlay's directory")
    s.add_argument("--output", choices=["human", "json"], default="human")

    s = sub.add_parser("commit", help="commit a chain's top into its base (live)")
    s.add_argument("disk")
    s.add_argument("--top")
    s.add_argument("--base")
    s.add_argument("--speed", type=_rate)
    s.add_argument("--keep-top", action="store_true",
                   help="active commit: stay on the top image instead of pivoting")
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--job-id")

    s = sub.add_parser("stream", help="pull backing data into the active layer (live)")
    s.add_argument("disk")
    s.add_argument("--base")
    s.add_argument("--speed", type=_rate)
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--job-id")

    s = sub.add_parser("jobs", help="list jobs")
    s.add_argument("--output", choices=["human", "json"], default="human")

    s = sub.add_parser("cancel", help="cancel a job")
    s.add_argument("job")

    s = sub.add_parser("complete", help="finish a job (pivot / finalize / clean up)")
    s.add_argument("job")
    s.add_argument("--keep-top", action="store_true")
    s.add_argument("-p", dest="progress", action="store_true")

    s = sub.add_parser("speed", help="change a job's speed limit")
    s.add_argument("job")
    s.add_argument("bps", type=_rate)
    for name in ("pause", "resume"):
        s = sub.add_parser(name, help="%s a job" % name)
        s.add_argument("job")

    for name, what in (("savevm", "take"), ("loadvm", "revert to"), ("delvm", "delete")):
        s = sub.add_parser(name, help="%s an internal snapshot of the whole VM" % what)
        s.add_argument("tag")
        s.add_argument("--device", action="append", metavar="NODE",
                       help="node to include (default: every writable disk)")
        if name != "delvm":
            s.add_argument("--vmstate", metavar="NODE")
    return p


def _err(msg: object) -> None:
    sys.stderr.write("qcow2engine: %s\n" % " ".join(str(msg).split()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run `live` with `argv` (the arguments after "live"); returns the exit code."""
    from qcow2engine.errors import Qcow2Error
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _UsageError as e:
        _err(e)
        return 1
    if not args.cmd:
        parser.print_help()
        return 1
    from .client import QMPSession
    try:
        with QMPSession.attach(args.qmp, timeout=args.timeout) as qmp:
            return _COMMANDS[args.cmd](qmp, args)
    except Qcow2Error as e:
        _err(e)
        return 1
    except OSError as e:
        _err("%s: %s" % (e.filename or "I/O error", e.strerror or e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted (a job keeps running in QEMU: see 'jobs')")
        return 130
    except Exception as e:  # a bug: still one line, never a traceback
        _err("internal error: %s: %s" % (type(e).__name__, e))
        return 1


# ---------------------------------------------------------------------- output helpers
def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n"
                   for r in rows)


def _jobs_table(jobs: list[Any]) -> str:
    rows = [["ID", "TYPE", "STATUS", "PROGRESS", "SPEED", "DISK", "ERROR"]]
    for j in jobs:
        pct = "%.1f%%" % (100.0 * j.current / j.total) if j.total else "-"
        rows.append([j.id, j.type, j.status, "%s / %s (%s)" % (_size(j.current), _size(j.total),
                                                               pct),
                     "%s/s" % _size(j.speed) if j.speed else "-", j.disk or "-",
                     j.error or ""])
    return _table(rows)


def _progress_bar(enabled: bool, what: str) -> tuple[Callable[[int, int], None] | None,
                                                     Callable[[], None]]:
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
               dynamic_ncols=True, leave=True, file=sys.stderr)

    def cb(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)
    return cb, bar.close


def _print_result(res: Any) -> None:
    line = "Job %s (%s): %s" % (res.id, res.type, res.outcome)
    if res.removed_nodes:
        line += "; removed nodes: %s" % ", ".join(res.removed_nodes)
    if res.kept_nodes:
        line += "; nodes left in place: %s" % ", ".join(res.kept_nodes)
    sys.stdout.write(line + "\n")


# ---------------------------------------------------------------------- commands
def cmd_info(qmp: Any, args: argparse.Namespace) -> int:
    from .graph import read_graph
    g = read_graph(qmp)
    if args.output == "json":
        sys.stdout.write(json.dumps(g.to_json(), indent=4) + "\n")
        return 0
    out = []
    for d in g.disks:
        out.append("%s%s\n" % (d.name, " (%s)" % d.device if d.device and d.device != d.name
                               else ""))
        rows = [[("  " if i == 0 else "  " + "  " * (i - 1) + "└ ") + n.name, n.driver,
                 n.filename or "-", _size(n.virtual_size), "ro" if n.read_only else "rw"]
                for i, n in enumerate(d.chain)]
        out.append(_table(rows))
    if g.jobs:
        out.append("\nJobs:\n" + _jobs_table(g.jobs))
    sys.stdout.write("".join(out) if out else "No disks.\n")
    return 0


def cmd_snapshot(qmp: Any, args: argparse.Namespace) -> int:
    from .snapshot import snapshot_disks
    overlays: dict[str, str] = {}
    for item in args.overlay:
        disk, sep, path = item.partition("=")
        if not sep or not disk or not path:
            _err("--overlay expects DISK=PATH, got '%s'" % item)
            return 1
        if disk in overlays:
            _err("Disk '%s' named twice" % disk)
            return 1
        overlays[disk] = path
    res = snapshot_disks(qmp, overlays, relative_backing=args.relative_backing)
    if args.output == "json":
        sys.stdout.write(json.dumps(res.to_json(), indent=4) + "\n")
    else:
        for o in res.overlays:
            sys.stdout.write("%s: now on %s (node %s), backing %s\n"
                             % (o.disk, o.path, o.node, o.backing_node))
    return 0


def _run_job(job: Any, args: argparse.Namespace, pivot: bool, what: str) -> int:
    if not args.wait:
        sys.stdout.write("%s\n" % job.id)
        job.close()
        return 0
    cb, close = _progress_bar(args.progress, what)
    try:
        with job:
            res = job.run(pivot=pivot, progress=cb)
    finally:
        close()
    _print_result(res)
    return 0


def cmd_commit(qmp: Any, args: argparse.Namespace) -> int:
    from .blockjobs import start_commit
    job = start_commit(qmp, args.disk, top=args.top, base=args.base, speed=args.speed,
                       job_id=args.job_id)
    return _run_job(job, args, not args.keep_top, "commit")


def cmd_stream(qmp: Any, args: argparse.Namespace) -> int:
    from .blockjobs import start_stream
    job = start_stream(qmp, args.disk, base=args.base, speed=args.speed, job_id=args.job_id)
    return _run_job(job, args, True, "stream")


def cmd_jobs(qmp: Any, args: argparse.Namespace) -> int:
    from .graph import read_graph
    jobs = read_graph(qmp).jobs
    if args.output == "json":
        sys.stdout.write(json.dumps([j.to_json() for j in jobs], indent=4) + "\n")
    elif jobs:
        sys.stdout.write(_jobs_table(jobs))
    else:
        sys.stdout.write("No jobs.\n")
    return 0


def _adopt(qmp: Any, job_id: str) -> Any:
    from .blockjobs import ChainJob
    from .graph import read_graph
    from .jobs import Job
    g = read_graph(qmp)
    info = g.job(job_id)
    if info.type in ("commit", "stream"):
        return ChainJob.adopt_on(qmp, job_id, g)
    return Job.adopt(qmp, job_id)


def cmd_cancel(qmp: Any, args: argparse.Namespace) -> int:
    with _adopt(qmp, args.job) as job:
        res = job.cancel()
    _print_result(res)
    return 0


def cmd_complete(qmp: Any, args: argparse.Namespace) -> int:
    cb, close = _progress_bar(args.progress, "complete")
    try:
        with _adopt(qmp, args.job) as job:
            info = job.info()
            if info is not None and info.paused and info.status != "concluded":
                _err("Job '%s' is paused: resume it first" % args.job)
                return 1
            res = job.finish(pivot=not args.keep_top, progress=cb)
    finally:
        close()
    _print_result(res)
    return 0


def cmd_speed(qmp: Any, args: argparse.Namespace) -> int:
    from .jobs import Job
    with Job.adopt(qmp, args.job) as job:
        job.set_speed(args.bps)
    return 0


def cmd_pause(qmp: Any, args: argparse.Namespace) -> int:
    from .jobs import Job
    with Job.adopt(qmp, args.job) as job:
        job.pause()
    return 0


def cmd_resume(qmp: Any, args: argparse.Namespace) -> int:
    from .jobs import Job
    with Job.adopt(qmp, args.job) as job:
        job.resume()
    return 0


def _internal(fn_name: str) -> Callable[[Any, argparse.Namespace], int]:
    def run(qmp: Any, args: argparse.Namespace) -> int:
        from . import internal
        fn = getattr(internal, fn_name)
        kw: dict[str, Any] = {"devices": args.device}
        if getattr(args, "vmstate", None):
            kw["vmstate"] = args.vmstate
        fn(qmp, args.tag, **kw)
        return 0
    return run


_COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "info": cmd_info, "snapshot": cmd_snapshot, "commit": cmd_commit, "stream": cmd_stream,
    "jobs": cmd_jobs, "cancel": cmd_cancel, "complete": cmd_complete, "speed": cmd_speed,
    "pause": cmd_pause, "resume": cmd_resume, "savevm": _internal("save_vm"),
    "loadvm": _internal("load_vm"), "delvm": _internal("delete_vm"),
}
