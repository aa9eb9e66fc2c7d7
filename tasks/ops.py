"""Tasks for operator actions: promotion, rollback, statistics and tracing on demand."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from kedit.workspace import Workspace

# results are JSON like the nightly tasks' (tasks.refresh): readable by any client, never unpickled
RESULTS = {"persist_result": True, "result_serializer": "json"}


@task(name="promote-state", cache_policy=NO_CACHE, **RESULTS)
def promote(workspace: str | None, state: str, by: str, comment: str,
            override: str | None = None) -> dict[str, Any]:
    """``kedit.lineage.ops.promote``: refused without a passed gate and an approval unless ``override``."""
    from kedit.lineage.ops import open_store
    from kedit.lineage.ops import promote as do_promote

    ws = Workspace.default(workspace)
    return do_promote(ws, open_store(ws), state, by=by, comment=comment, override=override)


@task(name="rollback-state", cache_policy=NO_CACHE, **RESULTS)
def rollback(workspace: str | None, state: str, by: str, reason: str, force: bool = False) -> dict[str, Any]:
    from kedit.lineage.ops import open_store
    from kedit.lineage.ops import rollback as do_rollback

    ws = Workspace.default(workspace)
    return do_rollback(ws, open_store(ws), state, by=by, reason=reason, force=force)


@task(name="compute-stats", retries=1, cache_policy=NO_CACHE, **RESULTS)
def compute_stats(workspace: str | None, model: str, layers: str, corpus: str, max_tokens: int) -> dict[str, Any]:
    from kedit.cli.stats import parse_layers
    from kedit.models.store import load_model
    from kedit.stats.collect import ensure_stats

    ws = Workspace.default(workspace)
    lm = load_model(model, ws)
    b = ensure_stats(lm, parse_layers(layers), ws, corpus, max_tokens=max_tokens, progress=False)
    return {"dir": str(b.dir), "n_tokens": b.n_tokens, "layers": b.layers, "key": b.key}


@task(name="trace-facts", retries=1, cache_policy=NO_CACHE, **RESULTS)
def trace_facts(workspace: str | None, model: str, facts: list[dict[str, Any]], out: str) -> list[dict[str, Any]]:
    from pathlib import Path

    from kedit.models.store import load_model
    from kedit.tracing import trace_fact

    ws = Workspace.default(workspace)
    lm = load_model(model, ws)
    done = []
    for i, f in enumerate(facts):
        res = trace_fact(lm, f["prompt"], f["subject"], target=f.get("target"))
        d = res.save(Path(out) / str(f.get("id", i)))
        done.append({"id": f.get("id", i), "dir": str(d), "target": res.target})
    return done
