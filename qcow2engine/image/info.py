"""`info`: ImageInfo documents as qemu-img 7.2 builds them, and its human rendering."""
from __future__ import annotations


from ..format import constants as C


def snapshot_info(sn) -> dict:
    d = {
        "id": sn.id_str,
        "name": sn.name,
        "vm-state-size": sn.effective_vm_state_size,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1000000000,
        "vm-clock-nsec": sn.vm_clock_nsec % 1000000000,
    }
    if sn.icount is not None:
        # QEMU keeps icount as a signed 64-bit number
        d["icount"] = sn.icount - (1 << 64) if sn.icount >= (1 << 63) else sn.icount
    return d


def qcow2_specific(img) -> dict:
    h = img.header
    d: dict = {"compat": "0.10" if img.version == 2 else "1.1"}
    if img.version >= 3:
        if img.data_file_name is not None:
            d["data-file"] = img.data_file_name
            d["data-file-raw"] = img.data_file_raw
        d["extended-l2"] = img.extended_l2
        d["lazy-refcounts"] = img.lazy_refcounts
        d["corrupt"] = img.corrupt
    d["refcount-bits"] = img.refcount_bits
    if h.crypt_method == C.CRYPT_AES:
        d["encrypt"] = {"format": "aes"}
    elif h.crypt_method == C.CRYPT_LUKS:
        from .luks import luks_info
        d["encrypt"] = luks_info(img)
    if img.version >= 3:
        bms = img.bitmaps
        if bms:
            d["bitmaps"] = [{"name": b.name, "granularity": b.granularity,
                             "flags": b.flag_names()} for b in bms]
    d["compression-type"] = C.COMPRESSION_NAMES.get(h.compression_type, "zlib")
    return d


def image_info(layer, filename: str | None = None) -> dict:
    """The ImageInfo document of one image (a Qcow2Image or RawFile, or a layer of a chain)."""
    from ..host.paths import resolve_backing
    name = filename if filename is not None else layer.path
    img = getattr(layer, "image", layer)
    if hasattr(img, "header"):
        d: dict = {
            "virtual-size": img.size,
            "filename": name,
            "cluster-size": img.cluster_size,
            "format": "qcow2",
            "actual-size": img.allocated_size,
            "dirty-flag": img.dirty,
        }
        if img.encrypted:
            d["encrypted"] = True
        if img.backing_file:
            d["backing-filename"] = img.backing_file
            d["full-backing-filename"] = resolve_backing(name, img.backing_file)
            if img.backing_format:
                d["backing-filename-format"] = img.backing_format
        if img.snapshots:
            d["snapshots"] = [snapshot_info(s) for s in img.snapshots]
        d["format-specific"] = {"type": "qcow2", "data": qcow2_specific(img)}
        return d
    return {
        "virtual-size": layer.size,
        "filename": name,
        "format": "raw",
        "actual-size": layer.allocated_size,
        "dirty-flag": False,
    }
