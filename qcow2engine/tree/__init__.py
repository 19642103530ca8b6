"""Machine snapshot trees: several disks, snapshots over all of them (internal, external or
excluded per disk) forming a tree with a current position; revert by reset, follow or commit,
optionally discarding; deletes that merge away what nothing needs; every multi-step operation
journaled in SQLite.  See manager.py for the API (`Tree`, `Machine`)."""
from .manager import Finding, Machine, Tree, TreeResult, snapshot_doc  # noqa: F401
from .model import EXTERNAL, INTERNAL, NO  # noqa: F401
