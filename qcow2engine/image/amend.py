"""`amend -o compat=...,lazy_refcounts=...,refcount_bits=...`: change image options in place.

- lazy_refcounts: the compatible feature bit (v3 only); turning it off repairs a dirty image.
- refcount_bits: every refcount block is rewritten with the new width into new clusters; the
  header switches to the new table and order in one write; then the old structures are freed.
- compat: 1.1 -> 0.10 expands zero clusters (the format has no zero flag) and needs 16-bit
  refcounts and no v3-only features; 0.10 -> 1.1 writes the v3 header fields.  The header
  cluster is rewritten in one write.
"""
from __future__ import annotations

import numpy as np

from ..host import fileio
from ..errors import AmendError, Qcow2Error
from ..format import constants as C
from ..format.header import Extension, build_feature_table
from .qcow2 import Qcow2Image
from .metadata import switch_refcount_table, write_header_cluster, write_refcount_structure



def parse_amend_options(options):
    """The options of `amend -o` (only those that can change in place); the LUKS key slot
    options (encrypt.state, encrypt.new-secret, encrypt.old-secret, encrypt.keyslot,
    encrypt.iter-time) go to spec.encrypt_amend."""
    from .create import parse_options, CreateOptions, _split_opts
    from .luks import AMEND_KEYS
    if isinstance(options, dict):
        items = [(str(k), v) for k, v in options.items()]
    else:
        if not isinstance(options, str):
            options = ",".join(options)
        items = [tuple(p.split("=", 1)) if "=" in p else (p, "on") for p in _split_opts(options)]
    rest, enc = {}, {}
    for k, v in items:
        if k.startswith("encrypt."):
            if k[8:] not in AMEND_KEYS:
                raise AmendError("Invalid parameter '%s'" % k)
            enc[k[8:]] = str(v)
        else:
            rest[k] = v
    spec = parse_options(rest, CreateOptions())
    allowed = {"compat", "lazy_refcounts", "refcount_bits", "size"}
    bad = [k for k in spec.given if k not in allowed]
    if bad:
        raise AmendError("Changing the option '%s' is not supported" % bad[0])
    spec.encrypt_amend = enc
    return spec


def amend_qcow2(img: Qcow2Image, spec, *, secrets=None, force: bool = False) -> None:
    """Change the options given in spec (parse_amend_options) of an image opened writable
    (and unlocked, for key slot changes: secrets holds the new and old secrets)."""
    if "size" in spec.given:
        from .resize import resize_qcow2
        resize_qcow2(img, spec.size, shrink=True)
    if "refcount_bits" in spec.given and spec.refcount_bits != img.refcount_bits:
        if img.version < 3 and spec.refcount_bits != 16 and spec.compat != "1.1":
            raise AmendError("Different refcount widths than 16 bits require compatibility "
                             "level 1.1 or above (use compat=1.1 or greater)")
        if img.version < 3:
            _upgrade(img)
        _change_refcount_order(img, spec.refcount_bits.bit_length() - 1)
    if "compat" in spec.given:
        if spec.compat == "1.1" and img.version < 3:
            _upgrade(img)
        elif spec.compat == "0.10" and img.version >= 3:
            _downgrade(img)
    if "lazy_refcounts" in spec.given:
        if img.version < 3 and spec.lazy_refcounts:
            raise AmendError("Lazy refcounts only supported with compatibility level 1.1 "
                             "and above (use compat=1.1 or greater)")
        if img.version >= 3:
            h = img.header
            if spec.lazy_refcounts:
                h.compatible_features |= C.COMPAT_LAZY_REFCOUNTS
            else:
                h.compatible_features &= ~C.COMPAT_LAZY_REFCOUNTS
            write_header_cluster(img)
    amend_encryption(img, spec, secrets=secrets, force=force)


def _upgrade(img: Qcow2Image) -> None:
    from .snapshots import upgrade_table
    upgrade_table(img)
    h = img.header
    h.version = 3
    h.header_length = 112
    h.refcount_order = 4
    img.version = 3
    if not any(e.type == C.EXT_FEATURE_TABLE for e in img.extensions) and img.cluster_size >= 8192:
        img.extensions.append(Extension(C.EXT_FEATURE_TABLE, build_feature_table()))
    write_header_cluster(img)


