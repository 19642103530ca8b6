"""Errors raised by qmp_bridge, all inside qcow2engine's one hierarchy (rooted at Qcow2Error).

    Qcow2Error
    ├── QMPError                    talking to QEMU went wrong
    │   ├── QMPConnectionError      cannot connect, or QEMU / the socket went away
    │   ├── QMPTimeoutError         a command or a wait did not finish in time
    │   └── QMPCommandError         QEMU answered with an error (error_class, command)
    │       └── QMPImageInUseError  ... a lock conflict ("Failed to get "write" lock"); also an
    │                               ImageInUseError
    ├── ChainError
    │   └── LiveGraphError          unknown disk / node, node not in the disk's chain
    └── JobError
        └── LiveJobError            a QEMU job failed, vanished or was cancelled under us
            └── LiveSnapshotError   ... an internal snapshot job; also a SnapshotError
"""
from __future__ import annotations

from typing import Any

from qcow2engine.errors import ChainError, ImageInUseError, JobError, Qcow2Error, SnapshotError

__all__ = ["QMPError", "QMPConnectionError", "QMPTimeoutError", "QMPCommandError",
           "QMPImageInUseError", "LiveGraphError", "LiveJobError", "LiveSnapshotError",
           "command_error"]


class QMPError(Qcow2Error):
    """Something went wrong while talking to QEMU over QMP."""


class QMPConnectionError(QMPError):
    """No QMP session: connecting failed, or QEMU (or the socket) went away."""


class QMPTimeoutError(QMPError, TimeoutError):
    """A QMP command, or a wait for a job or an event, did not finish in time."""


class QMPCommandError(QMPError):
    """QEMU refused a command.  `str(e)` is QEMU's own description."""

    def __init__(self, message: str, *, command: str = "", error_class: str = "GenericError"):
        super().__init__(message)
        self.command = command
        self.error_class = error_class


class QMPImageInUseError(QMPCommandError, ImageInUseError):
    """QEMU refused a command because an image is locked by someone else (or by itself)."""


class LiveGraphError(ChainError):
    """A disk or node named by the caller does not exist, or is not where it must be."""


class LiveJobError(JobError):
    """A QEMU job failed.  `error` is QEMU's error text (query-jobs), `result` the JobResult
    (outcome "failed" or "cancelled") when the job reached its end."""

    def __init__(self, message: str, *, job_id: str = "", error: str | None = None,
                 result: Any = None):
        super().__init__(message)
        self.job_id = job_id
        self.error = error
        self.result = result


class LiveSnapshotError(LiveJobError, SnapshotError):
    """An internal snapshot job (snapshot-save / -load / -delete) failed."""


_LOCK_MARKERS = ('Failed to get "', 'Failed to get shared "', "Failed to lock byte")


def command_error(command: str, message: str, error_class: str = "GenericError") -> QMPCommandError:
    """The right QMPCommandError subclass for QEMU's error `message`."""
    cls = QMPImageInUseError if any(m in message for m in _LOCK_MARKERS) else QMPCommandError
    return cls(message, command=command, error_class=error_class)
