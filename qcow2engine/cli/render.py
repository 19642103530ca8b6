"""Human output of the CLI: qemu-img's text layouts for the documents the API returns."""
from __future__ import annotations

import math
import time


def size_to_str(val: int) -> str:
    """Human size as QEMU prints it ("332 KiB", "1 GiB", "0 B")."""
    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    _, e = math.frexp(val / (1000.0 / 1024.0))
    i = max((e - 1) // 10, 0)
    i = min(i, 6)
    return "%0.3g %sB" % (val / float(1 << (i * 10)), suffixes[i])


def _dump_value(key: str, val, level: int, out: list) -> None:
    from .qjson import qdict_order
    pad = "    " * level
    if isinstance(val, dict):
        out.append("%s%s:" % (pad, key))
        for k in qdict_order(val):
            _dump_value(k.replace("-", " "), val[k], level + 1, out)
    elif isinstance(val, list):
        out.append("%s%s:" % (pad, key))
        for i, v in enumerate(val):
            _dump_value("[%d]" % i, v, level + 1, out)
    elif isinstance(val, bool):
        out.append("%s%s: %s" % (pad, key, "true" if val else "false"))
    else:
        out.append("%s%s: %s" % (pad, key, val))


def _cpad(text: str, width: int) -> str:
    """Left-justify by bytes, as C's printf("%-Ns") does with UTF-8 text."""
    return text + " " * max(0, width - len(text.encode()))


def snapshot_table_lines(snaps: list) -> list:
    out = ["%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        nsec = s["vm-clock-sec"] * 1000000000 + s["vm-clock-nsec"]
        secs = nsec // 1000000000
        clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60,
                                         (nsec // 1000000) % 1000)
        icount = str(s["icount"]) if "icount" in s else ""
        out.append("%s %s %8s%20s%13s%11s" % (_cpad(s["id"], 9), _cpad(s["name"], 16),
                                              size_to_str(s["vm-state-size"]), date, clock, icount))
    return out


def human_info(d: dict) -> str:
    lines = [
        "image: %s" % d["filename"],
        "file format: %s" % d["format"],
        "virtual size: %s (%d bytes)" % (size_to_str(d["virtual-size"]), d["virtual-size"]),
        "disk size: %s" % (size_to_str(d["actual-size"]) if "actual-size" in d else "unavailable"),
    ]
    if d.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in d:
        lines.append("cluster_size: %d" % d["cluster-size"])
    if d.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in d:
        line = "backing file: %s" % d["backing-filename"]
        if "full-backing-filename" not in d:
            line += " (cannot determine actual path)"
        elif d["full-backing-filename"] != d["backing-filename"]:
            line += " (actual path: %s)" % d["full-backing-filename"]
        lines.append(line)
    if "backing-filename-format" in d:
        lines.append("backing file format: %s" % d["backing-filename-format"])
    if d.get("snapshots"):
        lines.append("Snapshot list:")
        lines.extend(snapshot_table_lines(d["snapshots"]))
    if "format-specific" in d:
        lines.append("Format specific information:")
        from .qjson import qdict_order
        data = d["format-specific"]["data"]
        for k in qdict_order(data):
            _dump_value(k.replace("-", " "), data[k], 1, lines)
    return "\n".join(lines) + "\n"