def _downgrade(img: Qcow2Image) -> None:
    h = img.header
    if img.refcount_bits != 16:
        raise AmendError("compat=0.10 requires refcount_bits=16")
    if img.extended_l2 or img.has_data_file or h.compression_type != 0:
        raise AmendError("Cannot downgrade an image with extended L2 entries, an external data "
                         "file or zstd compression")
    if img.bitmaps:
        raise AmendError("Cannot downgrade an image with persistent bitmaps")
    if img.dirty:
        raise AmendError("Cannot downgrade a dirty image; repair it first")
    _expand_zero_clusters(img)
    h.version = 2
    h.header_length = C.V2_HEADER_SIZE
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0
    img.version = 2
    img.extensions = [e for e in img.extensions if e.type in (C.EXT_BACKING_FORMAT,)] + \
        [e for e in img.unknown_extensions]
    write_header_cluster(img)


def _expand_zero_clusters(img: Qcow2Image) -> None:
    """v2 has no zero flag: zero clusters become real zero data (or unallocated when nothing
    lies below them).  Snapshots' tables are handled like the active one."""
    meta = img.allocator
    cs = img.cluster_size
    has_backing = bool(img.backing_file)
    from collections import Counter
    tables = Counter()          # L2 table -> number of L1 tables that reach it
    l1s = [img.l1_table] + [img.read_l1(s.l1_table_offset, s.l1_size) for s in img.snapshots]
    for l1 in l1s:
        offs = (l1 & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
        tables.update(int(o) for o in offs[offs != 0])
    for o, paths in sorted(tables.items()):
        t = img.read_l2(o).copy()
        zero = (t & np.uint64(C.QCOW_OFLAG_ZERO)) != 0
        if not zero.any():
            continue
        host = (t & np.uint64(C.L2E_OFFSET_MASK)).astype(np.int64)
        alloc = zero & (host != 0)
        plain = zero & (host == 0)
        # preallocated zero clusters: write zeros into them and keep them as data
        for hst in host[alloc].tolist():
            fileio.pwrite(img.fd, bytes(cs), hst)
        if plain.any() and has_backing:
            newc = meta.allocate(int(plain.sum()))
            if paths > 1:
                meta.change(newc, paths - 1)     # every L1 path through this table counts
            meta.commit()
            new = newc * cs
            for hst in new.tolist():
                fileio.pwrite(img.fd, bytes(cs), hst)
            flag = np.uint64(C.QCOW_OFLAG_COPIED) if paths == 1 else np.uint64(0)
            t[np.flatnonzero(plain)] = new.astype(np.uint64) | flag
        elif plain.any():
            t[plain] = 0
        t[alloc] &= ~np.uint64(C.QCOW_OFLAG_ZERO)
        meta.flush()
        meta.write_l2(o, t)
    meta.flush()


def _change_refcount_order(img: Qcow2Image, order: int) -> None:
    """Rewrite all refcounts with a new width in new clusters, then switch and free."""
    bits = img.cluster_bits
    img.allocator.commit()
    counts = img.refcounts_all().astype(np.uint64)
    if counts.size and int(counts.max()) >= (1 << (1 << order)):
        raise AmendError("Cannot change refcount_bits to %d: some refcounts are too large"
                         % (1 << order))
    # the old structures stay counted until they are freed below
    rt_off, rt_clusters, table, _ = write_refcount_structure(img, counts, order)
    h = img.header
    old_rt = (h.refcount_table_offset, h.refcount_table_clusters)
    old_blocks = [int(x) & C.REFT_OFFSET_MASK for x in img.refcount_table.tolist()]
    switch_refcount_table(img, rt_off, rt_clusters, table, order=order)
    img.forget_tables()                  # the allocator starts over from the new structure
    meta = img.allocator
    freed = [o >> bits for o in old_blocks if o] + \
        list(range(old_rt[0] >> bits, (old_rt[0] >> bits) + old_rt[1]))
    meta.free(np.array(sorted(set(freed)), np.int64))
    meta.commit()


def amend_encryption(img: Qcow2Image, spec, *, secrets=None, force: bool = False) -> None:
    """The key slot part of spec (encrypt.state=...), after the other options."""
    enc = getattr(spec, "encrypt_amend", None)
    if not enc:
        return
    if secrets is None:
        from ..host.secrets import DEFAULT as secrets
    from .luks import amend_keyslots
    amend_keyslots(img, enc, secrets, force=force)
