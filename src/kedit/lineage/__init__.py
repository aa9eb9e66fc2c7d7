"""Weight lineage: content-addressed edit states (store), MLflow registry (registry), git + DVC
versioning (versioning) and the operations that combine them (ops)."""

from kedit.lineage.state import EditState, Event, LineageCorruptError, LineageError
from kedit.lineage.store import COMMIT_STEPS, LineageStore, LogEntry, VerifyReport

__all__ = ["COMMIT_STEPS", "EditState", "Event", "LineageCorruptError", "LineageError", "LineageStore",
           "LogEntry", "VerifyReport"]
