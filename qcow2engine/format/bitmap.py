"""The bitmap directory ("Bitmaps" in docs/interop/qcow2.rst)."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .header import BitmapDirEntryFixed, BITMAP_DIR_FIXED_SIZE
from . import constants as C


class BitmapDirectoryError(ValueError):
    pass


@dataclass
class BitmapEntry:
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data: bytes

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def flag_names(self) -> list:
        out = []
        if self.flags & C.BME_FLAG_IN_USE:
            out.append("in-use")
        if self.flags & C.BME_FLAG_AUTO:
            out.append("auto")
        return out


def parse_bitmap_directory(buf: bytes, nb_bitmaps: int) -> list:
    out = []
    off = 0
    for i in range(nb_bitmaps):
        if off + BITMAP_DIR_FIXED_SIZE > len(buf):
            raise BitmapDirectoryError("bitmap directory runs past its end")
        f = BitmapDirEntryFixed.parse(buf[off:off + BITMAP_DIR_FIXED_SIZE])
        off += BITMAP_DIR_FIXED_SIZE
        end = off + f.extra_data_size + f.name_size
        if end > len(buf):
            raise BitmapDirectoryError("bitmap directory runs past its end")
        extra = bytes(buf[off:off + f.extra_data_size])
        off += f.extra_data_size
        name = bytes(buf[off:off + f.name_size]).decode("utf-8", "replace")
        off += f.name_size
        off = (off + 7) & ~7
        if not (9 <= f.granularity_bits <= 31):
            raise BitmapDirectoryError("bitmap %r has invalid granularity" % name)
        out.append(BitmapEntry(f.bitmap_table_offset, f.bitmap_table_size, f.flags, f.type,
                               f.granularity_bits, name, extra))
    return out


FLAGS_OFFSET = 12           # of the flags field in a directory entry


def flags_field(flags: int) -> bytes:
    """The on-disk flags field of a directory entry (written in place to change them)."""
    return struct.pack(">I", flags)
