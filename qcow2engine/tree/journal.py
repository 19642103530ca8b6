"""Running a plan so that a crash at any point loses nothing.

Before the first file is touched the whole plan (its steps and the state afterwards) is in
the database; each step is recorded as it completes.  A failure or a crash then leaves a
pending operation that `recover` finishes:

- before the plan's first irreversible step (plan.irreversible): roll back — undo the steps
  done, the one in flight included (every undo checks before it acts: a file that is not
  there is not removed twice, a tag that is not there is not deleted);
- from it on: roll forward — do the steps again from the one in flight (each is idempotent),
  then save the state afterwards.

The state the database shows is therefore always a whole one: the old (the tree's rows are
only rewritten by the last transaction, which also ends the operation) or the new.
"""
from __future__ import annotations

import threading
from typing import Optional

from ..errors import JobCancelled, OperationPendingError
from ..jobs import Progress
from .model import EXTERNAL, NO, MachineState
from .plan import Plan, written
from .store import Store, machine_from_dict, machine_to_dict

LONG = {"internal_to_overlay", "commit", "stream"}


def _undo(st: dict) -> list:
    """The steps that undo st (reversible steps only)."""
    op = st["op"]
    if op == "create_overlay":
        return [{"op": "remove_file", "path": st["path"]}]
    if op == "internal_create":
        return [{"op": "internal_delete", "path": st["path"], "tag": st["tag"]}]
    if op in ("rebase", "stream"):
        return [{"op": "rebase", "path": st["path"], "backing": st["prev"],
                 "backing_fmt": st["prev_fmt"]}]
    return []           # internal_to_overlay, resize, a merge's commit: nothing to put back


def plan_to_dict(p: Plan) -> dict:
    return {"kind": p.kind, "steps": p.steps, "after": machine_to_dict(p.after),
            "irreversible": p.irreversible, "sets_current": p.sets_current,
            "tip_clean": p.tip_clean, "messages": p.messages, "auto": p.auto,
            "created": p.created, "removed": p.removed, "deleted": p.deleted,
            "cancellable": p.cancellable,
            "on_cancel": machine_to_dict(p.on_cancel) if p.on_cancel else None}


def plan_from_dict(d: dict) -> Plan:
    return Plan(d["kind"], d["steps"], machine_from_dict(d["after"]), d["irreversible"],
                d["sets_current"], d["tip_clean"], d["messages"], d["auto"], d["created"],
                d["removed"], d["deleted"], d["cancellable"],
                machine_from_dict(d["on_cancel"]) if d.get("on_cancel") else None)


