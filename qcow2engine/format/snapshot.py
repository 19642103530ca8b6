"""Snapshot table entries ("Snapshots" in docs/interop/qcow2.rst)."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .header import SnapshotEntryFixed, SNAPSHOT_FIXED_SIZE
from . import constants as C


class SnapshotTableError(ValueError):
    pass


@dataclass
class SnapshotEntry:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int              # the 32-bit field as stored
    extra_data: bytes               # raw extra data (kept verbatim, unknown parts preserved)
    vm_state_size_large: int | None = None
    disk_size: int | None = None
    icount: int | None = None       # None when absent (or stored as -1)
    # the bytes as stored, written back while id_str/name still show them (names that are
    # not UTF-8 keep their length and bytes; their str forms carry replacement characters)
    raw_id: bytes | None = None
    raw_name: bytes | None = None

    @property
    def effective_vm_state_size(self) -> int:
        if self.vm_state_size_large is not None:
            return self.vm_state_size_large
        return self.vm_state_size


def parse_snapshot_table(read, nb_snapshots: int, max_bytes: int) -> tuple[list, int]:
    """Parse nb_snapshots entries with read(offset, length) relative to the table start.

    Returns (entries, table byte size).  Raises SnapshotTableError when the table would be
    larger than max_bytes or an entry carries more than 1 KiB of extra data.
    """
    out = []
    off = 0
    for i in range(nb_snapshots):
        if off + SNAPSHOT_FIXED_SIZE > max_bytes:
            raise SnapshotTableError("snapshot table too large")
        f = SnapshotEntryFixed.parse(read(off, SNAPSHOT_FIXED_SIZE))
        off += SNAPSHOT_FIXED_SIZE
        if f.extra_data_size > C.MAX_SNAPSHOT_EXTRA_DATA:
            raise SnapshotTableError("Too much extra metadata in snapshot table entry %d" % i)
        var = f.extra_data_size + f.id_str_size + f.name_size
        if off + var > max_bytes:
            raise SnapshotTableError("snapshot table too large")
        body = read(off, var)
        extra = bytes(body[:f.extra_data_size])
        raw_id = bytes(body[f.extra_data_size:f.extra_data_size + f.id_str_size])
        raw_name = bytes(body[f.extra_data_size + f.id_str_size:])
        off = (off + var + 7) & ~7
        e = SnapshotEntry(f.l1_table_offset, f.l1_size, raw_id.decode("utf-8", "replace"),
                          raw_name.decode("utf-8", "replace"), f.date_sec, f.date_nsec,
                          f.vm_clock_nsec, f.vm_state_size, extra, raw_id=raw_id,
                          raw_name=raw_name)
        if len(extra) >= 8:
            e.vm_state_size_large = struct.unpack(">Q", extra[0:8])[0]
        if len(extra) >= 16:
            e.disk_size = struct.unpack(">Q", extra[8:16])[0]
        if len(extra) >= 24:
            ic = struct.unpack(">Q", extra[16:24])[0]
            e.icount = None if ic == 0xFFFFFFFFFFFFFFFF else ic
        out.append(e)
    return out, off


def _stored(text: str, raw: bytes | None) -> bytes:
    if raw is not None and raw.decode("utf-8", "replace") == text:
        return raw
    return text.encode()


def build_snapshot_entry(e: SnapshotEntry) -> bytes:
    extra = bytearray(e.extra_data)
    fields = []
    if e.vm_state_size_large is not None:
        fields.append(e.vm_state_size_large)
        if e.disk_size is not None:
            fields.append(e.disk_size)
            fields.append(0xFFFFFFFFFFFFFFFF if e.icount is None else e.icount)
    packed = struct.pack(">%dQ" % len(fields), *fields)
    extra[:len(packed)] = packed
    idb = _stored(e.id_str, e.raw_id)
    nameb = _stored(e.name, e.raw_name)
    out = SnapshotEntryFixed.build(dict(
        l1_table_offset=e.l1_table_offset, l1_size=e.l1_size, id_str_size=len(idb),
        name_size=len(nameb), date_sec=e.date_sec, date_nsec=e.date_nsec,
        vm_clock_nsec=e.vm_clock_nsec, vm_state_size=e.vm_state_size,
        extra_data_size=len(extra))) + bytes(extra) + idb + nameb
    return out + b"\0" * ((-len(out)) % 8)
