"""Operator flow: make an edit state the champion (lineage event, git tag, MLflow alias), through
``kedit.lineage.ops.promote`` like every other path."""

from __future__ import annotations

try:
    from flows import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

from prefect import flow

from tasks import ops


@flow(name="promote", log_prints=True, persist_result=True, result_serializer="json")
def promote(state: str, by: str, comment: str = "", workspace: str | None = None,
            override: str | None = None) -> dict:
    """Needs a passed gate and an approval recorded for ``state``; ``override`` (a reason) goes past
    them and is recorded as an override event."""
    return ops.promote(workspace, state, by, comment, override)
