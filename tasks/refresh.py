"""Tasks of the nightly refresh. Each wraps one ``kedit.refresh`` step and adds what orchestration
needs: retries where a retry is safe, JSON-persisted results, and cache policies (``tasks.cache``) built
from content hashes (feed sha256, parent state id, editor config) and the task source, so a resumed or
re-run refresh reuses finished work and never applies the same edits twice.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from kedit import refresh
from kedit.config import RefreshConfig
from kedit.lineage.access import open_store
from kedit.workspace import Workspace
from tasks.cache import content_keyed, feed_keyed

RESULTS = {"persist_result": True, "result_serializer": "json"}

# kedit's loggers reach the flow run logs through PREFECT_LOGGING_EXTRA_LOGGERS=kedit (prefect.yaml, the
# local stack), which gives them Prefect's API handler but not a level: left unset they inherit the root
# logger's WARNING and each step's progress lines (INFO) would be dropped
if logging.getLogger("kedit").level == logging.NOTSET:
    logging.getLogger("kedit").setLevel(logging.INFO)
KEEP = timedelta(days=30)


def _ws(workspace: str | None) -> Workspace:
    return Workspace.default(workspace)


def _cfg(cfg: dict[str, Any]) -> RefreshConfig:
    return RefreshConfig(**cfg)


def _champion(ws: Workspace) -> str:
    """The champion from the lineage events (``LineageStore.champion``; base: "base"), never from the
    CHAMPION convenience copy."""
    return open_store(ws).champion() or "base"


# same feed bytes, same champion, same config -> same ingest outcome
FACT_COLUMNS = ("id", "subject", "prompt", "target_true", "target_new", "relation", "source")


def facts_table(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The accepted facts as the rows of a Prefect table artifact (one string per column)."""
    return [{c: "" if r.get(c) is None else str(r.get(c)) for c in FACT_COLUMNS} for r in rows]


def gate_markdown(workspace: str | None, gate: dict[str, Any]) -> str:
    """The gate report (gate.md) of a gate result, for the run's artifact and the approval form."""
    md = _ws(workspace).path(gate["report_dir"]) / "gate.md"
    return md.read_text() if md.exists() else f"(no gate report at {md})"


# same feed bytes, same champion, same config -> same ingest outcome
@task(name="ingest-feed", retries=2, retry_delay_seconds=5, cache_policy=feed_keyed(_champion),
      cache_expiration=KEEP, **RESULTS)
def ingest(workspace: str | None, feed: str, cfg: dict[str, Any]) -> dict[str, Any]:
    from prefect.artifacts import create_table_artifact

    out = refresh.ingest_step(_ws(workspace), feed, _cfg(cfg))
    create_table_artifact(key="feed-facts", table=facts_table(out["accepted"]),
                          description=f"Facts accepted from {Path(out['feed']).name} "
                                      f"({out['counts'].get('accepted', 0)} of {out['counts'].get('rows', 0)} rows; "
                                      f"champion {(out['champion'] or 'base')[:12]})")
    return out


@task(name="causal-trace", retries=1, cache_policy=content_keyed("trace", "ingest.refresh_key"),
      cache_expiration=KEEP, **RESULTS)
def trace(workspace: str | None, cfg: dict[str, Any], ingest: dict[str, Any]) -> dict[str, Any]:
    return refresh.trace_step(_ws(workspace), _cfg(cfg), ingest["accepted"], ingest["refresh_key"])


@task(name="apply-edits", retries=1, retry_delay_seconds=10,
      cache_policy=content_keyed("edit", "ingest.refresh_key"), cache_expiration=KEEP, **RESULTS)
def edit(workspace: str | None, cfg: dict[str, Any], ingest: dict[str, Any]) -> dict[str, Any]:
    return refresh.edit_step(_ws(workspace), _cfg(cfg), ingest)


@task(name="evaluate-and-gate", retries=1,
      cache_policy=content_keyed("gate", "edit.state_id"), cache_expiration=KEEP, **RESULTS)
def gate(workspace: str | None, cfg: dict[str, Any], ingest: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    from prefect.artifacts import create_markdown_artifact

    out = refresh.gate_step(_ws(workspace), _cfg(cfg), ingest, edit)
    create_markdown_artifact(key="gate-report", markdown=gate_markdown(workspace, out),
                             description=f"Gate report of candidate {edit['state_id'][:12]}: "
                                         f"{'PASSED' if out['passed'] else 'FAILED'}")
    return out


@task(name="register-candidate", retries=2, retry_delay_seconds=5,
      cache_policy=content_keyed("register", "state_id"), cache_expiration=KEEP, **RESULTS)
def register(workspace: str | None, key: str, state_id: str) -> dict[str, Any]:
    return refresh.register_step(_ws(workspace), key, state_id)


@task(name="decide", cache_policy=NO_CACHE, persist_result=True, result_serializer="json")
def decide(workspace: str | None, key: str, state_id: str, approved: bool, by: str, comment: str) -> dict[str, Any]:
    return refresh.decide_step(_ws(workspace), key, state_id, approved, by, comment)


@task(name="gpu-result", cache_policy=content_keyed("gpu", "ingest.refresh_key"), cache_expiration=KEEP,
      **RESULTS)
def run_on_gpu_pool(deployment: str, workspace: str | None, cfg: dict[str, Any], ingest: dict[str, Any]) -> dict[str, Any]:
    """Run tracing + editing + evaluation as a deployment on the ``gpu`` pool and return its result.

    Cached by the refresh key: when a suspended nightly run resumes from the top, the GPU work is not
    started again, and the GPU worker is free while the approval is pending.
    """
    from prefect.deployments import run_deployment

    fr = run_deployment(deployment, parameters={"workspace": workspace, "cfg": cfg, "ingest": ingest},
                        timeout=None)
    if not fr.state.is_completed():
        raise RuntimeError(f"GPU flow run {fr.name} ended {fr.state.name}: {fr.state.message}")
    return fr.state.result()


@task(name="expire-overdue-approvals", cache_policy=NO_CACHE, retries=1, **RESULTS)
def expire_overdue(workspace: str | None) -> list[str]:
    """A timed-out approval rejects (suspended runs cannot time themselves out: they are not running)."""
    from prefect.settings import PREFECT_API_URL

    from kedit.lineage.ops import lineage_params, open_store
    from kedit.lineage.shared import lock_wait, section
    from kedit.orchestration import PrefectRuns
    from kedit.orchestration import expire_overdue as expire

    if not PREFECT_API_URL.value():  # an ephemeral in-process run: no server holds waiting runs
        return []
    ws = _ws(workspace)
    params = lineage_params(ws)
    with section(ws, "expire overdue approvals", params, wait_s=lock_wait(params)):
        return expire(PrefectRuns(), open_store(ws), ws=ws)


@task(name="sync-lineage", cache_policy=NO_CACHE, retries=1, **RESULTS)
def sync_lineage(workspace: str | None) -> None:
    """``kedit.lineage.shared.sync``: pull the shared lineage (a no-op where it is not shared)."""
    from kedit.lineage.ops import lineage_params
    from kedit.lineage.shared import lock_wait, sync

    ws = _ws(workspace)
    params = lineage_params(ws)
    sync(ws, params, wait_s=lock_wait(params))


def report_path(workspace: str | None, key: str) -> Path:
    return _ws(workspace).reports_dir / key
