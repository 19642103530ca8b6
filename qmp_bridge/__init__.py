"""qmp_bridge: drive a live QEMU over QMP (online snapshots, commit, stream).  Not built yet."""
