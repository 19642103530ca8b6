"""One vocabulary for long operations (offline here, live in qmp_bridge).

- `Progress`: a callback progress(done, total), in bytes.
- `cancel`: a threading.Event; operations check it with `check_cancel` at window boundaries,
  where everything written so far is committed crash-safely, so stopping there is clean.
- `OpResult`: what an operation did, `outcome` "completed" or "cancelled".
- Failures raise `JobError`; `JobCancelled` (a JobError) is what check_cancel raises inside an
  operation, turned into a "cancelled" OpResult by the operation's run().

Every operation exposes a plan (a frozen dataclass, computed without writing anything: what a
journal records) apart from running it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import JobCancelled, JobError  # noqa: F401 - part of this vocabulary

Progress = Callable[[int, int], None]

COMPLETED = "completed"
CANCELLED = "cancelled"


def check_cancel(cancel: Optional[threading.Event]) -> None:
    """Raise JobCancelled when the cancel event is set (call at window boundaries only)."""
    if cancel is not None and cancel.is_set():
        raise JobCancelled("cancelled")


@dataclass(frozen=True)
class OpResult:
    """The result of a long operation."""
    op: str                                  # "rebase", "commit", "stream", "convert", ...
    outcome: str                             # COMPLETED or CANCELLED
    written: tuple = ()                      # paths of the files written
    backing_before: Optional[str] = None     # the backing name of the image changed
    backing_after: Optional[str] = None
    bytes_copied: int = 0                    # guest bytes copied (or compared and kept)
    target: Optional[str] = None             # commit: the base; convert: the new image

    @property
    def completed(self) -> bool:
        return self.outcome == COMPLETED
