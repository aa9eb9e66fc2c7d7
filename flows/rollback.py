"""Operator flow: champion becomes an earlier state (or ``base``), recorded with who and why."""

from __future__ import annotations

try:
    from flows import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

from prefect import flow

from tasks import ops


@flow(name="rollback", log_prints=True, persist_result=True, result_serializer="json")
def rollback(state: str, by: str, reason: str, workspace: str | None = None, force: bool = False) -> dict:
    return ops.rollback(workspace, state, by, reason, force)
