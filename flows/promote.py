"""Operator flow: make an edit state the champion (lineage event, git tag, MLflow alias)."""

from __future__ import annotations

try:
    from flows import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

from prefect import flow

from tasks import ops


@flow(name="promote", log_prints=True)
def promote(state: str, by: str, comment: str = "", workspace: str | None = None) -> dict:
    return ops.promote(workspace, state, by, comment)
