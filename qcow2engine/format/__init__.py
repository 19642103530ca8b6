"""On-disk layout of qcow2: construct structures, constants and numpy entry decoders. No I/O."""
