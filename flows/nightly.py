"""The nightly knowledge refresh.

ingest + validate the feed -> (gpu pool) trace a sample, apply the edits on top of the champion,
evaluate and gate -> register the candidate (MLflow alias ``candidate``) -> wait for a human
approval -> promote (alias ``champion``) or reject. Everything before the approval comes back from
persisted, content-keyed task results when a suspended run resumes from the top.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

try:
    from flows import _path  # noqa: F401
except ImportError:  # loaded by path: flows/ itself is on sys.path
    import _path  # noqa: F401

from prefect import flow, get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput

from flows.edit import apply_edits
from kedit.config import RefreshConfig
from tasks import refresh as t


class Approval(RunInput):
    """What the approver gives: a verdict, who they are, why."""

    approve: bool
    approver: str
    comment: str = ""


def approval_form(workspace: str | None, state_id: str, gate: dict[str, Any]):
    """The approval input with the candidate's gate report as the form's description (what the
    reviewer reads in the Prefect UI before answering)."""
    head = (f"## Approve candidate `{state_id[:12]}`?\n\n"
            f"Approve to promote it to champion, or reject it (`kedit approve|reject {state_id[:12]} --by <you>`)."
            f"\n\n---\n\n")
    return Approval.with_initial_data(description=head + t.gate_markdown(workspace, gate))


def _today() -> str:
    return dt.date.today().isoformat()


def run_name(feed: str) -> str:
    """``nightly-<feed date>``: ``today`` becomes the date, a path its file stem."""
    feed = _today() if feed == "today" else str(feed)
    return f"nightly-{feed.rsplit('/', 1)[-1].rsplit('.', 1)[0]}"


def _run_name() -> str:
    from prefect.runtime import flow_run

    return run_name(flow_run.parameters.get("feed", "today"))


@flow(name="nightly-refresh", log_prints=True, persist_result=True, result_serializer="json",
      flow_run_name=_run_name)
def nightly_refresh(feed: str = "today", workspace: str | None = None, method: str | None = None,
                    params_file: str | None = None, gpu_deployment: str | None = None,
                    approval: str = "suspend", approval_timeout_s: int | None = None) -> dict[str, Any]:
    """Run one refresh. ``feed``: a date (feeds/<date>.jsonl), ``today``, or a path.

    ``gpu_deployment`` (e.g. ``apply-edits/apply-edits``) runs the model work on the gpu pool;
    without it the work runs in this process. ``approval``: ``suspend`` (the run exits while it
    waits; needs a deployment) or ``pause`` (the process waits).
    """
    logger = get_run_logger()
    cfg = RefreshConfig.from_params(params_file, workspace, method=method,
                                    approval_timeout_s=approval_timeout_s).to_dict()
    feed = _today() if feed == "today" else feed

    t.sync_lineage(workspace)  # where the lineage is shared: start from its latest champion
    expired = t.expire_overdue(workspace)
    if expired:
        logger.warning("rejected %d candidate(s) whose approval timed out: %s", len(expired), expired)
    ing = t.ingest(workspace, feed, cfg)
    key = ing["refresh_key"]
    out: dict[str, Any] = {"refresh_key": key, "feed": ing["feed"], "validation_report": ing["report_path"],
                           "counts": ing["counts"], "champion": ing["champion"]}
    if not ing["passed"]:
        logger.error("feed rejected as a whole: %s", ing["message"])
        return {**out, "outcome": "feed-rejected", "message": ing["message"]}
    if not ing["accepted"]:
        logger.info("nothing new to apply (%s)", ing["counts"])
        return {**out, "outcome": "nothing-to-apply"}

    if gpu_deployment:
        work = t.run_on_gpu_pool(gpu_deployment, workspace, cfg, ing)
    else:
        work = apply_edits(workspace=workspace, cfg=cfg, ingest=ing)
    sid = work["edit"]["state_id"]
    out.update(state_id=sid, gate_report=work["gate"]["report_dir"], traced=work["trace"]["dir"])
    if not work["gate"]["passed"]:
        failed = [c["name"] for c in work["gate"]["checks"] if not c["passed"]]
        logger.error("gates failed (%s): champion unchanged", ", ".join(failed))
        res = t.decide(workspace, key, sid, False, "kedit-gate", "gate failed: " + ", ".join(failed))
        return {**out, "outcome": "gate-failed", **res}

    reg = t.register(workspace, key, sid)
    out.update(registered_model=reg["registered_model"], version=reg["version"])
    print(f"candidate {sid[:12]} registered as {reg['registered_model']} v{reg['version']} (alias 'candidate');"
          f" gate report: {work['gate']['report_dir']}/gate.md")
    print(f"waiting for approval: kedit approve {sid[:12]} --by <you>   or   kedit reject {sid[:12]} --by <you>")

    timeout = int(cfg["approval_timeout_s"])
    form = approval_form(workspace, sid, work["gate"])
    try:
        if approval == "pause":
            decision = pause_flow_run(wait_for_input=form, timeout=timeout, poll_interval=2,
                                      key=f"approval-{sid[:16]}")
        elif approval == "suspend":
            decision = suspend_flow_run(wait_for_input=form, timeout=timeout, key=f"approval-{sid[:16]}")
        else:
            raise ValueError(f"approval must be 'suspend' or 'pause', not {approval!r}")
    except FlowPauseTimeout:
        res = t.decide(workspace, key, sid, False, "kedit-timeout", f"no approval within {timeout} s")
        return {**out, "outcome": "approval-timed-out", **res}
    res = t.decide(workspace, key, sid, decision.approve, decision.approver, decision.comment)
    return {**out, "outcome": res["decision"], **res}
