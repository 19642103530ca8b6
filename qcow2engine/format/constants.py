"""Constants of the qcow2 format (docs/interop/qcow2.rst)."""
from __future__ import annotations

QCOW_MAGIC = b"QFI\xfb"

V2_HEADER_SIZE = 72
V3_HEADER_SIZE = 104

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# Limits QEMU enforces (design "Safety rules").
MAX_L1_SIZE_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_BACKING_FILE_NAME = 1023
MAX_BITMAPS = 65535
MAX_CHAIN_DEPTH = 256

# Incompatible feature bits ("Header", incompatible_features)
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)

COMPAT_LAZY_REFCOUNTS = 1 << 0
COMPAT_KNOWN = COMPAT_LAZY_REFCOUNTS

AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

# Built-in names used when an image carries no feature-name table.
FEATURE_NAMES = {
    ("incompatible", 0): "dirty bit",
    ("incompatible", 1): "corrupt bit",
    ("incompatible", 2): "external data file",
    ("incompatible", 3): "compression type",
    ("incompatible", 4): "extended L2 entries",
    ("compatible", 0): "lazy refcounts",
    ("autoclear", 0): "bitmaps",
    ("autoclear", 1): "raw external data",
}
FEATURE_TYPES = {0: "incompatible", 1: "compatible", 2: "autoclear"}

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Header extension types ("Header extensions")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# L1 / L2 entries ("Cluster mapping")
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_RESERVED_MASK = 0x3F000000000001FE
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

SUBCLUSTERS_PER_CLUSTER = 32

# Bitmap directory ("Bitmaps extension")
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1


def compressed_offset_bits(cluster_bits: int) -> int:
    """x in the spec: number of low bits of a compressed descriptor holding the host offset."""
    return 62 - (cluster_bits - 8)
