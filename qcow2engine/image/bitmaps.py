"""Persistent dirty bitmaps ("Bitmaps" in docs/interop/qcow2.rst): `qemu-img bitmap`'s
actions, and the bookkeeping every guest write owes the enabled ("auto") bitmaps.

Writes: the first guest write of an open image marks its enabled bitmaps "in use" on disk
(one flags write per entry, flushed) before any data moves; the written ranges are collected
in memory; closing the image sets their bits (new data clusters allocated and written, the
bitmap tables updated in place, flushed) and only then clears "in use".  A crash in between
leaves the bitmaps "in use": inconsistent, as QEMU leaves them, never silently stale.

Actions (`bitmap --add/--remove/--clear/--enable/--disable/--merge`): a changed directory is
written whole into new clusters and the header switches to it in one write (cluster 0);
clusters no longer used are freed after the switch.  Flags change in place.
"""
from __future__ import annotations

import numpy as np

from ..errors import Qcow2Error
from ..format import constants as C
from ..format.bitmap import FLAGS_OFFSET, BitmapEntry, flags_field
from ..format.header import BitmapDirEntryFixed, BitmapsExtension, Extension
from ..host import fileio
from . import metadata

MASK = C.BME_TABLE_ENTRY_OFFSET_MASK
MAX_NAME = 1023


class BitmapError(Qcow2Error):
    pass


# ---------------------------------------------------------------- directory
def _entry_bytes(b: BitmapEntry) -> bytes:
    name = b.name.encode()
    out = BitmapDirEntryFixed.build(dict(
        bitmap_table_offset=b.bitmap_table_offset, bitmap_table_size=b.bitmap_table_size,
        flags=b.flags, type=b.type, granularity_bits=b.granularity_bits,
        name_size=len(name), extra_data_size=len(b.extra_data))) + b.extra_data + name
    return out + b"\0" * (-len(out) % 8)


def _entry_offsets(img) -> list:
    """Byte offset in the file of each directory entry, in order."""
    off = img.bitmaps_ext.bitmap_directory_offset
    out = []
    for b in img.bitmaps:
        out.append(off)
        off += len(_entry_bytes(b))
    return out


def _set_flags(img, changes) -> None:
    """(index, new flags) pairs written in place (4 bytes each), then flushed."""
    offs = _entry_offsets(img)
    for i, flags in changes:
        fileio.pwrite(img.fd, flags_field(flags), offs[i] + FLAGS_OFFSET)
        img.bitmaps[i].flags = flags
    img.allocator.flush()


