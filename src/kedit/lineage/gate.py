"""Gate any lineage state against its parent and record the verdict (`kedit lineage gate STATE`).

The nightly refresh gates the candidates it makes; a state made outside it (a retraction by
:mod:`kedit.lineage.retract`) needs the same verdict before `kedit lineage promote` accepts it. This
runs the refresh's promotion gate on the state: the parent is the "champion" side, the checks and
thresholds are the ``gates:`` and ``drift:`` blocks of params.yaml, the reports are the refresh's
gate.json / gate.md / gate.png, and the verdict is recorded against the parent (the one the promotion
rules count). A retraction has no new edits, so the edit checks are skipped; what it must show instead
is that the retracted fact's prompt no longer gives the retracted object (the ``retraction`` check).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedit.lineage.state import BASE, LineageError
from kedit.lineage.store import LineageStore
from kedit.workspace import Workspace

RETRACTION_CHECK = "retraction"


@dataclass
class StateGate:
    """What gating one state found and where it went: the verdict, the report folder, the lineage event."""

    state_id: str
    parent: str | None  # what it was compared with (None: the base model)
    passed: bool
    report_dir: Path
    event_seq: int
    checks: list[dict] = field(default_factory=list)
    failed_ids: list = field(default_factory=list)
    lost_ids: list = field(default_factory=list)
    retracted: list[str] = field(default_factory=list)
    mlflow_model_id: str | None = None


def gate_target(store: LineageStore, state_ref: str) -> str:
    """The full id of the state to gate; the base model and the champion are refused (nothing to promote)."""
    if state_ref == BASE:
        raise LineageError("the base model has no parent to be gated against and is never promoted: "
                           "gate an edit state (see `kedit lineage log`)")
    sid = store.resolve(state_ref)
    if sid == store.champion():
        raise LineageError(f"state {sid[:12]} is the champion already: the gate compares a candidate with its "
                           f"parent before a promotion; gate one of its children instead (see `kedit lineage log`)")
    return sid


def gate_report_dir(ws: Workspace, state_id: str) -> Path:
    """``reports/state-<id[:16]>/gate``: beside the refresh's ``reports/<refresh key>/gate``."""
    from kedit.safepath import check_target

    d = ws.reports_dir / f"state-{state_id[:16]}" / "gate"
    check_target(d, ws, "gate report", within=ws.root, stores=False)  # no link may lead the report elsewhere
    return d


def retraction_check(parent_lm: Any, candidate_lm: Any, records: Sequence[dict], threshold: float | None):
    """Share of retracted facts whose prompt no longer gives their ``target_new`` under greedy decoding.

    ``before`` is the same share on the parent (0 when every edit had taken there). A fact whose edit
    never took on the parent passes trivially; the detail says so."""
    from kedit.evaluation.gates import _check
    from kedit.refresh import greedy_answers, predicts_targets

    rows = [r for r in records if r and r.get("prompt") and r.get("subject") and r.get("target_new")]
    if not rows:
        return _check(RETRACTION_CHECK, None, threshold, "min",
                      detail="the retracted facts' records (prompt, subject, target_new) are not in the lineage")
    held = predicts_targets(parent_lm, rows)
    still = predicts_targets(candidate_lm, rows)
    prompts = [r["prompt"].format(r["subject"]) for r in rows]
    was, now = greedy_answers(parent_lm, prompts), greedy_answers(candidate_lm, prompts)
    parts = []
    for r, h, s, a, b in zip(rows, held, still, was, now):
        state = "STILL gives it" if s else ("gone" if h else "gone (the parent did not give it either)")
        parts.append(f"{r['id']}: {r['target_new']!r} {state}; answer {a!r} -> {b!r}")
    gone = sum(not s for s in still) / len(rows)
    return _check(RETRACTION_CHECK, gone, threshold, "min", sum(not h for h in held) / len(rows), gone,
                  threshold, "; ".join(parts))


