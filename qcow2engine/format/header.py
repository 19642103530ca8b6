"""The qcow2 header, its extensions and the snapshot/bitmap directory entries (construct).

Only layout lives here: parsing never touches a file and never validates against one.
Field names follow docs/interop/qcow2.rst.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from construct import (Bytes, Const, Int8ub, Int16ub, Int32ub, Int64ub, Struct,
                       StreamError, ConstError, ConstructError)

from . import constants as C

HeaderV2 = Struct(
    "magic" / Const(C.QCOW_MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)

HeaderV3Tail = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

HeaderExtension = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
)

FeatureNameEntry = Struct(
    "type" / Int8ub,
    "bit" / Int8ub,
    "name" / Bytes(46),
)

BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved32" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

CryptoExtension = Struct(
    "offset" / Int64ub,
    "length" / Int64ub,
)

SnapshotEntryFixed = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)
SNAPSHOT_FIXED_SIZE = 40

BitmapDirEntryFixed = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
)
BITMAP_DIR_FIXED_SIZE = 24

__all__ = ["HeaderV2", "HeaderV3Tail", "HeaderExtension", "FeatureNameEntry", "BitmapsExtension",
           "CryptoExtension", "SnapshotEntryFixed", "BitmapDirEntryFixed", "Header", "Extension",
           "parse_header", "build_header", "ConstructError", "StreamError", "ConstError"]


@dataclass
class Extension:
    """One header extension as found on disk (unknown ones kept as opaque bytes)."""
    type: int
    data: bytes


@dataclass
class Header:
    """The logical header: v2 fields, v3 fields (defaults for v2) and the parsed extensions."""
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = C.V2_HEADER_SIZE
    compression_type: int = 0
    extra_header: bytes = b""          # bytes of header_length beyond what we know
    extensions: list = field(default_factory=list)
    extensions_end: int = 0            # offset just past the end-of-extensions marker

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def parse_header(buf: bytes) -> Header:
    """Parse the header and its extensions from the start of the file (cluster 0).

    Raises construct errors (StreamError/ConstError) on short or foreign data; the caller
    turns them into InvalidImageError.
    """
    h2 = HeaderV2.parse(buf)
    hdr = Header(**{k: v for k, v in h2.items() if not k.startswith("_") and k != "magic"})
    if hdr.version >= 3:
        t = HeaderV3Tail.parse(buf[C.V2_HEADER_SIZE:])
        hdr.incompatible_features = t.incompatible_features
        hdr.compatible_features = t.compatible_features
        hdr.autoclear_features = t.autoclear_features
        hdr.refcount_order = t.refcount_order
        hdr.header_length = t.header_length
        if hdr.header_length > C.V3_HEADER_SIZE and len(buf) > C.V3_HEADER_SIZE:
            hdr.compression_type = buf[C.V3_HEADER_SIZE]
            hdr.extra_header = bytes(buf[C.V3_HEADER_SIZE + 1:hdr.header_length])
    return hdr


def parse_extensions(buf: bytes, start: int, end: int) -> tuple[list, int]:
    """Parse header extensions from buf[start:end].  Returns (extensions, end offset)."""
    exts = []
    off = start
    while True:
        if off + 8 > end:
            return exts, off      # no terminator before the end of the area: QEMU stops here
        e = HeaderExtension.parse(buf[off:off + 8])
        off += 8
        if e.type == C.EXT_END:
            return exts, off
        if e.length > end - off:
            raise StreamError("Header extension too large")
        exts.append(Extension(e.type, bytes(buf[off:off + e.length])))
        off += (e.length + 7) & ~7


def build_extensions(exts: list) -> bytes:
    out = bytearray()
    for e in exts:
        out += HeaderExtension.build(dict(type=e.type, length=len(e.data)))
        out += e.data + b"\0" * ((-len(e.data)) % 8)
    out += HeaderExtension.build(dict(type=C.EXT_END, length=0))
    return bytes(out)


def build_feature_table(names: dict | None = None) -> bytes:
    """The feature-name table extension's data ("Feature name table"): one 48-byte entry
    per (kind, bit) -> name, default the features this engine knows."""
    kinds = {"incompatible": 0, "compatible": 1, "autoclear": 2}
    names = C.FEATURE_NAMES if names is None else names
    return b"".join(FeatureNameEntry.build(dict(type=kinds[k], bit=bit,
                                                name=name.encode().ljust(46, b"\0")[:46]))
                    for (k, bit), name in names.items())


def build_header(hdr: Header) -> bytes:
    """Serialise the fixed header (v2 or v3, header_length bytes) without extensions."""
    fields = {sc.name: getattr(hdr, sc.name) for sc in HeaderV2.subcons if sc.name != "magic"}
    out = bytearray(HeaderV2.build(fields))
    if hdr.version >= 3:
        out += HeaderV3Tail.build(dict(
            incompatible_features=hdr.incompatible_features,
            compatible_features=hdr.compatible_features,
            autoclear_features=hdr.autoclear_features,
            refcount_order=hdr.refcount_order,
            header_length=hdr.header_length))
        if hdr.header_length > C.V3_HEADER_SIZE:
            tail = bytes([hdr.compression_type]) + hdr.extra_header
            tail = tail[:hdr.header_length - C.V3_HEADER_SIZE]
            out += tail + b"\0" * (hdr.header_length - C.V3_HEADER_SIZE - len(tail))
    return bytes(out)
