"""`create`: new qcow2 (and raw) images, laid out as qemu-img 7.2 lays them out.

A fresh qcow2 image is: the header in cluster 0 (with the feature-name table, backing-format
and data-file extensions and the backing file name), the refcount table in cluster 1, one
refcount block in cluster 2, then the L1 table, the file ending where the L1 table ends.
"""
from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass

import numpy as np

from ..host import fileio
from ..errors import CreateError, InvalidImageError, InvalidRequestError, Qcow2Error
from ..units import parse_size as _parse_size
from ..format import constants as C
from ..format.header import CryptoExtension, Extension, Header, build_extensions, build_feature_table, build_header

PREALLOC_MODES = ("off", "metadata", "falloc", "full")



@dataclass
class CreateOptions:
    size: int | None = None
    compat: str = "1.1"
    cluster_size: int = 65536
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: str = "zlib"
    data_file: str | None = None
    data_file_raw: bool = False
    preallocation: str = "off"
    backing_file: str | None = None
    backing_fmt: str | None = None
    encrypt: dict = dataclasses.field(default_factory=dict)   # encrypt.* options, as given
    encryption: str | None = None      # the old `encryption=on|off` (legacy AES), as given
    given: tuple = ()

    def encryption_method(self) -> str | None:
        """"luks", "aes" or None, from the encrypt.* and encryption options."""
        p = luks_params(self)
        return p["format"] if p else None


# the encrypt.* options qemu-img 7.2 takes for LUKS, in the order its "Formatting" line shows
ENCRYPT_KEYS = ("format", "key-secret", "cipher-alg", "cipher-mode", "ivgen-alg",
                "ivgen-hash-alg", "hash-alg", "iter-time")


def parse_size(text: str) -> int:
    """A size in qemu-img's grammar (units.parse_size); CreateError when malformed."""
    try:
        return _parse_size(text)
    except InvalidRequestError as e:
        raise CreateError(str(e)) from None


def _bool(key: str, val: str) -> bool:
    v = val.lower()
    if v in ("on", "yes", "true"):
        return True
    if v in ("off", "no", "false"):
        return False
    raise CreateError("Parameter '%s' expects 'on' or 'off'" % key)


def parse_options(spec, base: CreateOptions | None = None) -> CreateOptions:
    """Options as qemu-img create -o takes them: a "k=v,k=v" string or a dict."""
    o = base or CreateOptions()
    if spec is None:
        return o
    items = spec.items() if isinstance(spec, dict) else \
        [kv.split("=", 1) if "=" in kv else (kv, "on") for kv in _split_opts(spec)]
    given = list(o.given)
    for k, v in items:
        k = k.strip().replace("-", "_")
        v = str(v) if not isinstance(v, bool) else ("on" if v else "off")
        if k == "size":
            o.size = parse_size(v)
        elif k == "compat":
            if v in ("0.10", "v2"):
                o.compat = "0.10"
            elif v in ("1.1", "v3"):
                o.compat = "1.1"
            else:
                raise CreateError("Invalid parameter '%s'" % v)
        elif k == "cluster_size":
            o.cluster_size = parse_size(v)
        elif k == "refcount_bits":
            o.refcount_bits = int(v)
        elif k == "lazy_refcounts":
            o.lazy_refcounts = _bool(k, v)
        elif k == "extended_l2":
            o.extended_l2 = _bool(k, v)
        elif k == "compression_type":
            if v not in ("zlib", "zstd"):
                raise CreateError("Invalid parameter '%s'" % v)
            o.compression_type = v
        elif k == "data_file":
            o.data_file = v
        elif k == "data_file_raw":
            o.data_file_raw = _bool(k, v)
        elif k == "preallocation":
            if v not in PREALLOC_MODES:
                raise CreateError("Invalid parameter '%s'" % v)
            o.preallocation = v
        elif k == "backing_file":
            o.backing_file = v
        elif k == "backing_fmt":
            o.backing_fmt = v
        elif k == "encryption":
            _bool(k, v)
            o.encryption = v
        elif k.startswith("encrypt.") and k[8:].replace("_", "-") in ENCRYPT_KEYS:
            o.encrypt = dict(o.encrypt)
            o.encrypt[k[8:].replace("_", "-")] = v
        else:
            raise CreateError("Invalid parameter '%s'" % k)
        given.append(k)
    o.given = tuple(given)
    return o