def gate_state(ws: Workspace, store: LineageStore, state_ref: str, by: str = "kedit-gate",
               mlflow: bool | None = None) -> StateGate:
    """Gate ``state_ref`` against its parent, write the reports, record the verdict, log to MLflow.

    ``mlflow``: log the candidate as an MLflow model with its gate (None: as params.yaml's
    ``lineage.mlflow`` says, like the refresh)."""
    from kedit.evaluation.canary import build_canary
    from kedit.evaluation.drift import drift_summary
    from kedit.evaluation.gates import GatePolicy, run_gates
    from kedit.lineage.retract import RETRACTION, find_fact
    from kedit.refresh import (
        RefreshConfig,
        gate_records,
        load_state_model,
        nightly_drift_gate,
        without_edited_subjects,
    )

    sid = gate_target(store, state_ref)
    state = store.get(sid)
    parent = state.parent
    retracted = [str(f) for f in state.feed.get("retracted", []) or []]
    cfg = RefreshConfig.from_params(workspace=ws, model=state.base_model_slug)
    policy = GatePolicy.from_params(workspace=ws)
    parent_lm, _ = load_state_model(ws, cfg, parent)
    cand_lm, _ = load_state_model(ws, cfg, sid)

    new_facts = list(state.feed.get("facts", []) or [])  # this state's own edits
    gone = set(retracted)
    prior_facts = [f for f in store.fact_records(parent) if str(f.get("id")) not in gone]
    retracted_records = [find_fact(store, parent, f).record for f in retracted] if parent else []
    new = gate_records(parent_lm, new_facts) if new_facts else []
    prior = gate_records(parent_lm, prior_facts) if prior_facts else []
    out_dir = gate_report_dir(ws, sid)
    # the canary suite is what the parent answers today, less prompts about subjects whose answers move
    canary = build_canary(parent_lm, edits=prior_facts, k=max(1, policy.canary_k))
    canary = without_edited_subjects(canary, [*new_facts, *prior_facts, *(r for r in retracted_records if r)])
    canary.save(out_dir / "canary")
    drift = nightly_drift_gate(ws, cfg, policy, state.base_model_hash,
                               [*canary.prompts, *(r["locality_prompt"] for r in new)])
    kind = state.feed.get("kind")
    feed = (f"retraction of {', '.join(retracted)}" if kind == RETRACTION
            else Path(state.feed["path"]).name if state.feed.get("path") else None)
    report = run_gates(parent_lm, cand_lm, policy, new_edits=new, prior_edits=prior, canary=canary,
                       progress=False, reference_text=drift.reference_text, drift=drift,
                       candidate_state={"id": sid, "parent": parent, "feed": feed,
                                        "n_edits": None if kind == RETRACTION else state.n_edits})
    champion = store.champion()
    if parent != champion:
        report.notes.append(f"the parent {(parent or 'base')[:12]} is not the champion "
                            f"({champion[:12] if champion else 'the base model'}): the \"champion\" columns are the parent's")
    if state.n_edits and not new_facts:
        report.notes.append(f"{state.n_edits} edits of this state have no records in the lineage (feed facts): "
                            f"the edit checks could not score them")
    if retracted:
        report.notes.append(f"retraction of {', '.join(retracted)} by {state.feed.get('by')}: "
                            f"{state.feed.get('reason')} (no new edits: the edit checks are skipped; the "
                            f"retraction check asks that the retracted object is gone, at gates.min_efficacy)")
        report.checks.append(retraction_check(parent_lm, cand_lm, [r for r in retracted_records if r],
                                              policy.min_efficacy))
        report.passed = all(c.passed for c in report.checks)
    report.save(out_dir)
    gate = report.to_dict()
    verdict = {"passed": gate["passed"], "checks": gate["checks"], "failed_ids": gate["failed_ids"],
               "lost_ids": gate["lost_ids"], "drift": drift_summary(report.checks, drift.reference.model_hash)}
    if retracted:
        verdict["retracted"] = retracted
    ev = store.record_gate(sid, verdict, against=parent, by=by, report=str(out_dir))
    model_id = _log_mlflow(ws, store, sid, gate, out_dir) if _mlflow_on(ws, mlflow) else None
    return StateGate(state_id=sid, parent=parent, passed=bool(gate["passed"]), report_dir=out_dir,
                     event_seq=ev.seq, checks=gate["checks"], failed_ids=gate["failed_ids"],
                     lost_ids=gate["lost_ids"], retracted=retracted, mlflow_model_id=model_id)


def _mlflow_on(ws: Workspace, mlflow: bool | None) -> bool:
    from kedit.lineage.ops import lineage_params

    return bool(lineage_params(ws).get("mlflow", True)) if mlflow is None else mlflow


def _log_mlflow(ws: Workspace, store: LineageStore, sid: str, gate: dict, out_dir: Path) -> str | None:
    """The refresh's evaluation run and logged candidate model, under a run keyed by the state."""
    from kedit.refresh import RunLog, log_candidate_model

    runlog = RunLog(ws, f"state-{sid[:16]}", name="lineage-gate", kind="lineage-gate")
    runlog.log("evaluation", metrics={c["name"]: c["value"] for c in gate["checks"] if c.get("value") is not None},
               tags={"kedit.gate": "passed" if gate["passed"] else "failed", "kedit.state": sid},
               artifacts=[out_dir])
    model_id = log_candidate_model(ws, store, sid, runlog, out_dir)
    runlog.finish()
    return model_id
