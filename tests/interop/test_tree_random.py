"""Random sequences of create / revert (every mode, with and without discard) / delete /
guest writes on a machine, against the model (tests/helpers/machine.py), checked by QEMU's
tools after every step.  A verb the engine refuses must change nothing; everything it does
must match the model.  Seeded: a failure names its seed and step."""
from __future__ import annotations

import random

import pytest

from qcow2engine.errors import InvalidRequestError, MachineError, SnapshotError
from tests.helpers.machine import make_machine

REFUSALS = (MachineError, SnapshotError, InvalidRequestError)


def _step(e, rnd, i, log):
    names = sorted(e.model.snaps)
    r = rnd.random()
    if not names:
        r = 0.2 if r < 0.5 else 0.4          # nothing to revert or delete yet
    if r < 0.35:
        d = rnd.choice(e.model.disks)
        slot, pat = rnd.randrange(8), rnd.randrange(1, 255)
        log.append("write %s %d %d" % (d, slot, pat))
        e.write(d, slot, pat)
        return
    if r < 0.55:
        kind = rnd.choice(["internal", "external", "mixed"])
        name = "s%d" % i
        log.append("create %s %s" % (name, kind))
        if kind == "mixed":
            e.create(name, diskspecs={e.model.disks[0]: "internal",
                                      e.model.disks[1]: "external"})
        else:
            e.create(name, kind=kind)
        return
    target = rnd.choice(names)
    if r < 0.85:
        external = all(k in ("external", "no") for k in e.model.kinds[target].values())
        modes = ["reset"]
        if external and e.model.branch.get(target) is not None:
            modes += ["follow", "commit"]
        mode = rnd.choice(modes)
        discard = rnd.random() < 0.2
        auto = rnd.random() < 0.8
        log.append("revert %s %s discard=%s auto=%s" % (target, mode, discard, auto))
        e.revert(target, mode, discard=discard, auto_snapshot=auto)
        return
    how = rnd.choice([{}, {}, {"children": True}, {"flatten": True}])
    log.append("delete %s %s" % (target, how))
    e.delete(target, **how)


def run_sequence(e, seed: int, steps: int, after_step=lambda: None) -> list:
    """steps random steps on Env e (seeded); every refusal must leave the tree as it was."""
    rnd = random.Random(seed)
    log = []
    for i in range(steps):
        before = e.m.state()
        try:
            _step(e, rnd, i, log)
        except REFUSALS as err:
            log.append("  refused: %s" % err)
            assert e.m.state() == before, "seed %d: a refused verb changed the tree" % seed
            e.verify()
        except AssertionError as err:
            raise AssertionError("seed %d, after:\n  %s\n%s" % (seed, "\n  ".join(log), err))
        after_step()
    ran = {line.split()[0] for line in log if not line.startswith(" ")}
    assert {"create", "revert", "write"} <= ran, log
    return log


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_random_sequences(tmp_path, seed):
    run_sequence(make_machine(tmp_path, 2, "internal", size=1 << 20), seed, 30)


def test_sequences_reach_every_verb():
    """The generator above makes every kind of step (a guard against a sequence that only
    writes)."""
    seen = set()
    for seed in (1, 2, 3, 4, 5, 6):
        rnd = random.Random(seed)
        for i in range(30):
            r = rnd.random()
            seen.add("write" if r < 0.35 else "create" if r < 0.55 else
                     "revert" if r < 0.85 else "delete")
    assert seen == {"write", "create", "revert", "delete"}
