"""The engine's one error hierarchy.  The CLI maps each class to a one-line message and an exit code."""
from __future__ import annotations


class Qcow2Error(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidImageError(Qcow2Error):
    """The file is not a valid image: bad magic, fields out of range, tables outside the file."""


class UnsupportedFeatureError(Qcow2Error):
    """The image uses a feature the engine cannot handle (named from the image's feature table)."""


class CorruptImageError(Qcow2Error):
    """Metadata is inconsistent (found while reading or writing)."""


class ImageInUseError(Qcow2Error):
    """Another process (e.g. a running QEMU) holds a conflicting lock on the image."""


class ChainError(Qcow2Error):
    """A backing chain cannot be resolved: missing file, loop, too deep, refused protocol."""


class SnapshotError(Qcow2Error):
    """An internal snapshot operation cannot be done."""


class JobError(Qcow2Error):
    """A long-running job failed or was cancelled."""


class JobCancelled(JobError):
    """A long operation stopped at a window boundary because its cancel event was set."""


class InvalidRequestError(Qcow2Error, ValueError):
    """A request outside the disk, misaligned where alignment is required, or malformed."""


class RefcountOverflow(Qcow2Error):
    """A cluster would need a reference count above what refcount_bits can hold."""


class CreateError(Qcow2Error):
    """An image cannot be created with the given options."""


class ResizeError(Qcow2Error):
    """An image cannot be resized as asked."""


class AmendError(Qcow2Error):
    """An image option cannot be changed as asked."""


class MachineError(Qcow2Error):
    """A machine snapshot-tree request cannot be done (unknown machine, bad state, ...)."""


class MachineBusyError(MachineError):
    """Another operation holds the machine."""


class MachineInconsistentError(MachineError):
    """The files no longer match the tree (see `machine check`)."""


class OperationPendingError(MachineError):
    """An earlier operation on the machine did not finish; `machine recover` completes it."""
