"""How a machine is started: its launch definition (`machine define --memory ... --kernel ...`),
checked and completed with defaults.  Starting it is qmp_bridge's (tree_backend.launch_machine).
"""
from __future__ import annotations

import os

from ..errors import InvalidRequestError

LAUNCH_KEYS = ("memory", "cpus", "machine_type", "kernel", "initrd", "append", "qemu_args",
               "accel")


def check_launch(doc: dict) -> dict:
    """A launch definition with defaults filled in; InvalidRequestError for bad values."""
    from ..units import parse_size
    out = {"memory": 256 << 20, "cpus": 1, "machine_type": "pc", "kernel": None,
           "initrd": None, "append": None, "qemu_args": [], "accel": "auto"}
    for k, v in doc.items():
        if k not in LAUNCH_KEYS:
            raise InvalidRequestError("unknown launch setting '%s'" % k)
        if v is not None:
            out[k] = v
    mem = out["memory"]
    if isinstance(mem, str):
        mem = int(mem) << 20 if mem.strip().isdigit() else parse_size(mem, what="--memory")
    if mem < (16 << 20) or mem % (1 << 20):
        raise InvalidRequestError("--memory: at least 16 MiB, in whole MiB")
    out["memory"] = mem
    try:
        out["cpus"] = int(out["cpus"])
    except (TypeError, ValueError):
        raise InvalidRequestError("--cpus %s: not a number" % out["cpus"]) from None
    if not 1 <= out["cpus"] <= 255:
        raise InvalidRequestError("--cpus: 1 to 255")
    for k in ("kernel", "initrd"):
        if out[k]:
            out[k] = os.path.abspath(out[k])
            if not os.path.isfile(out[k]):
                raise InvalidRequestError("--%s '%s' is not a file" % (k, out[k]))
    if out["initrd"] and not out["kernel"]:
        raise InvalidRequestError("--initrd needs --kernel")
    if out["accel"] not in ("auto", "kvm", "tcg"):
        raise InvalidRequestError("accel: auto, kvm or tcg")
    out["qemu_args"] = [str(a) for a in out["qemu_args"]]
    return out
