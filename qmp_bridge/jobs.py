"""Handles on QEMU jobs: wait with progress, speed, pause/resume, complete, cancel, errors.

Our jobs are started with auto-finalize and auto-dismiss off, so a job that has done its work
waits in "pending" for us to finalize it, and a finished one stays "concluded" (with its error,
if any) until we dismiss it.  If the process driving a job dies, the job is still listed by
query-jobs and the next attach can adopt it (Job.adopt) and finish or cancel it.

Waiting is event-driven with polling as the source of truth: the job's events (registered
before the command that starts it) wake the waiter at once, and query-jobs is read after every
wake-up and at least every `poll_interval` seconds, so a dropped event never hangs a wait.

Outcomes (JobResult.outcome):
  "completed"  the job did its work (stream, intermediate commit, snapshot-* jobs)
  "pivoted"    active commit completed with job-complete: the disk now runs on the base
               (a disk with no device has nothing to switch: its commit reports "completed")
  "kept-top"   active commit completed without pivot (block-job-cancel after ready): the base
               holds the data, the disk stays on the top
  "cancelled"  the job was cancelled; for commit, the base may hold part of the data
A job that fails raises LiveJobError (a qcow2engine JobError) carrying a JobResult with outcome
"failed" and QEMU's error text.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from .client import EventStream, QMPSession
from .errors import LiveJobError, QMPCommandError, QMPTimeoutError
from .graph import JobInfo

__all__ = ["Job", "JobResult", "JOB_EVENTS", "ProgressCallback", "job_event_match"]

log = logging.getLogger(__name__)

from qcow2engine.jobs import Progress as ProgressCallback  # noqa: E402 - one vocabulary

JOB_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
              "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING")

_CANCELED = "Operation canceled"


def job_event_match(job_id: str) -> Callable[[dict], bool]:
    """An event filter for one job's events (JOB_* carry "id", BLOCK_JOB_* "device")."""
    def match(event: dict) -> bool:
        data = event.get("data") or {}
        return data.get("id") == job_id or data.get("device") == job_id
    return match


@dataclass
class JobResult:
    """How a job ended."""
    id: str
    type: str
    outcome: str                  # completed | pivoted | kept-top | cancelled | failed
    error: str | None = None
    current: int = 0
    total: int = 0
    seconds: float = 0.0
    removed_nodes: list[str] = field(default_factory=list)
    kept_nodes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"id": self.id, "type": self.type, "outcome": self.outcome, "error": self.error,
                "current-progress": self.current, "total-progress": self.total,
                "seconds": round(self.seconds, 3), "removed-nodes": self.removed_nodes,
                "kept-nodes": self.kept_nodes}


