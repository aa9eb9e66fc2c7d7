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


def timed_tasks(cfg: dict[str, Any]):
    """The edit and gate tasks with ``refresh.edit_timeout_s`` / ``gate_timeout_s`` (params.yaml) as their
    Prefect timeouts: a hung step fails instead of holding the gpu pool."""
    return (t.edit.with_options(timeout_seconds=cfg.get("edit_timeout_s")),
            t.gate.with_options(timeout_seconds=cfg.get("gate_timeout_s")))


def _run_name() -> str:
    """``edits-<feed date or file>``: the run says which feed it applies."""
    from prefect.runtime import flow_run

    feed = str((flow_run.parameters.get("ingest") or {}).get("feed") or "feed")
    return f"edits-{feed.rsplit('/', 1)[-1].rsplit('.', 1)[0]}"


@flow(name="apply-edits", log_prints=True, persist_result=True, result_serializer="json", flow_run_name=_run_name)
def apply_edits(workspace: str | None, cfg: dict[str, Any], ingest: dict[str, Any]) -> dict[str, Any]:
    """Where the lineage is shared (``KEDIT_LOCK_URL``, ``KEDIT_GIT_REMOTE``), the whole edit holds the
    cross-host lock: two nightly runs take turns, and the candidate is published before the lock goes."""
    ws = Workspace.default(workspace)
    params = lineage_params(ws)
    with section(ws, "apply-edits", params, wait_s=lock_wait(params)):
        traced = t.trace(workspace, cfg, ingest)
        edit, gate = timed_tasks(cfg)
        edited = edit(workspace, cfg, ingest)
        if not edited["state_id"]:
            raise RuntimeError(f"no candidate state was made: {edited.get('reason')}")
        gated = gate(workspace, cfg, ingest, edited)
    return {"trace": traced, "edit": edited, "gate": gated}
