"""Command-line front end (`qcow2engine`), compatible with qemu-img 7.2's commands and codes."""
