"""What every benchmark script shares.

- :mod:`.runner`: the one whole-process measurement (wall time from start to reaped,
  peak RSS, timeout, first line of stderr on failure) and the one repetition loop
  (warm-up rounds, then alternating timed rounds, a time budget, samples and medians);
- :mod:`.artifacts`: building and caching input images, untimed set-up commands, fresh
  sparse copies;
- :mod:`.compare`: the side-by-side run of qemu-img/qemu-io and the engine on one
  workload, the ratio engine/qemu and the verdict against a target;
- :mod:`.verify`: the checks that both tools' outputs agree;
- :mod:`.report`: the one table printer (text or Markdown), number formats, the machine
  description.

Nothing here imports qcow2engine; the engine is run as a command.
"""
