"""The model work of a refresh, deployable on the ``gpu`` pool: trace, edit, evaluate and gate.

It finishes (and frees the GPU worker) before the nightly flow waits for approval.
"""

from __future__ import annotations

from typing import Any

try:
    from flows import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

from prefect import flow

from kedit.lineage.ops import lineage_params
from kedit.lineage.shared import lock_wait, section
from kedit.workspace import Workspace
from tasks import refresh as t


@flow(name="apply-edits", log_prints=True, persist_result=True, result_serializer="json")
def apply_edits(workspace: str | None, cfg: dict[str, Any], ingest: dict[str, Any]) -> dict[str, Any]:
    """Where the lineage is shared (``KEDIT_LOCK_URL``, ``KEDIT_GIT_REMOTE``), the whole edit holds the
    cross-host lock: two nightly runs take turns, and the candidate is published before the lock goes."""
    ws = Workspace.default(workspace)
    params = lineage_params(ws)
    with section(ws, "apply-edits", params, wait_s=lock_wait(params)):
        traced = t.trace(workspace, cfg, ingest)
        edited = t.edit(workspace, cfg, ingest)
        if not edited["state_id"]:
            raise RuntimeError(f"no candidate state was made: {edited.get('reason')}")
        gated = t.gate(workspace, cfg, ingest, edited)
    return {"trace": traced, "edit": edited, "gate": gated}
