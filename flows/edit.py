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

from tasks import refresh as t


@flow(name="apply-edits", log_prints=True, persist_result=True, result_serializer="json")
def apply_edits(workspace: str | None, cfg: dict[str, Any], ingest: dict[str, Any]) -> dict[str, Any]:
    traced = t.trace(workspace, cfg, ingest)
    edited = t.edit(workspace, cfg, ingest)
    if not edited["state_id"]:
        raise RuntimeError(f"no candidate state was made: {edited.get('reason')}")
    gated = t.gate(workspace, cfg, ingest, edited)
    return {"trace": traced, "edit": edited, "gate": gated}
