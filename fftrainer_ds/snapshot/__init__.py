"""Per-step snapshots of a rank's whole training state: format, capture, pool, async pack, persistence."""
from .format import ParsedSnapshot, read_snapshot
from .pool import SnapshotPool, SnapshotRef

__all__ = ["ParsedSnapshot", "SnapshotPool", "SnapshotRef", "read_snapshot"]