def _switch_directory(img, entries: list) -> None:
    """Write a new directory for entries (none: the extension goes), switch the header to
    it in one write, free the old directory."""
    alloc = img.allocator
    cs = img.cluster_size
    old = img.bitmaps_ext
    data = b"".join(_entry_bytes(b) for b in entries)
    exts = [e for e in img.extensions if e.type != C.EXT_BITMAPS]
    h = img.header
    if entries:
        off = alloc.allocate_bytes(len(data))
        alloc.commit()
        fileio.pwrite(img.fd, data, off)
        alloc.flush()
        ext = BitmapsExtension.build(dict(nb_bitmaps=len(entries), reserved32=0,
                                          bitmap_directory_size=len(data),
                                          bitmap_directory_offset=off))
        # the bitmaps extension goes after the others QEMU writes first (backing format,
        # feature table), before unknown ones
        exts.append(Extension(C.EXT_BITMAPS, ext))
        h.autoclear_features |= C.AUTOCLEAR_BITMAPS
    else:
        h.autoclear_features &= ~C.AUTOCLEAR_BITMAPS
    img.extensions = exts
    metadata.write_header_cluster(img)
    img.bitmaps_ext = BitmapsExtension.parse(ext) if entries else None
    img._bitmaps = list(entries)
    if old is not None and old.bitmap_directory_size:
        a = old.bitmap_directory_offset // cs
        alloc.free(np.arange(a, -(-(old.bitmap_directory_offset + old.bitmap_directory_size)
                                  // cs), dtype=np.int64))
        alloc.commit()


def _find(img, name: str) -> int:
    for i, b in enumerate(img.bitmaps):
        if b.name == name:
            return i
    raise BitmapError("Dirty bitmap '%s' not found" % name)


def _check_image(img) -> None:
    if img.version < 3:
        raise BitmapError("Cannot store dirty bitmaps in qcow2 v2 files")
    if img.header.autoclear_features & C.AUTOCLEAR_BITMAPS == 0 and img.bitmaps_ext:
        raise BitmapError("The bitmaps of this image are marked invalid; run check -r all")


# ---------------------------------------------------------------- tables and bits
def _table(img, b: BitmapEntry) -> np.ndarray:
    if not b.bitmap_table_size:
        return np.zeros(0, np.uint64)
    raw = img.pread(8 * b.bitmap_table_size, b.bitmap_table_offset)
    return np.frombuffer(raw, ">u8").astype(np.uint64)


def _table_size(img, granularity: int) -> int:
    bits = -(-img.size // granularity)
    return -(-bits // (img.cluster_size * 8))


def _write_table(img, b: BitmapEntry, table: np.ndarray) -> None:
    fileio.pwrite(img.fd, table.astype(">u8").tobytes(), b.bitmap_table_offset)


def _bits_of(img, b: BitmapEntry, table, k: int) -> np.ndarray:
    """The bits of table entry k, one bool per granule (cs*8 of them)."""
    cs = img.cluster_size
    e = int(table[k])
    if e & MASK:
        return np.unpackbits(np.frombuffer(img.pread(cs, e & MASK), np.uint8),
                             bitorder="little").astype(bool)
    return np.full(cs * 8, bool(e & C.BME_TABLE_ENTRY_FLAG_ALL_ONES))


def dirty_ranges(img, b: BitmapEntry):
    """The set bits of bitmap b as sorted guest byte ranges (starts, ends)."""
    table = _table(img, b)
    g = b.granularity
    per = img.cluster_size * 8
    starts, ends = [], []
    for k in np.flatnonzero(table != 0).tolist():
        bits = _bits_of(img, b, table, k)
        d = np.diff(np.concatenate([[0], bits.astype(np.int8), [0]]))
        s = (np.flatnonzero(d == 1) + k * per) * g
        e = (np.flatnonzero(d == -1) + k * per) * g
        starts.append(s)
        ends.append(np.minimum(e, img.size))
    if not starts:
        z = np.zeros(0, np.int64)
        return z, z
    s, e = np.concatenate(starts), np.concatenate(ends)
    keep = s < e
    return s[keep], e[keep]


def _set_ranges(img, b: BitmapEntry, starts, ends) -> None:
    """Set the bits covering guest ranges [starts[i], ends[i]) in bitmap b: touched table
    entries get their data cluster (a new one where the entry was all zeros), written
    before the table entries that point at it."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    if not len(starts):
        return
    g = b.granularity
    cs = img.cluster_size
    per = cs * 8
    ga, gb = starts // g, -(-ends // g)                  # granule ranges
    table = _table(img, b)
    alloc = img.allocator
    ka, kb = ga // per, (gb - 1) // per
    touched = np.unique(np.concatenate([np.arange(a, c + 1) for a, c in
                                        zip(ka.tolist(), kb.tolist())]))
    new_table = table.copy()
    writes = []
    for k in touched.tolist():
        e = int(table[k])
        if e & C.BME_TABLE_ENTRY_FLAG_ALL_ONES and not e & MASK:
            continue
        bits = _bits_of(img, b, table, k)
        lo, hi = k * per, (k + 1) * per
        sel = (ga < hi) & (gb > lo)
        for a, c in zip(np.maximum(ga[sel], lo).tolist(), np.minimum(gb[sel], hi).tolist()):
            bits[a - lo:c - lo] = True
        data = np.packbits(bits, bitorder="little")
        if e & MASK:
            writes.append((e & MASK, data))
        else:
            off = int(alloc.allocate(1)[0]) * cs
            writes.append((off, data))
            new_table[k] = np.uint64(off)
    alloc.commit()
    alloc.refuse_overlap([o // cs for o, _ in writes])
    for off, data in writes:
        fileio.pwrite(img.fd, data, off)
    if not np.array_equal(new_table, table):
        alloc.flush()                       # the data before the table points at it
        _write_table(img, b, new_table)


# ---------------------------------------------------------------- actions
def add_bitmap(img, name: str, granularity: int | None = None, enabled: bool = True) -> None:
    _check_image(img)
    if any(b.name == name for b in img.bitmaps):
        raise BitmapError("Bitmap already exists: %s" % name)
    if not name or len(name.encode()) > MAX_NAME:
        raise BitmapError("Bitmap name is too long or empty")
    if len(img.bitmaps) >= C.MAX_BITMAPS:
        raise BitmapError("Too many persistent bitmaps")
    g = max(65536, img.cluster_size) if granularity is None else granularity
    if g < 512 or g & (g - 1):
        raise BitmapError("Granularity must be power of 2 and at least 512")
    if g > 1 << 31:
        raise BitmapError("Granularity is too big")
    n = _table_size(img, g)
    alloc = img.allocator
    off = 0
    if n:
        off = alloc.allocate_bytes(8 * n)
        alloc.commit()
        fileio.pwrite(img.fd, bytes(-(-8 * n // img.cluster_size) * img.cluster_size), off)
        alloc.flush()
    entry = BitmapEntry(off, n, C.BME_FLAG_AUTO if enabled else 0, 1, g.bit_length() - 1,
                        name, b"")
    _switch_directory(img, list(img.bitmaps) + [entry])


def _release(img, b: BitmapEntry, table_too: bool) -> None:
    """Free the data clusters of b (and its table): after nothing points at them."""
    cs = img.cluster_size
    table = _table(img, b)
    clusters = [(table[table & np.uint64(MASK) != 0] & np.uint64(MASK)).astype(np.int64) // cs]
    if table_too and b.bitmap_table_size:
        a = b.bitmap_table_offset // cs
        clusters.append(np.arange(a, a + -(-8 * b.bitmap_table_size // cs), dtype=np.int64))
    c = np.concatenate(clusters)
    if len(c):
        img.allocator.free(c)
        img.allocator.commit()


def remove_bitmap(img, name: str) -> None:
    _check_image(img)
    i = _find(img, name)
    b = img.bitmaps[i]
    _switch_directory(img, [x for j, x in enumerate(img.bitmaps) if j != i])
    _release(img, b, table_too=True)


def clear_bitmap(img, name: str) -> None:
    _check_image(img)
    b = img.bitmaps[_find(img, name)]
    table = _table(img, b)
    if not (table != 0).any():
        return
    data = (table & np.uint64(MASK)).astype(np.int64) // img.cluster_size
    _write_table(img, b, np.zeros(len(table), np.uint64))
    img.allocator.flush()
    if (data != 0).any():
        img.allocator.free(data[data != 0])
        img.allocator.commit()


def set_enabled(img, name: str, enabled: bool) -> None:
    _check_image(img)
    i = _find(img, name)
    f = img.bitmaps[i].flags
    f = (f | C.BME_FLAG_AUTO) if enabled else (f & ~C.BME_FLAG_AUTO)
    if f != img.bitmaps[i].flags:
        _set_flags(img, [(i, f)])


def merge_bitmap(img, name: str, src_img, src_name: str) -> None:
    """OR the bits of src_img's bitmap src_name into img's bitmap name (granularities may
    differ: the source's set ranges are marked in the target)."""
    _check_image(img)
    b = img.bitmaps[_find(img, name)]
    sb = src_img.bitmaps[_find(src_img, src_name)]
    if sb.flags & C.BME_FLAG_IN_USE:
        raise BitmapError("Bitmap '%s' is inconsistent and cannot be used" % src_name)
    s, e = dirty_ranges(src_img, sb)
    e = np.minimum(e, img.size)
    keep = s < e
    _set_ranges(img, b, s[keep], e[keep])
    img.allocator.flush()


def copy_bitmaps(src_img, dst_img, skip_broken: bool = False) -> None:
    """`convert --bitmaps`: every persistent bitmap of src_img into dst_img (same name,
    granularity, enabled state, bits)."""
    for b in src_img.bitmaps:
        if b.flags & C.BME_FLAG_IN_USE:
            if skip_broken:
                continue
            raise BitmapError("Cannot copy inconsistent bitmap '%s'" % b.name)
        add_bitmap(dst_img, b.name, b.granularity, enabled=bool(b.flags & C.BME_FLAG_AUTO))
        s, e = dirty_ranges(src_img, b)
        e = np.minimum(e, dst_img.size)
        _set_ranges(dst_img, dst_img.bitmaps[_find(dst_img, b.name)], s[s < e], e[s < e])
        dst_img.allocator.flush()


# ---------------------------------------------------------------- guest writes
class WriteTracker:
    """Collects the guest ranges written into an image with enabled bitmaps; see the
    module docstring for the order of events."""

    def __init__(self, img):
        self.img = img
        self.indices = [i for i, b in enumerate(img.bitmaps)
                        if b.flags & C.BME_FLAG_AUTO and not b.flags & C.BME_FLAG_IN_USE]
        self.starts: list = []
        self.ends: list = []
        self.marked = False

    def record(self, offset: int, length: int) -> None:
        if not self.indices or length <= 0:
            return
        if not self.marked:
            _set_flags(self.img, [(i, self.img.bitmaps[i].flags | C.BME_FLAG_IN_USE)
                                  for i in self.indices])
            self.marked = True
        self.starts.append(offset)
        self.ends.append(offset + length)

    def store(self) -> None:
        if not self.marked:
            return
        img = self.img
        s, e = np.array(self.starts, np.int64), np.array(self.ends, np.int64)
        for i in self.indices:
            _set_ranges(img, img.bitmaps[i], s, e)
        img.allocator.flush()
        _set_flags(img, [(i, img.bitmaps[i].flags & ~C.BME_FLAG_IN_USE) for i in self.indices])
        self.marked = False
        self.starts, self.ends = [], []


def tracker(img):
    """The image's write tracker (None when it has no enabled bitmap)."""
    t = getattr(img, "_bitmap_tracker", None)
    if t is None:
        if not img.bitmaps or not any(b.flags & C.BME_FLAG_AUTO for b in img.bitmaps):
            return None
        _check_image(img)
        t = img._bitmap_tracker = WriteTracker(img)
    return t


# ---------------------------------------------------------------- resize
MAX_TABLE_SIZE = 0x8000000            # entries, as QEMU limits a bitmap table


def begin_resize(img, new_size: int) -> bool:
    """Before img's size changes (QEMU resizes its bitmaps with the image): refuse an
    inconsistent bitmap, as QEMU does, then mark every bitmap "in use" on disk, so that a
    crash before finish_resize leaves them inconsistent (QEMU accepts an in-use bitmap
    whose table does not fit the size), never wrong.  False: nothing to do."""
    if not img.bitmaps:
        return False
    _check_image(img)
    for b in img.bitmaps:
        if b.flags & C.BME_FLAG_IN_USE:
            raise BitmapError("Bitmap '%s' is inconsistent and cannot be used" % b.name)
        if -(-(-(-new_size // b.granularity)) // (img.cluster_size * 8)) > MAX_TABLE_SIZE:
            raise BitmapError("Too much space will be occupied by the bitmap '%s'. Use "
                              "larger granularity" % b.name)
    _set_flags(img, [(i, b.flags | C.BME_FLAG_IN_USE) for i, b in enumerate(img.bitmaps)])
    return True


def finish_resize(img, old_size: int) -> None:
    """After the size changed: each bitmap's table sized for the new size (new granules
    clean; on a shrink the entries past the end dropped and the bits past the end cleared),
    the directory switched to the new tables, "in use" cleared, the old tables freed."""
    cs = img.cluster_size
    per = cs * 8
    alloc = img.allocator
    entries, gone, writes = [], [], []
    for b in img.bitmaps:
        table = _table(img, b)
        n = _table_size(img, b.granularity)
        new = np.zeros(n, np.uint64)
        k = min(n, len(table))
        new[:k] = table[:k]
        dropped = table[k:] & np.uint64(MASK)
        gone.append((dropped[dropped != 0]).astype(np.int64) // cs)
        granules = -(-img.size // b.granularity)
        last, used = (granules - 1) // per, (granules - 1) % per + 1
        if img.size < old_size and n and used < per and int(new[last]):
            bits = _bits_of(img, b, new, last)
            if bits[used:].any():
                bits[used:] = False
                e = int(new[last])
                if e & MASK:
                    off = e & MASK              # in use: rewritten in place
                else:                           # all ones: a data cluster of its own now
                    off = int(alloc.allocate(1)[0]) * cs
                    new[last] = np.uint64(off)
                writes.append((off, np.packbits(bits, bitorder="little")))
        if n == b.bitmap_table_size and np.array_equal(new, table):
            entries.append(b)
            continue
        off = alloc.allocate_bytes(8 * n) if n else 0
        entries.append(BitmapEntry(off, n, b.flags, b.type, b.granularity_bits, b.name,
                                   b.extra_data))
        writes.append((off, new.astype(">u8").tobytes()
                       + bytes(-(8 * n) % cs)))
        if b.bitmap_table_size:
            a = b.bitmap_table_offset // cs
            gone.append(np.arange(a, a + -(-8 * b.bitmap_table_size // cs), dtype=np.int64))
    alloc.commit()
    if writes:
        alloc.refuse_overlap([o // cs for o, _ in writes])
        for off, data in writes:
            fileio.pwrite(img.fd, data, off)
        alloc.flush()
    if any(x is not y for x, y in zip(entries, img.bitmaps)):
        _switch_directory(img, entries)
    _set_flags(img, [(i, b.flags & ~C.BME_FLAG_IN_USE) for i, b in enumerate(img.bitmaps)])
    c = np.concatenate(gone) if gone else np.zeros(0, np.int64)
    if len(c):
        alloc.free(c)
        alloc.commit()
