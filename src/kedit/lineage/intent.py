"""The intent record of a promote / rollback: written before the first store is touched.

A promotion moves three stores that cannot be changed in one transaction: the lineage event (the
truth and the commit point), a git commit + tag of the DVC-tracked files, and the MLflow
``champion`` alias. ``lineage/.intent.json`` says what is being done and which steps have finished,
so a process killed between two steps leaves a record that the next kedit command reads:

- the event is not in the store: nothing happened; the intent is dropped (reported);
- the event is in the store: git + DVC and MLflow are brought to the store's champion (repair).

Each step is idempotent (a git tag moved with ``-f``, an alias set again), so finishing twice is
harmless. The intent is written atomically; it lives beside the lock and is not versioned by DVC.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kedit.atomic import write_json_atomic
from kedit.lineage.state import LineageCorruptError

INTENT_FILE = ".intent.json"
STEPS = ("event", "report", "versioning", "mlflow")  # in the order a promote / rollback takes them


@dataclass
class Intent:
    """One promote / rollback in progress. ``target`` None is the base model."""

    op: str
    target: str | None
    by: str
    mlflow: bool
    dvc: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    done: list[str] = field(default_factory=list)
    out: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        target = self.target[:12] if self.target else "base"
        left = [s for s in STEPS if s not in self.done]
        return (f"{self.op} of {target} by {self.by} (pid {self.pid} on {self.host}, started {self.started}; "
                f"done: {', '.join(self.done) or 'nothing'}; not done: {', '.join(left) or 'nothing'})")


def intent_path(root: Path) -> Path:
    return Path(root) / INTENT_FILE


def read_intent(root: Path) -> Intent | None:
    path = intent_path(root)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        return Intent(**{k: raw[k] for k in Intent.__dataclass_fields__ if k in raw})
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise LineageCorruptError(f"{path}: unreadable promote/rollback intent ({exc}); delete it after "
                                  f"checking `kedit lineage verify`") from exc


def write_intent(root: Path, intent: Intent) -> None:
    write_json_atomic(intent_path(root), asdict(intent))


def adopt(root: Path, intent: Intent) -> None:
    """This process takes over an interrupted intent (so readers see it in progress, not interrupted)."""
    intent.pid, intent.host = os.getpid(), socket.gethostname()
    write_intent(root, intent)


def step_done(root: Path, intent: Intent, step: str, **out: Any) -> None:
    """Record that ``step`` finished (and what it produced) before the next one starts."""
    intent.done.append(step)
    intent.out.update(out)
    write_intent(root, intent)


def clear_intent(root: Path) -> None:
    try:
        intent_path(root).unlink()
    except FileNotFoundError:
        pass
