"""Operator flow: causal tracing of facts ({prompt, subject, target?}) with heatmaps."""

from __future__ import annotations

from typing import Any

try:
    from flows import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

from prefect import flow

from tasks import ops


@flow(name="trace", log_prints=True, persist_result=True, result_serializer="json")
def trace(facts: list[dict[str, Any]], model: str = "smollm2-135m", out: str = "reports/traces",
          workspace: str | None = None) -> list[dict[str, Any]]:
    return ops.trace_facts(workspace, model, facts, out)