class Journal:
    def __init__(self, store: Store, backend, before: MachineState):
        self.store = store
        self.b = backend
        self.before = before

    # ------------------------------------------------------------ running
    def call(self, st: dict, progress=None, cancel=None) -> None:
        args = {k: v for k, v in st.items() if k not in ("op", "prev", "prev_fmt")}
        if st["op"] in LONG:
            args["progress"] = progress
            args["cancel"] = cancel
        getattr(self.b, st["op"])(**args)

    def run(self, plan: Plan, *, progress: Optional[Progress] = None,
            cancel: Optional[threading.Event] = None, start: int = 0,
            begin: bool = True) -> None:
        """Record the plan, do its steps, save the new state.  A cancel (cancellable plans
        only) or an error before the irreversible step rolls back and re-raises; after it,
        the operation stays pending and OperationPendingError says so."""
        name = plan.after.name
        if begin:
            self.store.begin_op(name, plan.kind, plan_to_dict(plan))
        total_long = [0]

        def prog(done, total):
            if progress:
                progress(total_long[0] + done, total_long[0] + total)

        i = start
        try:
            for i in range(start, len(plan.steps)):
                st = plan.steps[i]
                # only a merge's commits stop at a cancel (into plan.on_cancel)
                self.call(st, prog, cancel if plan.cancellable and st["op"] == "commit"
                          else None)
                self.store.step_done(name, i + 1)
        except BaseException as e:
            if not isinstance(e, Exception):
                raise                   # a crash (or an interrupt): recover decides later
            if isinstance(e, JobCancelled) and plan.on_cancel is not None:
                self.repair(plan.steps[i:i + 1])
                self.finish(plan, plan.on_cancel)   # the long step stopped cleanly
                raise
            # a step that refused before changing anything (QEMU rejected a transaction)
            # is undone as well
            if i < plan.irreversible or (i == plan.irreversible and
                                         getattr(e, "nothing_changed", False)):
                try:
                    self.rollback(plan, i)
                except Exception as e2:     # noqa: BLE001 - say what is left
                    raise OperationPendingError(
                        "%s; undoing it failed too (%s); the operation is pending: 'machine "
                        "recover %s' finishes it" % (e, e2, name)) from e
                raise
            raise OperationPendingError(
                "%s (step %d of %d, %s); the operation is pending: 'machine recover %s' "
                "completes it" % (e, i + 1, len(plan.steps), plan.steps[i]["op"], name)) from e
        self.finish(plan)

    def rollback(self, plan: Plan, upto: int) -> None:
        """Undo steps upto..0 (upto may be half done), then end the operation."""
        name = plan.after.name
        for st in reversed(plan.steps[:upto + 1]):
            for u in _undo(st):
                self.call(u)
        self.repair(plan.steps[:upto + 1])
        # the undone steps kept every view the old state records, but they wrote files:
        # take the stamps of those again, then end the operation
        touched = set().union(*(written(st) for st in plan.steps[:upto + 1]))
        old = self.store.load(name)
        for path in touched & set(old.files):
            rec = old.files[path]
            if rec.frozen is not None and self.b.exists(path):
                rec.frozen = self.b.stamp(path)
        for d in old.disks:
            if d.active in touched:
                d.baseline = self.b.stamp(d.active) if plan.tip_clean.get(d.name) else None
        self.store.save(old, finish_op=True)

    def repair(self, steps) -> None:
        """An interrupted step may have leaked clusters in the image it wrote: repair them."""
        for path in sorted(set().union(*(written(st) for st in steps))):
            self.b.repair(path)

    def finish(self, plan: Plan, after: Optional[MachineState] = None) -> None:
        """Stamp what the plan changed and save the state afterwards (ending the operation)."""
        after = plan.after if after is None else after
        lost = getattr(self.b, "lost_memory", ())
        for s in after.snapshots.values():
            # finished offline after its QEMU died: the snapshot is kept, without memory
            if s.memory != NO and (s.memfile in lost if s.memory == EXTERNAL else
                                   s.name in lost):
                s.memory, s.memfile, s.vm_state = NO, None, None
        touched = set().union(*(written(st) for st in plan.steps))
        for rec in after.files.values():
            if after.frozen_needed(rec.path):
                if rec.frozen is None or rec.path in touched:
                    rec.frozen = self.b.stamp(rec.path)
            else:
                rec.frozen = None
        old = {d.name: d.active for d in self.before.disks}
        for d in after.disks:
            if plan.sets_current:
                d.baseline = self.b.stamp(d.active)
            elif d.active != old.get(d.name) or d.active in touched:
                clean = plan.tip_clean.get(d.name, False)
                d.baseline = self.b.stamp(d.active) if clean else None
        self.store.save(after, finish_op=True)


def recover(store: Store, backend, before: MachineState) -> Optional[str]:
    """Finish the pending operation of a machine: 'rolled back', 'rolled forward' or None."""
    op = store.op(before.name)
    if op is None:
        return None
    plan = plan_from_dict(op["plan"])
    j = Journal(store, backend, before)
    done = op["done"]
    if done < plan.irreversible:
        j.rollback(plan, min(done, len(plan.steps) - 1))
        return "rolled back"
    j.repair(plan.steps[:done + 1])
    j.run(plan, start=done, begin=False)
    return "rolled forward"