def luks_params(o: CreateOptions) -> dict | None:
    """The LUKS parameters of encrypt.* options (None: no encryption); CreateError for what
    this engine does not make (only AES-XTS with plain64/plain sector numbers)."""
    e = o.encrypt
    if o.encryption is not None:
        if "format" in e and _bool("encryption", o.encryption):
            raise CreateError("'encrypt.format' and its alias 'encryption' can't be used at "
                              "the same time")
        elif _bool("encryption", o.encryption):
            e = dict(e, format="aes")
    if not e:
        return None
    fmt = e.get("format")
    if fmt is None:
        raise CreateError("Parameter 'encrypt.format' is missing")
    if fmt == "aes":      # the legacy qcow2 AES encryption: a passphrase and nothing else
        for k in ENCRYPT_KEYS:
            if k not in ("format", "key-secret") and k in e:
                raise CreateError("Parameter 'encrypt.%s' is unexpected" % k)
        return {"format": "aes", "key_len": 16, "key_secret": e.get("key-secret")}
    if fmt != "luks":
        raise CreateError("Invalid parameter 'encrypt.format': '%s'" % fmt)
    alg = e.get("cipher-alg", "aes-256")
    mode = e.get("cipher-mode", "xts")
    if mode not in ("xts", "cbc"):
        raise CreateError("LUKS cipher mode '%s' is not supported (xts, cbc)" % mode)
    algs = ("aes-128", "aes-256") if mode == "xts" else ("aes-128", "aes-192", "aes-256")
    if alg not in algs:
        raise CreateError("LUKS cipher algorithm '%s' is not supported (%s)"
                          % (alg, ", ".join(algs)))
    ivgen = e.get("ivgen-alg", "plain64")
    ivgens = ("plain64", "plain") if mode == "xts" else ("plain64", "plain", "essiv")
    if ivgen not in ivgens:
        raise CreateError("LUKS IV generator '%s' is not supported with %s (%s)"
                          % (ivgen, mode, ", ".join(ivgens)))
    from .luks import HASHES
    ivhash = None
    if ivgen == "essiv":
        ivhash = e.get("ivgen-hash-alg", "sha256")
        if ivhash != "sha256":
            raise CreateError("LUKS ESSIV hash algorithm '%s' is not supported (sha256)"
                              % ivhash)
    hname = e.get("hash-alg", "sha256")
    if hname not in HASHES:
        raise CreateError("Invalid parameter 'encrypt.hash-alg': '%s'" % hname)
    try:
        iter_time = int(e.get("iter-time", "2000"))
    except ValueError:
        raise CreateError("Parameter 'encrypt.iter-time' expects a number") from None
    if iter_time <= 0:
        raise CreateError("Parameter 'encrypt.iter-time' must be positive")
    key_len = int(alg[4:]) // 8 * (2 if mode == "xts" else 1)
    return {"format": "luks", "key_len": key_len, "hname": hname, "mode": mode,
            "ivhash": ivhash, "ivgen": ivgen,
            "iter_time": iter_time, "key_secret": e.get("key-secret")}



