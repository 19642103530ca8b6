"""virsh's text layouts (libvirt 9.x) for snapshot trees, snapshot lists and machine lists.

Pure functions: no I/O, standard library only.  Each returns the whole of what `virsh CMD`
writes to stdout (English messages, a UTF-8 locale, without `--quiet`), including the one
"\\n" that virsh's command loop (vshCommandRun) prints after every command's own output.
Strip one trailing "\\n" to get only the command's own text.

What each function reproduces:

- `snapshot_table` -- `virsh snapshot-list DOM [--parent]`: a vshTable with the columns
  Name, Creation Time, State (and Parent with --parent; a snapshot without a parent gets an
  empty cell).  Rows are in virsh's default order: names compared as strcasecmp() does
  (ASCII letters folded to lower case, then bytes), not --topological.  The time is
  "%Y-%m-%d %H:%M:%S %z" in the local zone (GLib's g_date_time_new_from_unix_local).
- `snapshot_names` -- `virsh snapshot-list DOM --name`: one name a line, same order.
- `snapshot_tree` -- `virsh snapshot-list DOM --tree` (vshTreePrint, called once per root,
  roots and siblings in the same name order).  A node's line is its prefix, "+- " unless it
  is a root, and its name.  A node with children is followed by a line of its indent and
  "  |"; its children are printed with its indent plus two spaces, where a child's own
  indent adds "| " while siblings follow it and "  " when it is the last.  A node without
  children that is the last of its siblings (a root is always last) is followed by a line of
  its indent alone -- spaces and bars, possibly trailing spaces, an empty line for a root.
- `snapshot_info` -- `virsh snapshot-info DOM SNAP`: `"%-15s %s\\n"` lines (label padded to
  15 columns, then one space) Name, Domain, Current, State, Location, Parent ("-" when
  none), Children, Descendants, Metadata.
- `machine_table` -- `virsh list --all`: a vshTable with the columns Id, Name, State; a
  machine that is not running has Id "-".  Rows are in virsh's order: running machines by
  Id, then the others by name (strcasecmp order).

vshTable layout (tools/vsh-table.c): every cell is printed as " " + text; every column but
the last is padded with spaces to its widest cell (header included) and followed by two
spaces, so columns are 3 apart and the last cell is not padded (an empty last cell leaves
trailing spaces).  Below the header is a line of dashes of length sum(width + 3) over the
columns, i.e. the fully padded line's length + 2.  No blank line of its own; with no rows
only the header and the dashes are printed.  Widths are display widths: East Asian wide
and fullwidth characters count 2, combining and other zero-width characters 0.  Cells are
escaped as vshTableSafeEncode does: an ASCII control character becomes "\\xNN" (width 4)
and a backslash followed by "x" becomes "\\x5c"; a non-ASCII character that is not
printable (C1 controls, line and paragraph separators) becomes "\\xff" for each of its
UTF-8 bytes -- the bytes go through printf as signed chars and are cut to 4 characters, as
on x86-64 (an unsigned-char platform such as aarch64 would print the real bytes).  Tree,
name and info output is printed as is.
"""
from __future__ import annotations

import datetime as _dt
import math
import unicodedata

__all__ = ["snapshot_table", "snapshot_names", "snapshot_tree", "snapshot_info",
           "machine_table"]

# virshDomainStateToString's words; the other keys are libvirt's enum names for them.
_MACHINE_STATES = {
    "no state": "no state", "nostate": "no state",
    "running": "running",
    "idle": "idle", "blocked": "idle",
    "paused": "paused",
    "in shutdown": "in shutdown", "shutdown": "in shutdown",
    "shut off": "shut off", "shutoff": "shut off",
    "crashed": "crashed",
    "pmsuspended": "pmsuspended",
}


def _strcasecmp_key(name: str) -> bytes:
    """Sort key of C's strcasecmp() in a UTF-8 locale: ASCII folded to lower case, then bytes."""
    return name.encode("utf-8", "surrogateescape").translate(_ASCII_LOWER)


_ASCII_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def _char_width(ch: str) -> int:
    cp = ord(ch)
    if cp == 0x00AD:                      # soft hyphen: shown, one column
        return 1
    if unicodedata.category(ch) in ("Mn", "Me", "Cf") or 0x1160 <= cp <= 0x11FF:
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _cell(text: str) -> tuple:
    """(escaped text, display width) of one table cell."""
    out = []
    width = 0
    for i, ch in enumerate(text):
        cp = ord(ch)
        if cp < 0x20 or cp == 0x7F or (ch == "\\" and text[i + 1:i + 2] == "x"):
            out.append("\\x%02x" % cp)
            width += 4
        elif cp >= 0x80 and unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            n = len(ch.encode("utf-8"))
            out.append("\\xff" * n)
            width += 4 * n
        else:
            out.append(ch)
            width += _char_width(ch)
    return "".join(out), width


def _vsh_table(header: list, rows: list) -> str:
    """A vshTable printed with its header, then virsh's end-of-command newline."""
    cells = [[_cell(str(c)) for c in row] for row in [header, *rows]]
    ncols = len(header)
    widths = [max(r[j][1] for r in cells) for j in range(ncols)]
    lines = []
    for k, row in enumerate(cells):
        parts = []
        for j, (text, w) in enumerate(row):
            parts.append(" " + text)
            if j < ncols - 1:
                parts.append(" " * (widths[j] - w) + "  ")
        lines.append("".join(parts))
        if k == 0:
            lines.append("-" * sum(w + 3 for w in widths))
    return "\n".join(lines) + "\n" + "\n"


