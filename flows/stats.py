"""Operator flow: collect the key statistics a model needs before MEMIT / AlphaEdit edits."""

from __future__ import annotations

try:
    from flows import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

from prefect import flow

from tasks import ops


@flow(name="compute-stats", log_prints=True, persist_result=True, result_serializer="json")
def compute_stats(model: str = "smollm2-135m", layers: str = "2-10", corpus: str = "wiki-summaries-en",
                  max_tokens: int = 200_000, workspace: str | None = None) -> dict:
    return ops.compute_stats(workspace, model, layers, corpus, max_tokens)
