"""What the tests share (nothing here is a test):

- engine: the qcow2engine CLI run in this process or as a subprocess;
- qemu: the one runner of QEMU's tools (qemu-img, qemu-io), the guest view of an image read
  through them, image checks and info, a small pool for concurrent tool calls;
- files: file and tree hashes;
- fixtures: pytest fixtures used across folders (the image variants, no disk flushes);
- images: the factory of image variants built with QEMU's tools;
- chains: backing chains built with QEMU's tools from a specification;
- corpus: the damaged-image corpus and QEMU's reaction to it;
- iodiff: the differential harness qemu-io vs `qcow2engine io`;
- faultinject: fault injection at the engine's fileio calls, real process kills;
- qmp: QEMU processes (qmp_bridge.launch.QemuProcess) and helpers for the live tests.
"""
