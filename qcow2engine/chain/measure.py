"""`measure`: the size a new image needs, computed as qemu-img measure computes it.

fully-allocated: the data rounded to clusters plus every table a fully allocated image
needs (header cluster, L2 tables, L1 table, refcount table and blocks covering all of it).
required: the same metadata plus only the clusters that hold data in the source.
"""
from __future__ import annotations


from ..format import entries as E


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table + blocks needed to describe `clusters` clusters and themselves."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    last, n = -1, 0
    while n != last:
        last = n
        blocks = _div_up(clusters + table + blocks, per_block)
        table = _div_up(blocks, per_table_cluster)
        n = clusters + blocks + table
    return (blocks + table) * cluster_size


def prealloc_size(size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """File size of a fully preallocated qcow2 image of virtual size `size`."""
    l2e = 16 if extended_l2 else 8
    aligned = _div_up(size, cluster_size) * cluster_size
    meta = cluster_size                                   # header
    nl2e = aligned // cluster_size
    nl2e = _div_up(nl2e, cluster_size // l2e) * (cluster_size // l2e)
    meta += nl2e * l2e                                    # L2 tables
    nl1e = nl2e * l2e // cluster_size
    nl1e = _div_up(nl1e, cluster_size // 8) * (cluster_size // 8)
    meta += nl1e * 8                                      # L1 table
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def data_size(chain, cluster_size: int) -> int:
    """Bytes of target clusters holding data: extents with data (not known zero), each
    rounded out to whole target clusters, walked like qemu-img's block-status loop."""
    required = 0
    offset = 0
    size = chain.size
    for ex in chain.iter_extents(0, size):
        k = ex.kinds
        data = E.DATA_KINDS[k] & ~E.ZERO_KINDS[k]       # holes and zero clusters need nothing
        for s, e, dflag in zip(ex.starts.tolist(), ex.ends.tolist(), data.tolist()):
            if e <= offset:
                continue
            s = max(s, offset)
            if not dflag:
                offset = e
                continue
            end = _div_up(e, cluster_size) * cluster_size
            required += s % cluster_size + (end - s)
            offset = end
    return required


def bitmaps_size(img, cluster_size: int) -> int:
    """Bytes the persistent bitmaps of img need in a new image with cluster_size."""
    bms = img.bitmaps if img is not None else []
    if not bms:
        return 0
    total = 0
    dir_size = 0
    for b in bms:
        bits = _div_up(img.size, b.granularity)
        data_clusters = _div_up(bits, cluster_size * 8)
        total += data_clusters * cluster_size
        total += _div_up(data_clusters * 8, cluster_size) * cluster_size
        entry = 24 + len(b.extra_data) + len(b.name.encode())
        dir_size += (entry + 7) & ~7
    total += _div_up(dir_size, cluster_size) * cluster_size
    return total


def measure(chain=None, size: int | None = None, options=None, out_fmt: str = "qcow2") -> dict:
    """{"required": N, "fully-allocated": N[, "bitmaps": N]} for a new image."""
    from ..image.create import parse_options
    o = parse_options(options)
    vsize = chain.size if chain is not None else (size if size is not None else o.size)
    if vsize is None:
        raise ValueError("Either --size N or one filename must be specified")
    vsize = _div_up(vsize, 512) * 512
    if out_fmt == "raw":
        return {"required": vsize, "fully-allocated": vsize}
    cs = o.cluster_size
    order = o.refcount_bits.bit_length() - 1
    l2e = 16 if o.extended_l2 else 8
    if _div_up(vsize, cs * (cs // l2e)) * 8 > 32 * 1024 * 1024:
        from ..errors import Qcow2Error
        raise Qcow2Error("The image size is too large (try using a larger cluster size)")
    full = prealloc_size(vsize, cs, order, o.extended_l2)
    req = data_size(chain, cs) if chain is not None else 0
    from ..image.create import luks_params
    luks = luks_params(o)
    if luks is not None:          # the LUKS header area, in whole clusters
        if not luks["key_secret"]:
            from ..errors import CreateError
            raise CreateError("Parameter 'encrypt.key-secret' is required for cipher")
        from ..host.secrets import DEFAULT
        DEFAULT.get(luks["key_secret"])
        if luks["format"] == "luks":     # (legacy AES has no header area)
            from ..image.luks import area_size
            full += _div_up(area_size(luks["key_len"]), cs) * cs
    out = {"required": full - _div_up(vsize, cs) * cs + req, "fully-allocated": full}
    top = getattr(chain.layers[0], "image", None) if chain is not None else None
    if top is not None and o.compat != "0.10":
        out["bitmaps"] = bitmaps_size(top, cs)
    return out