def _split_opts(spec: str) -> list:
    # qemu option syntax: ",," escapes a comma
    out, cur, i = [], "", 0
    while i < len(spec):
        if spec[i] == ",":
            if spec[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            out.append(cur)
            cur = ""
        else:
            cur += spec[i]
        i += 1
    if cur:
        out.append(cur)
    return out


def formatting_line(path: str, o: CreateOptions, fmt: str = "qcow2") -> str:
    """The "Formatting ..." line qemu-img create prints (the size as given)."""
    if fmt in RAW_FORMATS:
        return "Formatting '%s', fmt=%s size=%d" % (path, fmt, o.size)
    parts = ["encryption=%s" % o.encryption] if o.encryption is not None else []
    parts += ["encrypt.%s=%s" % (k, o.encrypt[k]) for k in ENCRYPT_KEYS if k in o.encrypt]
    parts += ["cluster_size=%d" % o.cluster_size, "extended_l2=%s" % ("on" if o.extended_l2 else "off")]
    if "preallocation" in o.given:
        parts.append("preallocation=%s" % o.preallocation)
    parts.append("compression_type=%s" % o.compression_type)
    parts.append("size=%d" % o.size)
    if "compat" in o.given:
        parts.append("compat=%s" % o.compat)
    if o.backing_file:
        parts.append("backing_file=%s" % o.backing_file)
    if o.backing_fmt:
        parts.append("backing_fmt=%s" % o.backing_fmt)
    if o.data_file:
        parts.append("data_file=%s" % o.data_file)
    if "data_file_raw" in o.given:
        parts.append("data_file_raw=%s" % ("on" if o.data_file_raw else "off"))
    parts.append("lazy_refcounts=%s" % ("on" if o.lazy_refcounts else "off"))
    parts.append("refcount_bits=%d" % o.refcount_bits)
    return "Formatting '%s', fmt=qcow2 %s" % (path, " ".join(parts))


def validate(o: CreateOptions) -> None:
    cs = o.cluster_size
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise CreateError("Cluster size must be a power of two between 512 and 2048k")
    rb = o.refcount_bits
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise CreateError("Refcount width must be a power of two and may not exceed 64 bits")
    v2 = o.compat == "0.10"
    if v2 and rb != 16:
        raise CreateError("Different refcount widths than 16 bits require compatibility level "
                          "1.1 or above (use version=v3 or greater)")
    if v2 and o.lazy_refcounts:
        raise CreateError("Lazy refcounts only supported with compatibility level 1.1 and above "
                          "(use version=v3 or greater)")
    if v2 and o.extended_l2:
        raise CreateError("Extended L2 entries are only supported with compatibility level 1.1 "
                          "and above (use version=v3 or greater)")
    if v2 and o.compression_type != "zlib":
        raise CreateError("Non-zlib compression type is only supported with compatibility level "
                          "1.1 and above (use version=v3 or greater)")
    if v2 and o.data_file:
        raise CreateError("External data files are only supported with compatibility level 1.1 "
                          "and above (use version=v3 or greater)")
    if o.extended_l2 and cs < 16384:
        raise CreateError("Extended L2 entries are only supported with cluster sizes of at least "
                          "16384 bytes")
    if o.data_file_raw and not o.data_file:
        raise CreateError("data-file-raw requires data-file")
    if o.backing_file and o.data_file_raw:
        raise CreateError("Backing file and data-file-raw cannot be used at the same time")
    if o.backing_file and o.preallocation != "off" and not o.extended_l2:
        raise CreateError("Backing file and preallocation can only be used at the same time if "
                          "extended_l2 is on")
    if o.backing_file and not o.backing_fmt:
        raise CreateError("Backing file specified without backing format")
    if o.backing_fmt and o.backing_fmt not in ("qcow2", "raw"):
        raise CreateError("Unknown driver '%s'" % o.backing_fmt)
    if o.size is None:
        raise CreateError("Image creation needs a size parameter")
    entry = 16 if o.extended_l2 else 8
    l2_cov = (cs // entry) * cs
    l1 = -(-o.size // l2_cov)
    if l1 * 8 > C.MAX_L1_SIZE_BYTES or o.size > (1 << 63) - 1:
        raise CreateError("The image size is too large for file format 'qcow2' (try using a "
                          "larger cluster size)")


def _header_cluster(o: CreateOptions, l1_size: int, l1_offset: int, size: int | None = None,
                    reftable: tuple = (None, 1), crypto: tuple | None = None) -> bytes:
    cs = o.cluster_size
    v3 = o.compat != "0.10"
    incompat = 0
    if o.data_file:
        incompat |= C.INCOMPAT_DATA_FILE
    if o.compression_type == "zstd":
        incompat |= C.INCOMPAT_COMPRESSION
    if o.extended_l2:
        incompat |= C.INCOMPAT_EXTL2
    hdr = Header(version=3 if v3 else 2, backing_file_offset=0, backing_file_size=0,
                 cluster_bits=cs.bit_length() - 1, size=o.size if size is None else size,
                 crypt_method=C.CRYPT_LUKS if crypto else
                 C.CRYPT_AES if o.encryption_method() == "aes" else C.CRYPT_NONE,
                 l1_size=l1_size, l1_table_offset=l1_offset,
                 refcount_table_offset=cs if reftable[0] is None else reftable[0],
                 refcount_table_clusters=reftable[1], nb_snapshots=0, snapshots_offset=0,
                 incompatible_features=incompat,
                 compatible_features=C.COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0,
                 autoclear_features=C.AUTOCLEAR_DATA_FILE_RAW if o.data_file_raw else 0,
                 refcount_order=o.refcount_bits.bit_length() - 1,
                 header_length=112 if v3 else C.V2_HEADER_SIZE,
                 compression_type=1 if o.compression_type == "zstd" else 0,
                 extra_header=b"\0" * 7)
    exts = []
    if crypto:        # the full disk encryption header: offset and length of the LUKS area
        exts.append(Extension(C.EXT_CRYPTO, CryptoExtension.build(
            dict(offset=crypto[0], length=crypto[1]))))
    if o.backing_fmt:
        exts.append(Extension(C.EXT_BACKING_FORMAT, o.backing_fmt.encode()))
    if o.data_file:
        exts.append(Extension(C.EXT_DATA_FILE, o.data_file.encode()))
    backing = o.backing_file.encode() if o.backing_file else b""
    if v3:
        with_table = exts + [Extension(C.EXT_FEATURE_TABLE, build_feature_table())]
        # qemu-img 7.2 writes the feature-name table only with clusters of 8 KiB and more
        if cs >= 8192 and hdr.header_length + len(build_extensions(with_table)) + len(backing) < cs:
            exts = with_table
    ext_bytes = build_extensions(exts)
    if o.backing_file:
        hdr.backing_file_offset = hdr.header_length + len(ext_bytes)
        hdr.backing_file_size = len(backing)
    body = build_header(hdr) + ext_bytes + backing
    if len(body) > cs:
        raise CreateError("Header extensions and backing file name do not fit in one cluster")
    return body


def create_qcow2(path: str, o: CreateOptions) -> None:
    """Create a qcow2 image file at path (which must not be open elsewhere)."""
    validate(o)
    cs = o.cluster_size
    entry = 16 if o.extended_l2 else 8
    l2_cov = (cs // entry) * cs
    l1_size = -(-o.size // l2_cov)
    # Build the image under a temporary name and rename it into place: a crash leaves the
    # old file (or none), never a half-written image.  An existing image (or data file)
    # that another process uses is refused before anything is touched.
    luks = _luks_area(path, o)
    guard = _guard(path)
    if o.data_file:
        dpath = o.data_file if os.path.isabs(o.data_file) else \
            os.path.join(os.path.dirname(path), o.data_file)
        dfd = os.open(dpath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            from ..host.locking import lock_for_write
            lock_for_write(dfd, dpath)
            fileio.ftruncate(dfd, 0)
            fileio.ftruncate(dfd, o.size if o.data_file_raw or o.preallocation != "off" else 0)
        except BaseException:
            if guard is not None:
                os.close(guard)
            raise
        finally:
            os.close(dfd)
    final = path
    path = os.path.join(os.path.dirname(final) or ".",
                        ".%s.qcow2engine-%d.tmp" % (os.path.basename(final), os.getpid()))
    try:
        _build_qcow2(path, o, l1_size, luks)
        os.rename(path, final)
        dfd = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY | os.O_CLOEXEC)
        try:
            fileio.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    finally:
        if guard is not None:
            os.close(guard)


def _guard(path: str):
    """Lock an existing file for writing (refusing one in use); returns the fd or None."""
    if not os.path.exists(path):
        return None
    from ..host.locking import lock_for_write
    guard = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        lock_for_write(guard, path)
    except BaseException:
        os.close(guard)
        raise
    return guard


def _luks_area(path: str, o: CreateOptions):
    """The LUKS header area of a new encrypted image (None without encryption): the
    passphrase from the secret named by encrypt.key-secret (secrets.DEFAULT)."""
    try:
        p = luks_params(o)
    except CreateError as e:      # qemu-img names the image in these
        if "is unexpected" in str(e) or "its alias" in str(e) or "is missing" in str(e):
            raise CreateError("%s: %s" % (path, e)) from None
        raise
    if p is None:
        return None
    if o.data_file_raw:
        raise CreateError("%s: Encryption is not supported with a raw external data file "
                          "(data_file_raw)" % path)
    if o.preallocation != "off":
        raise CreateError("%s: Preallocation is not supported with encryption" % path)
    if not p["key_secret"]:
        raise CreateError("%s: Parameter 'encrypt.key-secret' is required for cipher" % path)
    from ..host.secrets import DEFAULT, SecretError
    try:
        passphrase = DEFAULT.get(p["key_secret"])
    except SecretError as e:
        raise CreateError("%s: %s" % (path, e)) from None
    if p["format"] == "aes":     # no header area: the passphrase is the key
        from .qcowaes import qcow_key
        from ..errors import InvalidRequestError
        try:
            qcow_key(passphrase, p["key_secret"])
        except InvalidRequestError as e:
            raise CreateError("%s: %s" % (path, e)) from None
        return None
    from .luks import build_header
    area, _ = build_header(passphrase, key_len=p["key_len"], hname=p["hname"],
                           ivgen=p["ivgen"], iter_time=p["iter_time"], mode=p["mode"],
                           ivhash=p["ivhash"])
    return area


def _build_qcow2(path: str, o: CreateOptions, l1_size: int, luks: bytes | None = None) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        from ..host.locking import lock_for_write
        lock_for_write(fd, path)
        if l1_size and (o.data_file_raw or o.preallocation != "off"):
            _build_preallocated(fd, o, l1_size)
        else:
            _build_empty(fd, path, o, l1_size, luks)
        fileio.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)


def _build_empty(fd: int, path: str, o: CreateOptions, l1_size: int,
                 luks: bytes | None = None) -> None:
    """Header, refcount table, one refcount block, an empty L1 table (and, encrypted, the
    LUKS header area in the clusters after it)."""
    from ..format.entries import encode_refblock, to_be64
    from .qcow2 import Qcow2Image
    cs = o.cluster_size
    fileio.pwrite(fd, _header_cluster(o, 0, 0, size=0), 0)
    fileio.pwrite(fd, to_be64(np.array([2 * cs], np.uint64)), cs)
    counts = np.zeros(cs * 8 // o.refcount_bits, np.uint64)
    counts[:3] = 1
    fileio.pwrite(fd, encode_refblock(counts, o.refcount_bits.bit_length() - 1), 2 * cs)
    img = Qcow2Image(path, fd=fd, lock=False, writable=True)
    meta = img.allocator
    meta.sync = False
    l1_off = 0
    if l1_size:
        l1_off = int(meta.allocate(-(-l1_size * 8 // cs), contiguous=True)[0]) * cs
    crypto = None
    if luks is not None:
        crypto = (int(meta.allocate(-(-len(luks) // cs), contiguous=True)[0]) * cs, len(luks))
    meta.commit()
    if l1_size:
        fileio.pwrite(fd, bytes(l1_size * 8), l1_off)
    if crypto:
        fileio.pwrite(fd, luks, crypto[0])
        end = crypto[0] + -(-len(luks) // cs) * cs
        if os.fstat(fd).st_size < end:
            fileio.ftruncate(fd, end)
    fileio.pwrite(fd, _header_cluster(o, l1_size, l1_off, crypto=crypto), 0)


PREALLOC_BATCH = 32 << 20     # bytes of L2 tables or refcount blocks per write


def _build_preallocated(fd: int, o: CreateOptions, l1_size: int) -> None:
    """A fresh image with every guest cluster mapped (data_file_raw: identity into the data
    file; preallocation=metadata/falloc/full: its own clusters), laid out in one pass:
    header, refcount table, refcount blocks, L1, L2 tables, data, every cluster counted
    once.  Cost follows the tables written, in large writes; memory one batch."""
    from ..format.entries import encode_refblock, to_be64
    cs = o.cluster_size
    ext = o.extended_l2
    per_l2 = cs // (16 if ext else 8)
    nclusters = -(-o.size // cs)
    n_l2 = -(-nclusters // per_l2)
    ndata = 0 if o.data_file else nclusters
    l1c = -(-l1_size * 8 // cs)
    per_block = cs * 8 // o.refcount_bits
    nrb = nrt = 1
    while True:                          # the refcount structures count themselves too
        total = 1 + nrt + nrb + l1c + n_l2 + ndata
        need_rb = -(-total // per_block)
        need_rt = -(-need_rb * 8 // cs)
        if (need_rb, need_rt) == (nrb, nrt):
            break
        nrb, nrt = need_rb, need_rt
    rt0 = 1
    rb0 = rt0 + nrt
    l1_0 = rb0 + nrb
    l2_0 = l1_0 + l1c
    d0 = l2_0 + n_l2
    order = o.refcount_bits.bit_length() - 1
    # refcount table and blocks: clusters [0, total) all at refcount 1
    rt = np.zeros(nrt * cs // 8, np.uint64)
    rt[:nrb] = (np.arange(rb0, rb0 + nrb, dtype=np.uint64) * np.uint64(cs))
    fileio.pwrite(fd, to_be64(rt), rt0 * cs)
    full = encode_refblock(np.ones(per_block, np.uint64), order)
    step = max(1, PREALLOC_BATCH // cs)
    for b0 in range(0, nrb, step):
        b1 = min(b0 + step, nrb)
        buf = bytearray(full * (b1 - b0))
        if b1 == nrb and total % per_block:
            last = np.zeros(per_block, np.uint64)
            last[:total % per_block] = 1
            buf[-cs:] = encode_refblock(last, order)
        fileio.pwrite(fd, buf, (rb0 + b0) * cs)
    # L1: every table present
    l1 = np.zeros(l1c * cs // 8, np.uint64)
    l1[:n_l2] = (np.arange(l2_0, l2_0 + n_l2, dtype=np.uint64) * np.uint64(cs)) | \
        np.uint64(C.QCOW_OFLAG_COPIED)
    fileio.pwrite(fd, to_be64(l1), l1_0 * cs)
    # L2 tables, a batch at a time
    first_host = 0 if o.data_file else d0
    words = 2 if ext else 1
    for t0 in range(0, n_l2, step):
        t1 = min(t0 + step, n_l2)
        g0, g1 = t0 * per_l2, min(t1 * per_l2, nclusters)
        tables = np.zeros((t1 - t0) * per_l2 * words, np.uint64)
        hosts = (np.arange(g0, g1, dtype=np.uint64) + np.uint64(first_host)) * np.uint64(cs)
        # extended L2: the bitmap stays empty, as QEMU's: each subcluster still reads from
        # the backing file (or as zeros) until written
        tables[0:(g1 - g0) * words:words] = hosts | np.uint64(C.QCOW_OFLAG_COPIED)
        fileio.pwrite(fd, to_be64(tables), (l2_0 + t0) * cs)
    fileio.pwrite(fd, _header_cluster(o, l1_size, l1_0 * cs, reftable=(rt0 * cs, nrt)), 0)
    fileio.ftruncate(fd, total * cs)
    if ndata and o.preallocation in ("falloc", "full"):
        try:
            fileio.fallocate(fd, 0, d0 * cs, ndata * cs)
        except OSError:
            pass


def create_raw(path: str, size: int, preallocation: str = "off") -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        from ..host.locking import lock_for_write
        lock_for_write(fd, path)
        fileio.ftruncate(fd, 0)
        fileio.ftruncate(fd, size)
        if preallocation in ("falloc", "full") and size:
            fileio.fallocate(fd, 0, 0, size)
    finally:
        os.close(fd)


RAW_FORMATS = ("raw", "file")       # `-f file`: QEMU's file protocol driver, a plain file


def check_format(path: str, fmt: str) -> None:
    """Refuse, with qemu-img's message, a format this engine does not write."""
    if fmt != "qcow2" and fmt not in RAW_FORMATS:
        raise CreateError("%s: Unknown file format '%s'" % (path, fmt))


def create_from_options(path: str, o: CreateOptions, fmt: str = "qcow2") -> None:
    """Create an image from fully resolved options (size known, backing not opened); the
    size is rounded up to a multiple of 512, as qemu-img does."""
    check_format(path, fmt)
    if o.size is not None and o.size % 512:
        o = dataclasses.replace(o, size=-(-o.size // 512) * 512)
    if fmt in RAW_FORMATS:
        create_raw(path, o.size, o.preallocation)
        return
    if o.backing_file:
        from ..host.paths import has_protocol
        from ..errors import ChainError
        if has_protocol(o.backing_file):
            raise ChainError("Backing file '%s' uses a protocol prefix; refusing" % o.backing_file)
    validate(o)
    create_qcow2(path, o)
