"""The layer rules a grep can keep (DESIGN.md "Layers", issue 10): only the image layer touches
an image's cached tables and allocator state; raw header packing lives only in
image/metadata.py, format/ and host/; nothing imports upward."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "qcow2engine"

PRIVATE_CACHES = re.compile(r"\._l2_cache|\._l1\b|\._reftable|\._snapshots|\._allocator")
RAW_HEADER = re.compile(r"HDR_|struct\.pack\(")

# layer -> the layers it may import (DESIGN.md's table, folders for modules)
ALLOWED = {
    "format": set(),
    "host": {"errors"},
    "image": {"format", "host", "errors", "units"},
    "refcounts": {"image", "format", "host", "errors"},
    "blockdev": {"image", "format", "host", "errors"},
    "chain": {"blockdev", "image", "refcounts", "format", "host", "errors", "jobs", "units"},
    "tree": {"chain", "blockdev", "image", "refcounts", "format", "host", "errors", "jobs",
             "units"},
}


def _sources():
    for p in sorted(PKG.rglob("*.py")):
        yield p, p.relative_to(PKG).as_posix(), p.read_text()


def test_private_caches_only_in_image_layer():
    hits = [f"{rel}:{i}: {line.strip()}"
            for p, rel, text in _sources() if not rel.startswith("image/")
            for i, line in enumerate(text.splitlines(), 1) if PRIVATE_CACHES.search(line)]
    assert hits == []


def test_header_packing_only_in_its_home():
    homes = ("image/metadata.py", "format/", "host/")
    hits = [f"{rel}:{i}: {line.strip()}"
            for p, rel, text in _sources() if not rel.startswith(homes)
            for i, line in enumerate(text.splitlines(), 1) if RAW_HEADER.search(line)]
    assert hits == []


def test_the_checks_can_fail():
    assert PRIVATE_CACHES.search("img._l2_cache.clear()")
    assert PRIVATE_CACHES.search("x = img._l1")
    assert not PRIVATE_CACHES.search("img._l1_size")
    assert RAW_HEADER.search('struct.pack(">Q", 0)') and RAW_HEADER.search("HDR_SIZE")


def _imported_layers(rel: str, text: str):
    """Top-level qcow2engine modules/packages a file imports (relative or absolute)."""
    parts = rel[:-3].split("/")
    pkg = parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:
                    target = base + [node.names[0].name]
            elif node.module and node.module.startswith("qcow2engine."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                out.add(target[0])
    return out


def test_nothing_imports_upward():
    bad = []
    for p, rel, text in _sources():
        layer = rel.split("/")[0]
        if layer not in ALLOWED:
            continue
        for dep in _imported_layers(rel, text) - {layer}:
            if dep not in ALLOWED[layer]:
                bad.append(f"{rel} imports {dep}")
    assert bad == []


def test_layers_are_folders():
    for d in ("format", "host", "image", "refcounts", "blockdev", "chain", "cli"):
        assert (PKG / d / "__init__.py").is_file(), d
    stray = [p.name for p in PKG.glob("*.py")
             if p.name not in {"__init__.py", "__main__.py", "api.py", "demo.py", "errors.py",
                               "jobs.py", "units.py"}]
    assert stray == []
