"""The workspace's lineage store as every layer opens it: its ``lineage:`` params block, the store
itself (with a warning when an interrupted promote / rollback left the stores apart), and the base
model with one state restored.

Below :mod:`kedit.lineage.ops` and :mod:`kedit.lineage.registry`: it imports neither, so the MLflow
model class, the feeds' champion check and the nightly steps can restore a state without an import
cycle through the registry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kedit.lineage.intent import read_intent
from kedit.lineage.signing import signing_config
from kedit.lineage.state import LineageError
from kedit.lineage.store import LineageStore, pid_alive
from kedit.workspace import Workspace

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"snapshot_every": 20, "dvc_remote": None, "model_prefix": "kedit",
                            "mlflow": True, "dvc": True, "require_distinct_approver": False,
                            "sign_commits": False, "lock_wait_s": 600, "approval_signing": None,
                            "allowed_signers": "allowed_signers"}


def lineage_params(ws: Workspace, params_file: str | Path | None = None) -> dict[str, Any]:
    """The ``lineage:`` block of params.yaml (found by :func:`kedit.params.find_params`), over defaults."""
    from kedit.params import load_params

    return {**DEFAULTS, **load_params(params_file, ws).block("lineage")}


def open_store(ws: Workspace, params: dict[str, Any] | None = None) -> LineageStore:
    """The workspace's lineage store; warns when an interrupted promote / rollback left the stores apart."""
    params = params or lineage_params(ws)
    store = LineageStore(ws.lineage_dir, snapshot_every=int(params["snapshot_every"]),
                         require_distinct_approver=bool(params.get("require_distinct_approver", False)),
                         signing=signing_config(ws.root, params))
    note = pending_report(store)
    if note:
        log.warning(note)
    return store


def pending_report(store: LineageStore) -> str | None:
    """One line about an interrupted promote / rollback (None: none, or one still running)."""
    try:
        intent = read_intent(store.root)
    except LineageError as exc:
        return str(exc)
    if intent is None:
        return None
    holder = store.lock_holder()
    if holder.get("pid") == intent.pid and holder.get("host") == intent.host and pid_alive(intent.pid):
        return None  # in progress, not interrupted
    return (f"{store.root}: an interrupted {intent.describe()}; git/DVC and MLflow may not follow the lineage "
            f"events: run `kedit lineage repair` (any promote or rollback also finishes it)")


def load_state_model(ws: Workspace, model: str, state_id: str | None, device: str = "cpu"):
    """The base model ``model`` (a slug in the workspace's model store) with ``state_id`` materialised
    bit-exactly (None: the base model); returns ``(lm, editor_state)``."""
    from kedit.models.store import load_model

    lm = load_model(model, ws, device=device)
    editor_state = open_store(ws).materialise(state_id, lm) if state_id else None
    return lm, editor_state
