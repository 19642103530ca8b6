"""The QEMU fixtures of the live tests: `vm` (-M pc) and `vm_none` (-M none), both
qmp_bridge.launch.QemuProcess (see tests/helpers/qmp.py)."""
from tests.helpers.qmp import vm, vm_none  # noqa: F401  (fixtures)
