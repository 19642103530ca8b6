"""One open qcow2 file: validation against the file and the limits, cached tables.

Everything read from the header is untrusted: each offset, size and count is checked before
it is used, and every table size is bounded by QEMU's limits, so a hostile header cannot make
us allocate without bound.  Reads past the end of the file return zeros, as QEMU's do.
"""
from __future__ import annotations

import os
from collections import OrderedDict

from ..errors import (CorruptImageError, InvalidImageError, UnsupportedFeatureError)
from ..format import constants as C
from ..format.header import (parse_header, parse_extensions, FeatureNameEntry,
                            BitmapsExtension, CryptoExtension, StreamError, ConstError,
                            ConstructError)

INT64_MAX = (1 << 63) - 1


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """Read exactly length bytes; the part past the end of the file reads as zeros."""
    if length <= 0:
        return b""
    if offset < 0 or offset > INT64_MAX - length:
        raise CorruptImageError("Offset %#x is outside any file (corrupt metadata)" % offset)
    parts = []
    got = 0
    while got < length:
        chunk = os.pread(fd, min(length - got, 1 << 30), offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    data = b"".join(parts) if len(parts) != 1 else parts[0]
    if got < length:
        data += bytes(length - got)
    return data


def probe_is_qcow2(path: str) -> bool:
    """True if the file starts with the qcow2 magic and a version >= 2 (QEMU's probe)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[:4] == C.QCOW_MAGIC and int.from_bytes(head[4:8], "big") >= 2


class Qcow2Image:
    """An open qcow2 image file (read-only in this layer's read path).

    Attributes mirror the spec: `header`, `cluster_size`, `cluster_bits`, `l2_entries`,
    `extended_l2`, `refcount_order`, `backing_file`, `backing_format`, `data_file_name`.
    """

    format = "qcow2"

    def __init__(self, path, *, fd: int | None = None, lock: bool = True, writable: bool = False,
                 allow_corrupt: bool = False):
        self.path = os.fspath(path)
        self._own_fd = fd is None
        self.writable = writable
        self._allow_corrupt = allow_corrupt
        mode = os.O_RDWR if writable else os.O_RDONLY
        try:
            self.fd = os.open(self.path, mode | os.O_CLOEXEC) if fd is None else fd
        except OSError as e:
            raise InvalidImageError("Could not open '%s': %s" % (self.path, e.strerror)) from None
        self._l2_cache: OrderedDict = OrderedDict()
        self._l2_cache_max = 512
        self._l1 = None
        self._reftable = None
        self._snapshots = None
        self._bitmaps = None
        self._allocator = None
        self.data_fd = None
        self.cipher = None             # LUKS images: the data cipher, once unlocked
        try:
            self._load()
            self.locked = bool(lock)
            if lock:
                from ..host.locking import lock_for_read, lock_for_write
                (lock_for_write if writable else lock_for_read)(self.fd, self.path)
            if writable:
                self._prepare_for_write()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ opening
    def _load(self) -> None:
        st = os.fstat(self.fd)
        self.file_size = st.st_size
        self.allocated_size = st.st_blocks * 512
        head = pread_full(self.fd, 4096, 0)
        if self.file_size < 8 or head[:4] != C.QCOW_MAGIC:
            raise InvalidImageError("Image is not in qcow2 format")
        version = int.from_bytes(head[4:8], "big")
        if version not in (2, 3):
            raise UnsupportedFeatureError("Unsupported qcow2 version %d" % version)
        need = C.V2_HEADER_SIZE if version == 2 else C.V3_HEADER_SIZE
        if self.file_size < need:
            raise InvalidImageError("Could not read qcow2 header: file is truncated")
        try:
            hdr = parse_header(head)
        except (StreamError, ConstError, ConstructError):
            raise InvalidImageError("Could not read qcow2 header") from None
        if not (C.MIN_CLUSTER_BITS <= hdr.cluster_bits <= C.MAX_CLUSTER_BITS):
            raise InvalidImageError("Unsupported cluster size: 2^%d" % hdr.cluster_bits)
        cs = 1 << hdr.cluster_bits
        if version == 3:
            if hdr.header_length < C.V3_HEADER_SIZE:
                raise InvalidImageError("qcow2 header too short")
            if hdr.header_length > cs:
                raise InvalidImageError("qcow2 header exceeds cluster size")
        else:
            hdr.header_length = C.V2_HEADER_SIZE
        cluster0 = pread_full(self.fd, cs, 0)
        if hdr.header_length > 104:
            hdr.compression_type = cluster0[104]
            hdr.extra_header = bytes(cluster0[105:hdr.header_length])
        self.header = hdr
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = cs
        self.version = version

        # Feature bits.
        if hdr.refcount_order > 6:
            raise InvalidImageError("Refcount width must be a power of two and may not "
                                    "exceed 64 bits")
        if hdr.crypt_method not in (C.CRYPT_NONE, C.CRYPT_AES, C.CRYPT_LUKS):
            raise InvalidImageError("Unsupported encryption method: %d" % hdr.crypt_method)

        # Extensions: between the header and the backing file name (or the cluster end).
        ext_end = cs
        if hdr.backing_file_offset:
            if hdr.backing_file_offset > cs:
                raise InvalidImageError("Invalid backing file offset")
            ext_end = min(ext_end, hdr.backing_file_offset)
        self.extensions = []
        if True:  # v2 images carry header extensions too (after the 72-byte header)
            try:
                self.extensions, hdr.extensions_end = parse_extensions(
                    cluster0, hdr.header_length, max(ext_end, hdr.header_length))
            except (StreamError, ConstructError) as e:
                raise InvalidImageError(str(e)) from None
        hdr.extensions = self.extensions
        self.feature_names = dict(C.FEATURE_NAMES)
        self.backing_format = None
        self.data_file_name = None
        self.bitmaps_ext = None
        self.crypto_ext = None
        self.unknown_extensions = []
        for ext in self.extensions:
            if ext.type == C.EXT_BACKING_FORMAT:
                self.backing_format = ext.data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif ext.type == C.EXT_FEATURE_TABLE:
                for i in range(len(ext.data) // 48):
                    fe = FeatureNameEntry.parse(ext.data[i * 48:(i + 1) * 48])
                    name = fe.name.split(b"\0", 1)[0].decode("utf-8", "replace")
                    kind = C.FEATURE_TYPES.get(fe.type)
                    if kind:
                        self.feature_names[(kind, fe.bit)] = name
            elif ext.type == C.EXT_BITMAPS:
                if len(ext.data) < 24:
                    raise InvalidImageError("bitmaps_ext: Invalid extension length")
                self.bitmaps_ext = BitmapsExtension.parse(ext.data)
            elif ext.type == C.EXT_CRYPTO:
                if len(ext.data) < 16:
                    raise InvalidImageError("Invalid encryption header extension length")
                self.crypto_ext = CryptoExtension.parse(ext.data)
            elif ext.type == C.EXT_DATA_FILE:
                self.data_file_name = ext.data.decode("utf-8", "replace")
            else:
                self.unknown_extensions.append(ext)

        unknown = hdr.incompatible_features & ~C.INCOMPAT_KNOWN
        if unknown:
            names = []
            for bit in range(64):
                if unknown >> bit & 1:
                    n = self.feature_names.get(("incompatible", bit))
                    names.append(n if n else "Unknown incompatible feature: %x" % (1 << bit))
            raise UnsupportedFeatureError("Unsupported qcow2 feature(s): " + ", ".join(names))

        self.extended_l2 = bool(hdr.incompatible_features & C.INCOMPAT_EXTL2)
        self.has_data_file = bool(hdr.incompatible_features & C.INCOMPAT_DATA_FILE)
        self.data_file_raw = bool(hdr.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW)
        self.dirty = bool(hdr.incompatible_features & C.INCOMPAT_DIRTY)
        self.corrupt = bool(hdr.incompatible_features & C.INCOMPAT_CORRUPT)
        self.lazy_refcounts = bool(hdr.compatible_features & C.COMPAT_LAZY_REFCOUNTS)
        if self.has_data_file and self.data_file_name is None:
            raise InvalidImageError("Missing data_file option: the image has an external "
                                    "data file but no data file name")
        if self.extended_l2 and hdr.cluster_bits < 14:
            raise InvalidImageError("Extended L2 entries are only supported with cluster "
                                    "sizes of at least 16384 bytes")
        if bool(hdr.incompatible_features & C.INCOMPAT_COMPRESSION) != (hdr.compression_type != 0):
            raise InvalidImageError("Invalid compression type / incompatible bit combination")
        if hdr.compression_type not in C.COMPRESSION_NAMES:
            raise UnsupportedFeatureError("Unknown compression type %d" % hdr.compression_type)
        self.refcount_order = hdr.refcount_order
        self.refcount_bits = 1 << hdr.refcount_order
        self.encrypted = hdr.crypt_method != C.CRYPT_NONE
        if hdr.crypt_method == C.CRYPT_LUKS and self.crypto_ext is None:
            raise InvalidImageError("Missing CRYPTO header for crypt method 2")

        # Geometry.
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_entries = cs // self.l2_entry_size
        self.subcluster_size = cs // 32 if self.extended_l2 else cs
        self.size = hdr.size // 512 * 512          # QEMU counts whole sectors only
        if hdr.size > INT64_MAX:
            raise InvalidImageError("Image size too large: %d" % hdr.size)
        l2_coverage = self.l2_entries * cs
        needed_l1 = -(-hdr.size // l2_coverage)
        if needed_l1 > 0x7FFFFFFF:
            raise InvalidImageError("Image is too big")
        if hdr.l1_size * 8 > C.MAX_L1_SIZE_BYTES:
            raise InvalidImageError("Active L1 table too large")
        if hdr.l1_size < needed_l1:
            raise InvalidImageError("L1 table is too small")
        self._check_table(hdr.l1_table_offset, hdr.l1_size * 8, "L1 table", allow_zero=hdr.l1_size == 0)
        if hdr.refcount_table_clusters == 0:
            raise InvalidImageError("Image does not contain a reference count table")
        if hdr.refcount_table_clusters * cs > C.MAX_REFTABLE_SIZE_BYTES:
            raise InvalidImageError("Reference count table too large")
        self._check_table(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs,
                          "Reference count table")
        if hdr.nb_snapshots > C.MAX_SNAPSHOTS:
            raise InvalidImageError("Too many snapshots")
        if hdr.nb_snapshots:
            if hdr.snapshots_offset % cs or \
                    hdr.snapshots_offset > INT64_MAX - C.MAX_SNAPSHOT_TABLE_BYTES:
                raise InvalidImageError("Snapshot table offset invalid")

        # Backing file name (stored after the extensions inside cluster 0).
        self.backing_file = None
        if hdr.backing_file_offset:
            if hdr.backing_file_size > C.MAX_BACKING_FILE_NAME or \
                    hdr.backing_file_offset + hdr.backing_file_size > cs:
                raise InvalidImageError("Backing file name too long")
            raw = cluster0[hdr.backing_file_offset:hdr.backing_file_offset + hdr.backing_file_size]
            self.backing_file = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        self.snapshots  # parse and validate the snapshot table now, as QEMU does at open

    def _prepare_for_write(self) -> None:
        """Refuse corrupt images; clear unknown autoclear bits (docs: "autoclear features")."""
        if self.corrupt and not self._allow_corrupt:
            raise CorruptImageError("'%s' is marked corrupt; repair it with 'check -r all' "
                                    "before writing" % self.path)
        from .metadata import clear_unknown_autoclear
        clear_unknown_autoclear(self)

    def reopen_writable(self) -> None:
        """Turn a read-only open into a read-write one (same object, new file description
        with QEMU's write locks; the old one and its read locks go)."""
        if self.writable:
            return
        from ..host.locking import reopen_for_write
        fd = reopen_for_write(self.path, self.fd, locked=self.locked)
        old, self.fd = self.fd, fd
        if self._own_fd:
            os.close(old)
        self._own_fd = True
        self.writable = True
        if self.data_fd is not None:
            os.close(self.data_fd)
            self.data_fd = None
        self._prepare_for_write()

    # ------------------------------------------------------------ owned state
    @property
    def allocator(self):
        """The one allocator of this open image (refcounts, allocation, L1/L2 writes)."""
        a = self._allocator
        if a is None:
            from .alloc import Allocator
            a = self._allocator = Allocator(self)
        return a

    def forget_tables(self) -> None:
        """Drop every cached table and the allocator (re-read from disk on next use): after
        the refcount structure or the tables were rebuilt wholesale."""
        self._l1 = None
        self._l2_cache.clear()
        self._reftable = None
        self._bitmaps = None
        self._allocator = None
        self.file_size = os.fstat(self.fd).st_size

    def drop_l2_cache(self) -> None:
        """Forget the cached L2 tables (after tables were freed wholesale)."""
        self._l2_cache.clear()

    def cached_l2(self, l2_offset: int):
        """The cached copy of an L2 table, or None."""
        return self._l2_cache.get(l2_offset)

    def _cache_l2(self, l2_offset: int, table) -> None:
        self._l2_cache[l2_offset] = table
        self._l2_cache.move_to_end(l2_offset)
        if len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)

    def data_fd_for_write(self) -> int:
        if not self.has_data_file:
            return self.fd
        p = self.data_file_path()
        if self.data_fd is not None:
            os.close(self.data_fd)
        try:
            self.data_fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise InvalidImageError("Could not open data file '%s': %s" % (p, e.strerror)) from None
        return self.data_fd

    def _check_table(self, offset: int, size: int, what: str, allow_zero: bool = False) -> None:
        if allow_zero and size == 0:
            return
        if offset % self.cluster_size:
            raise InvalidImageError("%s offset invalid" % what)
        if offset > INT64_MAX - size:
            raise InvalidImageError("%s offset invalid" % what)

    def close(self) -> None:
        """Close the image; one opened for writing is flushed first (as QEMU does on close:
        in-place data writes carry no barrier of their own)."""
        try:
            if getattr(self, "writable", False) and getattr(self, "fd", None) is not None:
                from ..host import fileio
                t = getattr(self, "_bitmap_tracker", None)
                if t is not None:
                    t.store()           # the bits of what was written, then "in use" off
                if getattr(self, "data_fd", None) is not None:
                    fileio.fsync(self.data_fd)
                fileio.fsync(self.fd)
        finally:
            if getattr(self, "data_fd", None) is not None:
                os.close(self.data_fd)
                self.data_fd = None
            if getattr(self, "_own_fd", False) and getattr(self, "fd", None) is not None:
                os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ helpers
    def pread(self, length: int, offset: int) -> bytes:
        return pread_full(self.fd, length, offset)

    @property
    def file_clusters(self) -> int:
        return -(-self.file_size // self.cluster_size)

    def feature_name(self, kind: str, bit: int) -> str:
        return self.feature_names.get((kind, bit), "unknown %s feature %d" % (kind, bit))

    # ------------------------------------------------------------------ tables
    @property
    def l1_table(self):
        """The active L1 table as a native uint64 numpy array."""
        l1 = self._l1
        if l1 is None:
            from ..format.entries import be64
            h = self.header
            l1 = self._l1 = be64(self.pread(h.l1_size * 8, h.l1_table_offset))
        return l1

    def read_l1(self, offset: int, l1_size: int):
        from ..format.entries import be64
        if l1_size * 8 > C.MAX_L1_SIZE_BYTES:
            raise CorruptImageError("Snapshot L1 table too large")
        if offset % self.cluster_size:
            raise CorruptImageError("Snapshot L1 table offset invalid")
        return be64(self.pread(l1_size * 8, offset))

    def read_l2(self, l2_offset: int):
        """One L2 table (entries as uint64, two words per entry with extended L2), cached."""
        t = self._l2_cache.get(l2_offset)
        if t is not None:
            self._l2_cache.move_to_end(l2_offset)
            return t
        if l2_offset % self.cluster_size:
            raise CorruptImageError("L2 table offset %#x unaligned" % l2_offset)
        if l2_offset == 0:
            raise CorruptImageError("L2 table at offset 0 (overlaps the header)")
        from ..format.entries import be64
        t = be64(self.pread(self.cluster_size, l2_offset))
        self._l2_cache[l2_offset] = t
        if len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)
        return t

    @property
    def refcount_table(self):
        if self._reftable is None:
            from ..format.entries import be64
            h = self.header
            self._reftable = be64(self.pread(h.refcount_table_clusters * self.cluster_size,
                                             h.refcount_table_offset))
        return self._reftable

    @property
    def snapshots(self) -> list:
        """The internal snapshot table (list of SnapshotEntry)."""
        if self._snapshots is None:
            h = self.header
            if h.nb_snapshots == 0:
                self._snapshots = []
            else:
                from ..format.snapshot import parse_snapshot_table, SnapshotTableError
                base = h.snapshots_offset
                try:
                    snaps, tsize = parse_snapshot_table(
                        lambda off, n: self.pread(n, base + off), h.nb_snapshots,
                        C.MAX_SNAPSHOT_TABLE_BYTES)
                except SnapshotTableError as e:
                    raise InvalidImageError("Failed to read snapshot table: %s" % e) from None
                self._snapshots = snaps
                self.snapshot_table_size = tsize
        return self._snapshots

    @property
    def bitmaps(self) -> list:
        """The bitmap directory entries (empty when absent or not valid per autoclear bit 0)."""
        if self._bitmaps is None:
            self._bitmaps = []
            ext = self.bitmaps_ext
            if ext is not None and self.header.autoclear_features & C.AUTOCLEAR_BITMAPS:
                from ..format.bitmap import parse_bitmap_directory, BitmapDirectoryError
                if ext.nb_bitmaps > C.MAX_BITMAPS:
                    raise InvalidImageError("bitmaps_ext: Image has too many bitmaps")
                if ext.bitmap_directory_size > C.MAX_SNAPSHOT_TABLE_BYTES or \
                        ext.bitmap_directory_offset % self.cluster_size or \
                        ext.bitmap_directory_offset + ext.bitmap_directory_size > self.file_size:
                    raise InvalidImageError("bitmaps_ext: invalid bitmap directory")
                buf = self.pread(ext.bitmap_directory_size, ext.bitmap_directory_offset)
                try:
                    self._bitmaps = parse_bitmap_directory(buf, ext.nb_bitmaps)
                except BitmapDirectoryError as e:
                    raise InvalidImageError("bitmaps_ext: %s" % e) from None
        return self._bitmaps

    # ------------------------------------------------------------------ data file
    def data_file_path(self) -> str | None:
        if not self.data_file_name:
            return None
        if os.path.isabs(self.data_file_name):
            return self.data_file_name
        return os.path.join(os.path.dirname(self.path), self.data_file_name)

    def data_fd_for_read(self) -> int:
        """The fd that holds guest data (the image itself, or its external data file)."""
        if not self.has_data_file:
            return self.fd
        if self.data_fd is None:
            p = self.data_file_path()
            try:
                self.data_fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise InvalidImageError("Could not open data file '%s': %s" % (p, e.strerror)) from None
        return self.data_fd

    # ------------------------------------------------------------------ refcounts
    def refcounts_all(self, limit: int | None = None):
        """On-disk refcounts of the clusters [0, limit) (default: the clusters of the file).

        Clusters past the end of the file are not looked at, so a refcount table full of
        garbage cannot make this allocate more than the file's size warrants.
        """
        import numpy as np
        from ..format.entries import decode_refblock
        if limit is None:
            limit = self.file_clusters
        rt = self.refcount_table
        per_block = self.cluster_size * 8 // self.refcount_bits
        rt = rt[:-(-limit // per_block)]
        offs = np.minimum(rt & np.uint64(C.REFT_OFFSET_MASK), np.uint64(1 << 62)).astype(np.int64)
        used = np.nonzero(offs)[0]
        n = int(used[-1]) + 1 if len(used) else 0
        dt = np.uint8 if self.refcount_bits <= 8 else np.dtype("u%d" % (self.refcount_bits // 8))
        from .references import read_clusters
        out = np.zeros((n, per_block), dtype=dt)
        used = used[offs[used] % self.cluster_size == 0]
        for k in range(0, len(used), 4096):              # a few MiB of blocks per step
            part = used[k:k + 4096]
            out[part] = decode_refblock(read_clusters(self, offs[part]),
                                        self.refcount_order).reshape(len(part), per_block)
        return out.reshape(-1)[:limit]