def _format_created(created: float, tz) -> str:
    secs = math.floor(created)
    if tz is None:
        when = _dt.datetime.fromtimestamp(secs).astimezone()
    else:
        when = _dt.datetime.fromtimestamp(secs, tz)
    off = when.utcoffset() or _dt.timedelta(0)
    total = int(off.total_seconds())
    sign = "-" if total < 0 else "+"
    total = abs(total)
    return "%s %s%02d%02d" % (when.strftime("%Y-%m-%d %H:%M:%S"), sign,
                              total // 3600, total % 3600 // 60)


def _by_name(rows: list) -> list:
    return sorted(rows, key=lambda r: _strcasecmp_key(r["name"]))


def snapshot_table(rows, *, parent: bool = False, tz=None) -> str:
    """`virsh snapshot-list DOM [--parent]`.

    rows: dicts with "name", "created" (epoch seconds; whole seconds are shown), "state"
    and, for parent=True, "parent" (None for a root: an empty cell).  tz: a tzinfo to show
    the times in, None for the local zone.
    """
    header = ["Name", "Creation Time", "State"] + (["Parent"] if parent else [])
    body = []
    for r in _by_name(list(rows)):
        cells = [r["name"], _format_created(r["created"], tz), r["state"]]
        if parent:
            cells.append(r.get("parent") or "")
        body.append(cells)
    return _vsh_table(header, body)


def snapshot_names(rows) -> str:
    """`virsh snapshot-list DOM --name`: each name and "\\n", in name order, then "\\n"."""
    return "".join(r["name"] + "\n" for r in _by_name(list(rows))) + "\n"


def snapshot_tree(items) -> str:
    """`virsh snapshot-list DOM --tree` for (name, parent) pairs (parent None for roots).

    Raises ValueError for a repeated name, or for a node that no root leads to (its parent
    is missing, or the parents form a cycle), which virsh's listing cannot contain.
    """
    items = list(items)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("snapshot names are not unique")
    known = set(names)
    children = {n: [] for n in names}
    roots = []
    for name, par in items:
        if par is None:
            roots.append(name)
        elif par not in known:
            raise ValueError("snapshot %r has unknown parent %r" % (name, par))
        else:
            children[par].append(name)
    for kids in children.values():
        kids.sort(key=_strcasecmp_key)
    roots.sort(key=_strcasecmp_key)

    lines = []
    printed = 0
    for root in roots:
        # (name, prefix of its line, is a root, is the last of its siblings)
        stack = [(root, "", True, True)]
        while stack:
            name, prefix, is_root, last = stack.pop()
            printed += 1
            lines.append(prefix + ("" if is_root else "+- ") + name)
            indent = prefix if is_root else prefix + (" " if last else "|") + " "
            kids = children[name]
            if kids:
                lines.append(indent + "  |")
                for i in range(len(kids) - 1, -1, -1):
                    stack.append((kids[i], indent + "  ", False, i == len(kids) - 1))
            elif last:
                lines.append(indent)
    if printed != len(items):
        raise ValueError("snapshot parents form a cycle")
    return "".join(line + "\n" for line in lines) + "\n"


def snapshot_info(fields) -> str:
    """`virsh snapshot-info DOM SNAP`.

    fields: name, domain, current (bool), state, location ("internal"/"external"),
    parent (str or None), children (int), descendants (int), metadata (bool).
    """
    rows = [
        ("Name:", fields["name"]),
        ("Domain:", fields["domain"]),
        ("Current:", "yes" if fields["current"] else "no"),
        ("State:", fields["state"]),
        ("Location:", fields["location"]),
        ("Parent:", fields["parent"] if fields.get("parent") else "-"),
        ("Children:", "%d" % fields["children"]),
        ("Descendants:", "%d" % fields["descendants"]),
        ("Metadata:", "yes" if fields["metadata"] else "no"),
    ]
    return "".join("%-15s %s\n" % (label, value) for label, value in rows) + "\n"


def machine_table(rows) -> str:
    """`virsh list --all`.

    rows: dicts with "name" and "state" (virsh's words -- "running", "paused", "shut off",
    ... -- or libvirt's enum names such as "shutoff"), optionally "id" (int).  A machine
    that is shut off has Id "-"; any other machine without an "id" is numbered after the
    largest given id, in the order given.
    """
    rows = list(rows)
    next_id = 1 + max([r["id"] for r in rows if r.get("id") is not None], default=0)
    active, inactive = [], []
    for r in rows:
        state = _MACHINE_STATES.get(r["state"], r["state"])
        if state == "shut off":
            inactive.append(("-", r["name"], state))
            continue
        ident = r.get("id")
        if ident is None:
            ident, next_id = next_id, next_id + 1
        active.append((int(ident), r["name"], state))
    active.sort(key=lambda t: t[0])
    inactive.sort(key=lambda t: _strcasecmp_key(t[1]))
    body = [["%d" % i, n, s] for i, n, s in active] + [list(t) for t in inactive]
    return _vsh_table(["Id", "Name", "State"], body)