class Job:
    """A QEMU job we started or adopted.  Use as a context manager, or call close()."""

    poll_interval = 0.2

    def __init__(self, session: QMPSession, job_id: str, job_type: str = "", *,
                 events: EventStream | None = None):
        """Prefer Job.start() (registers the listener before the command) or Job.adopt()."""
        self.session = session
        self.id = job_id
        self.type = job_type
        self.events = events if events is not None else \
            session.listen(JOB_EVENTS, job_event_match(job_id), maxsize=64)
        self.error_events: collections.deque[dict] = collections.deque(maxlen=16)
        self._final_event: dict | None = None
        self._requested: str | None = None   # what we asked for: pivot | keep-top | cancel
        self._last: JobInfo | None = None
        self._started = time.monotonic()
        self.result: JobResult | None = None

    # ------------------------------------------------------------------ creation
    @classmethod
    def start(cls, session: QMPSession, command: str, arguments: Mapping[str, Any],
              job_type: str = "", **kwargs: Any) -> "Job":
        """Run `command` (which starts job arguments["job-id"]) with the job's listener
        already registered; returns the handle."""
        job_id = arguments["job-id"]
        events = session.listen(JOB_EVENTS, job_event_match(job_id), maxsize=64)
        try:
            session.execute(command, arguments)
        except BaseException:
            events.close()
            raise
        return cls(session, job_id, job_type or command, events=events, **kwargs)

    @classmethod
    def adopt(cls, session: QMPSession, job_id: str, **kwargs: Any) -> "Job":
        """A handle on an existing job (e.g. one whose driver died)."""
        job = cls(session, job_id, **kwargs)
        info = job.info()
        if info is None:
            job.close()
            raise LiveJobError("No job '%s'" % job_id, job_id=job_id)
        job.type = info.type
        return job

    def close(self) -> None:
        """Unregister the job's event listener."""
        self.events.close()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ state
    def info(self) -> JobInfo | None:
        """The job's current state (None once QEMU has forgotten it)."""
        for j in self.session.execute("query-jobs"):
            if j["id"] == self.id:
                bj = None
                if j["type"] not in ("snapshot-save", "snapshot-load", "snapshot-delete",
                                     "create", "amend"):
                    bj = next((b for b in self.session.execute("query-block-jobs")
                               if b["device"] == self.id), None)
                self._last = JobInfo.from_qmp(j, bj)
                return self._last
        return None

    @property
    def status(self) -> str:
        """The job's status ("null" if QEMU no longer knows it)."""
        info = self.info()
        return info.status if info else "null"

    def progress(self) -> tuple[int, int]:
        """(current, total) progress as QEMU reports it (total may grow during active commit)."""
        info = self.info()
        if info is None:
            return (self._last.current, self._last.total) if self._last else (0, 0)
        return info.current, info.total

    # ------------------------------------------------------------------ control
    def set_speed(self, bytes_per_second: int) -> None:
        """Limit the job's speed (0: unlimited)."""
        self.session.execute("block-job-set-speed", {"device": self.id,
                                                     "speed": int(bytes_per_second)})

    def pause(self) -> None:
        """Pause the job (it stops at the next safe point)."""
        self.session.execute("job-pause", {"id": self.id})

    def resume(self) -> None:
        """Resume a paused job."""
        self.session.execute("job-resume", {"id": self.id})

    def complete(self) -> None:
        """job-complete: for an active commit in "ready", pivot the disk onto the base."""
        self._requested = "pivot"
        self.session.execute("job-complete", {"id": self.id})

    def complete_without_pivot(self) -> None:
        """For an active commit in "ready": finish, leaving the disk on the top image
        (block-job-cancel force=false, which completes a ready job without the switch)."""
        self._requested = "keep-top"
        self.session.execute("block-job-cancel", {"device": self.id, "force": False})

    def dismiss(self) -> None:
        """Forget a concluded job."""
        self.session.execute("job-dismiss", {"id": self.id})

    # ------------------------------------------------------------------ waiting
    def _note(self, event: dict) -> None:
        name = event.get("event")
        if name == "BLOCK_JOB_ERROR":
            self.error_events.append(event.get("data") or {})
            log.warning("job %s: I/O error (%s)", self.id, event.get("data"))
        elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            self._final_event = event

    def _check_stopped_on_error(self, info: JobInfo) -> None:
        if info.status == "paused" and info.io_status not in (None, "ok") and self.error_events:
            ev = self.error_events[-1]
            raise LiveJobError("Job '%s' stopped on an I/O error (%s, action %s); resume or "
                               "cancel it" % (self.id, ev.get("operation"), ev.get("action")),
                               job_id=self.id, error="%s error" % ev.get("operation"))

    def wait_for(self, statuses: Collection[str], timeout: float | None = None,
                 progress: ProgressCallback | None = None) -> JobInfo | None:
        """Wait until the job's status is one of `statuses` (or it has concluded, or QEMU
        forgot it: then None).  Raises LiveJobError if it stops on an I/O error
        (on-error=stop), QMPTimeoutError after `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.info()
            if info is None:
                return None
            if progress is not None:
                progress(info.current, info.total)
            if info.status in statuses or info.status == "concluded":
                return info
            self._check_stopped_on_error(info)
            wait = self.poll_interval
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QMPTimeoutError("Job '%s' still '%s' after %.1f s"
                                          % (self.id, info.status, timeout))
                wait = min(wait, left)
            ev = self.events.get(timeout=wait)
            if ev is not None:
                self._note(ev)
                for more in self.events.drain():
                    self._note(more)

    def wait_ready(self, timeout: float | None = None,
                   progress: ProgressCallback | None = None) -> JobInfo:
        """Wait for "ready" (active commit: everything copied, writes now mirrored).
        If the job ends instead, it is finished off and LiveJobError raised."""
        info = self.wait_for(("ready",), timeout, progress)
        if info is not None and info.status == "ready":
            return info
        self.finish(timeout=timeout)  # raises for a failure
        raise LiveJobError("Job '%s' ended without becoming ready" % self.id, job_id=self.id,
                           result=self.result)

    def finish(self, timeout: float | None = None, progress: ProgressCallback | None = None,
               *, pivot: bool | None = None) -> JobResult:
        """Drive the job to its end and return how it ended.  A job that waits in "ready"
        (active commit) is completed with pivot=True (job-complete) or False (no switch);
        with pivot=None a ready job is an error.  "pending" jobs are finalized, concluded ones
        dismissed.  Raises LiveJobError if the job failed (or was cancelled by someone else)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            info = self.wait_for(("ready", "pending"), left, progress)
            if info is None:
                return self._vanished()
            if info.status == "ready":
                if self._requested is not None:   # already asked; wait for it to move on
                    self._sleep_on_events(self.poll_interval)
                    continue
                if pivot is None:
                    raise LiveJobError("Job '%s' is ready: complete it (pivot) or keep the top"
                                       % self.id, job_id=self.id)
                if pivot:
                    self.complete()
                else:
                    self.complete_without_pivot()
                continue
            if info.status == "pending":
                if self._requested == "cancel":  # job-cancel moves it to aborting
                    self._sleep_on_events(self.poll_interval)
                else:
                    self._finalize()
                continue
            return self._conclude(info)

    def cancel(self, timeout: float | None = None) -> JobResult:
        """Cancel the job (job-cancel) and wait for its end.  Before "ready" an active commit
        leaves the base partly written; after "ready" the base holds the top's data; in both
        cases the disk stays on the top.  Returns the result (outcome "cancelled", or what
        the job reached if it ended before the cancel took effect)."""
        self._requested = "cancel"
        try:
            self.session.execute("job-cancel", {"id": self.id})
        except QMPCommandError as e:
            if "cannot accept command verb 'cancel'" not in str(e):  # already concluded
                raise
        return self.finish(timeout=timeout)

    def _sleep_on_events(self, seconds: float) -> None:
        ev = self.events.get(timeout=seconds)
        if ev is not None:
            self._note(ev)

    def _finalize(self) -> None:
        try:
            self.session.execute("job-finalize", {"id": self.id})
        except QMPCommandError as e:
            if "cannot accept command verb" not in str(e):  # raced with another driver
                raise

    def _conclude(self, info: JobInfo) -> JobResult:
        for ev in self.events.drain():
            self._note(ev)
        try:
            self.dismiss()
        except QMPCommandError as e:
            if "not found" not in str(e) and "cannot accept" not in str(e):
                raise
        return self._result(info.error, info.current, info.total)

    def _vanished(self) -> JobResult:
        # auto-dismissed, or dismissed by another client: the final event tells the story
        for ev in self.events.drain():
            self._note(ev)
        data = (self._final_event or {}).get("data") or {}
        if self._final_event is None:
            raise LiveJobError("Job '%s' disappeared (dismissed by another client?)" % self.id,
                               job_id=self.id)
        error = data.get("error")
        if self._final_event.get("event") == "BLOCK_JOB_CANCELLED":
            error = error or _CANCELED
        return self._result(error, int(data.get("offset", 0)), int(data.get("len", 0)))

    def _result(self, error: str | None, current: int, total: int) -> JobResult:
        seconds = time.monotonic() - self._started
        if error is None:
            outcome = {"pivot": "pivoted", "keep-top": "kept-top"}.get(self._requested or "",
                                                                      "completed")
        elif error == _CANCELED:
            outcome = "cancelled"
        else:
            outcome = "failed"
        self.result = JobResult(self.id, self.type, outcome, error, current, total, seconds)
        self.close()
        if outcome == "failed":
            raise LiveJobError("Job '%s' (%s) failed: %s" % (self.id, self.type, error),
                               job_id=self.id, error=error, result=self.result)
        if outcome == "cancelled" and self._requested != "cancel":
            raise LiveJobError("Job '%s' (%s) was cancelled" % (self.id, self.type),
                               job_id=self.id, error=error, result=self.result)
        return self.result
