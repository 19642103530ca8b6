"""Benchmarks comparing qcow2engine against QEMU's ``qemu-img``.

Run them with ``python -m benchmarks.run`` from the repository root; see
``python -m benchmarks.run --help`` and the module docstring of
:mod:`benchmarks.run`.
"""
